"""``srdata demo``: the whole scoring step on a bundled sample, offline, in about a minute.

A tiny GPT-2 with a freshly trained tokenizer is warmed up on *half* of the bundled
SelfInst sample (so it knows those rows better), then scores all of it. The summary
shows whether SRD's difficulty ranking finds the rows the student has seen.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

import polars as pl

from .prompts import ALPACA, ALPACA_WITH_INPUT


def sample_path() -> Path:
    """The bundled sample: 64 SelfInst instruction/input/output rows (Apache-2.0)."""
    return Path(str(resources.files("srdata") / "data" / "demo.jsonl"))


def run_demo(output: str | Path, rows: int = 48, echo: Callable[[str], None] = print) -> pl.DataFrame:
    """Build the demo student, score ``rows`` sample rows into ``output``, print a summary."""
    from .backends.tiny import build_tiny_model, warm_up
    from .pipeline import score

    output = Path(output)
    records = [json.loads(line) for line in sample_path().read_text(encoding="utf-8").splitlines()][:rows]
    texts = [
        (ALPACA_WITH_INPUT.format(instruction=r["instruction"], input=r["input"]) if r["input"] else ALPACA.format(instruction=r["instruction"]))
        + r["output"]
        for r in records
    ]
    seen = texts[::2]  # the student is warmed up on every other row
    model_dir = output / "demo-student"
    if not (model_dir / "config.json").exists():
        echo(f"building a tiny GPT-2 student in {model_dir} (warm-up on {len(seen)} of {len(records)} rows)")
        build_tiny_model(model_dir, texts, arch="gpt2", vocab_size=1024, hidden_size=128, num_layers=2)
        warm_up(model_dir, seen, steps=40)
    data_file = output / "demo-sample.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    result = score(
        dataset=str(data_file), model=str(model_dir), output=str(output / "run"), max_new_tokens=48,
        shard_size=16, device="cpu", echo=echo,
    )
    annotated = result.to_polars().with_columns((pl.col("srd_id") % 2 == 0).alias("seen_in_warm_up"))
    summary = annotated.group_by("seen_in_warm_up").agg(
        pl.len().alias("rows"),
        pl.col("rouge_l").mean().round(3).alias("mean_rouge_l"),
        pl.col("ce_loss").mean().round(3).alias("mean_ce_loss"),
        pl.col("difficulty_rank").mean().round(1).alias("mean_difficulty_rank"),
    ).sort("seen_in_warm_up", descending=True)
    echo("\nSRD difficulty by whether the student saw the row during its warm-up (rank 1 = easiest):")
    echo(str(summary))
    easiest = annotated.sort("difficulty_rank").head(3).select("difficulty_rank", "instruction", "rouge_l", "ce_loss")
    echo("\neasiest rows:\n" + str(easiest))
    echo(f"\nannotated rows: {result.annotated_path}\nnext: srdata export {result.output}")
    return annotated
