"""What bfloat16 changes in a scoring run, with float32 as the reference, on real rows and the real model.

Usage:
    python benchmarks/bench_dtype.py                                   # 128 held-out rows, one thread
    python benchmarks/bench_dtype.py --rows-t0 96 --rows-selfinst 0 --seeds 0   # a quicker look

Rows: ``bench_noise``'s held-out row set (``--row-set 1``: T0 rows from
``../shared/data/t0-train.parquet`` and SelfInst rows, none of them used to choose the
``noisy`` preset). Student: the real SmolLM2-135M-Instruct (``tests/real_models.py``),
``--template chat``, greedy, ``--max-new-tokens`` (32), ``--signals ifd``, srdata's default
limits. Each dtype scores the same rows with ``srdata.score(..., dtype=D)`` in a fresh
folder, ``--threads`` torch threads.

Printed, bfloat16 against float32:

* Spearman of ``ce_loss``, ``rouge_l`` and ``difficulty_rank`` (the ``paper`` ranking:
  ROUGE-L + CE), and of the ``noisy`` preset's ranks; the largest relative ``ce_loss``
  difference; greedy outputs identical;
* overlap of the dropped quarter (the export's cut: 4 stages, keep 3) under ``paper`` and
  ``noisy``;
* noise recall as ``bench_noise.py`` measures it (``--share`` of the rows get a corrupted
  reference: swap/truncate/shuffle/mixed; each dtype rescores the corrupted rows itself):
  share of corrupted rows in the dropped quarter, ``paper`` and ``noisy``, each dtype;
* scoring throughput of each run (manifest ``scoring_seconds``) and the load average.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_noise  # noqa: E402  (this folder: its row sets, corruptions, rescoring and recall)
from _common import finish  # noqa: E402  (this folder)
from bench_noise import DATA, REPO_ROOT  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

DTYPES = ("float32", "bfloat16")
RANKINGS = {"paper": "paper", "noisy": "noisy"}


def score_rows(rows: list[dict], work: Path, model: Path, dtype: str, max_new_tokens: int, threads: int) -> tuple[pl.DataFrame, dict]:
    """A fresh ``srdata.score`` run of ``rows`` in ``dtype``: its annotated table and manifest."""
    import torch

    import srdata

    torch.set_num_threads(threads)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = work / f"run-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    result = srdata.score(
        dataset=str(data), model=str(model), output=str(out), template="chat", prompt_column="prompt", response_column="response",
        input_column="input", max_new_tokens=max_new_tokens, signals="ifd", device="cpu", dtype=dtype, shard_size=32,
        progress=False, echo=lambda line: print(f"  [{dtype}] {line}", flush=True),
    )
    return result.to_polars().sort("srd_id"), result.manifest


class DtypeRescorer(bench_noise.Rescorer):
    """``bench_noise``'s rescorer (the run's own encoding) with the backend in ``dtype``."""

    def __init__(self, run_dir: Path, model: Path, threads: int, dtype: str) -> None:
        super().__init__(run_dir, model, threads)
        from srdata.backends.hf import HFBackend

        self.backend = HFBackend.from_pretrained(str(model), device="cpu", dtype=dtype)


def rescoring_gap(clean: pl.DataFrame, rescorer: DtypeRescorer, n: int = 6) -> float:
    """Largest relative ce_loss difference when a few clean rows are scored again the rescorer's way."""
    sample = clean.gather_every(max(1, clean.height // n)).head(n)
    got = rescorer.score(sample["prompt_text"].to_list(), sample["reference_text"].to_list(), sample["student_output"].to_list())
    return max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(got["ce_loss"], sample["ce_loss"]))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic)


def agreement(runs: dict[str, pl.DataFrame]) -> dict[str, float]:
    """bfloat16 against float32 on the clean rows."""
    ref, low = runs["float32"], runs["bfloat16"]
    ce_ref, ce_low = ref["ce_loss"].to_numpy(), low["ce_loss"].to_numpy()
    figures = {
        "spearman_ce_loss": spearman(ce_ref, ce_low),
        "spearman_rouge_l": spearman(ref["rouge_l"], low["rouge_l"]),
        "spearman_difficulty_rank_paper": spearman(ref["difficulty_rank"], low["difficulty_rank"]),
        "ce_loss_max_rel_diff": float(np.max(np.abs(ce_low - ce_ref) / np.maximum(np.abs(ce_ref), 1e-9))),
        "ce_loss_median_rel_diff": float(np.median(np.abs(ce_low - ce_ref) / np.maximum(np.abs(ce_ref), 1e-9))),
        "identical_outputs": int(sum(a == b for a, b in zip(ref["student_output"], low["student_output"]))),
        "rows": ref.height,
    }
    for name, spec in RANKINGS.items():
        ranks_ref, dropped_ref = bench_noise.dropped_mask(ref, spec)
        ranks_low, dropped_low = bench_noise.dropped_mask(low, spec)
        figures[f"spearman_{name}"] = spearman(ranks_ref, ranks_low)
        figures[f"dropped_overlap_{name}"] = int((dropped_ref & dropped_low).sum())
        figures[f"dropped_size_{name}"] = int(dropped_ref.sum())
    return figures


