"""Synthetic ``srdata score`` run folders for the curriculum, report and loader tests.

They hold exactly what the scorer writes (annotated.parquet with the contract columns,
manifest.json, shard files) without running a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from srdata.steps.rank import rank

TEMPLATES = ("alpaca", "raw", "chat")


def annotated_frame(n: int, seed: int = 0, invalid_ids: Sequence[int] = (), rouge_decimals: int = 3) -> pl.DataFrame:
    """``n`` rows with original columns, contract columns and ranks (invalid rows flagged)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    rouge = np.round(rng.random(n), rouge_decimals)
    # Loss loosely anti-correlated with ROUGE-L, as in real runs.
    loss = np.round(3.0 - 2.0 * rouge + rng.gamma(2.0, 0.4, n), 3)
    invalid = np.isin(ids, np.asarray(invalid_ids, dtype=np.int64))
    frame = pl.DataFrame(
        {
            "instruction": [f"Question {i}: explain topic {i % 7}." for i in ids],
            "output": [f"Answer {i} about topic {i % 7}." for i in ids],
            "template": [TEMPLATES[i % len(TEMPLATES)] for i in ids],
            "srd_id": ids,
            "prompt_text": [f"### Instruction:\nQuestion {i}\n\n### Response:\n" for i in ids],
            "student_output": [f"Reply {i}" for i in ids],
            "finish_reason": ["stop" if i % 5 else "length" for i in ids],
            "prompt_tokens": rng.integers(5, 50, n),
            "reference_tokens": rng.integers(3, 40, n),
            "output_tokens": rng.integers(1, 40, n),
            "prompt_truncated": ids % 11 == 0,
            "rouge_l": [None if bad else float(v) for v, bad in zip(rouge, invalid)],
            "ce_loss": [None if bad else float(v) for v, bad in zip(loss, invalid)],
            "invalid_reason": ["empty prompt" if bad else None for bad in invalid],
        }
    )
    return rank(frame)


def make_run(
    root: Path,
    n: int = 40,
    *,
    seed: int = 0,
    invalid_ids: Sequence[int] = (),
    frame: pl.DataFrame | None = None,
    status: str = "complete",
    shards_done: Sequence[bool] | None = None,
    shard_size: int = 10,
) -> Path:
    """Write a run folder under ``root`` and return it."""
    frame = annotated_frame(n, seed, invalid_ids) if frame is None else frame
    root.mkdir(parents=True, exist_ok=True)
    shards = _write_shards(root, frame, shard_size, shards_done)
    if status == "complete":
        frame.write_parquet(root / "annotated.parquet")
    manifest = {
        "srdata_version": "0.1.0",
        "status": status,
        "config": {"model": {"model": "tiny-student"}, "metrics": {"rrf_k": 60}, "generation": {"max_new_tokens": 256}},
        "identity": {"model": {"name": "tiny-student", "fingerprint": "0123"}},
        "columns": {"prompt_column": "instruction", "response_column": "output", "input_column": None},
        "config_hash": "cafe1234",
        "shards": shards,
        "counts": {"rows": frame.height, "invalid": int(frame["invalid_reason"].is_not_null().sum())},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def _write_shards(root: Path, frame: pl.DataFrame, shard_size: int, shards_done: Sequence[bool] | None) -> list[dict]:
    (root / "shards").mkdir(exist_ok=True)
    starts = list(range(0, frame.height, shard_size))
    done_flags = list(shards_done) if shards_done is not None else [True] * len(starts)
    shards = []
    for index, (start, done) in enumerate(zip(starts, done_flags)):
        stop = min(start + shard_size, frame.height)
        name = f"shards/shard-{index:05d}.parquet"
        if done:
            frame.slice(start, stop - start).drop(["rank_rouge_l", "rank_ce_loss", "rrf_score", "difficulty_rank"]).write_parquet(root / name)
        shards.append({"index": index, "file": name, "start": start, "stop": stop, "done": done})
    return shards