def noise_recall(clean: pl.DataFrame, rescorer: DtypeRescorer, plan: dict, cache: Path, seeds: list[int], variants: list[str]) -> dict:
    """Mean recall of the corrupted rows in the dropped quarter, per variant and ranking."""
    scores = bench_noise.corrupted_scores(clean, rescorer, plan, cache)
    results = bench_noise.evaluate(clean, scores, seeds, variants, RANKINGS)
    return {v: {name: float(np.mean(results["recall"][v][name])) for name in RANKINGS} for v in variants}


def main() -> None:
    parser = bench_noise.row_arguments(__doc__, (96, 32), (1, "bench_noise's disjoint row set (1: held out from the noisy preset)"),
                                       [0, 1], (1, "torch threads (1: steadier on a shared machine)"))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "srdata-bench-dtype")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real data folder {DATA} is absent")
    sys.path.insert(0, str(REPO_ROOT))
    from peaks import cpu_line
    from tests.real_models import build_real_model

    print(cpu_line(), flush=True)
    model = build_real_model("smollm2")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = bench_noise.load_rows(args.rows_t0, args.rows_selfinst, args.row_set)
    started = time.perf_counter()
    runs, manifests = {}, {}
    for dtype in DTYPES:
        runs[dtype], manifests[dtype] = score_rows(rows, args.work, model, dtype, args.max_new_tokens, args.threads)
    figures: dict = {"agreement": agreement(runs), "timings": {d: manifests[d]["timings"] for d in DTYPES}}

    references = runs["float32"]["reference_text"].to_list()
    n_corrupt = round(args.share * len(references))
    plan = {(seed, v): bench_noise.corruptions(references, v, seed, n_corrupt) for seed in args.seeds for v in args.variants}
    figures["recall"], figures["rescoring_gap"] = {}, {}
    for dtype in DTYPES:
        rescorer = DtypeRescorer(args.work / f"run-{dtype}", model, args.threads, dtype)
        figures["rescoring_gap"][dtype] = rescoring_gap(runs[dtype], rescorer)
        cache = args.work / f"corrupted-{dtype}.parquet"
        cache.unlink(missing_ok=True)
        figures["recall"][dtype] = noise_recall(runs[dtype], rescorer, plan, cache, args.seeds, args.variants)
        del rescorer

    a = figures["agreement"]
    print(f"\n{a['rows']} rows (row set {args.row_set}: {args.rows_t0} T0 + {args.rows_selfinst} SelfInst), SmolLM2-135M-Instruct, "
          f"chat template, {args.max_new_tokens} new tokens; bfloat16 against float32:")
    print("| figure | value |\n|---|---|")
    print(f"| Spearman ce_loss | {a['spearman_ce_loss']:.4f} |")
    print(f"| ce_loss relative difference, median / max | {a['ce_loss_median_rel_diff']:.2%} / {a['ce_loss_max_rel_diff']:.2%} |")
    print(f"| Spearman rouge_l | {a['spearman_rouge_l']:.4f} |")
    print(f"| Spearman difficulty_rank (paper) | {a['spearman_difficulty_rank_paper']:.4f} |")
    print(f"| Spearman difficulty_rank (noisy) | {a['spearman_noisy']:.4f} |")
    for name in RANKINGS:
        print(f"| dropped quarter shared ({name}) | {a[f'dropped_overlap_{name}']} of {a[f'dropped_size_{name}']} |")
    print(f"| greedy outputs identical | {a['identical_outputs']} of {a['rows']} |")
    print(f"\nnoise recall (corrupted rows in the dropped quarter, {args.share:.0%} corrupted, mean of seeds {args.seeds}):")
    print("| variant | paper f32 | paper bf16 | noisy f32 | noisy bf16 |\n|---|---|---|---|---|")
    for v in args.variants:
        r = figures["recall"]
        print(f"| {v} | {r['float32'][v]['paper']:.1%} | {r['bfloat16'][v]['paper']:.1%} | {r['float32'][v]['noisy']:.1%} | {r['bfloat16'][v]['noisy']:.1%} |")
    gaps = figures["rescoring_gap"]
    print(f"\nrescoring check (clean rows scored again the rescorer's way, largest relative ce_loss gap): "
          f"float32 {gaps['float32']:.1e}, bfloat16 {gaps['bfloat16']:.1e}")
    t = figures["timings"]
    print(f"scoring: float32 {t['float32']['rows_per_second']:.2f} rows/s, bfloat16 {t['bfloat16']['rows_per_second']:.2f} rows/s "
          f"({t['bfloat16']['rows_per_second'] / t['float32']['rows_per_second']:.2f}x; {args.threads} threads, not under a quiet machine's "
          f"conditions unless the load says so)")
    finish(started, args.json, figures, prefix=f"{cpu_line()}; ")


if __name__ == "__main__":
    main()
