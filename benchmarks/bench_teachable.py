"""Choose `--rank-by teachable` on the testbed: which rows each ranking drops, once the teacher has scored them.

    python benchmarks/bench_teachable.py                       # quick testbed, 3 seeds (about 10 min on 2 cores)
    python benchmarks/bench_teachable.py --seeds 0 --out runs/bench-teachable

The plan, fixed before any figure (committed with this script):

* **Data**: the controlled testbed (``srdata.demo.testbed``, the repro's quick sizes but 800
  training pairs), 10% noisy references (``is_noisy``), four task families at four levels.
* **Models**: the repro's quick teacher (Llama 3 x 96, 200 steps on clean pairs: an
  *imperfect* teacher, which is the regime the teachable ranking is for) and student
  (Llama 2 x 64, 150 warm-up steps), seed per run.
* **Passes**: ``srdata score`` (student, 24 new tokens, the repro's 64 + 32 token limits), ``srdata teach`` (teacher,
  ``teacher_ce_loss``), then every candidate ranking in memory on the same annotated rows.
* **Candidates** (RRF, k = 60): ``paper`` = ``rouge_l:desc,ce_loss:asc``;
  ``teach-1`` = ``teacher_ce_loss:asc,rouge_l:desc,ce_loss:asc``;
  ``teach-2`` = ``teacher_ce_loss:asc:2,rouge_l:desc,ce_loss:asc``;
  ``teach-3`` = ``teacher_ce_loss:asc:3,rouge_l:desc,ce_loss:asc``.
* **Measures** on the dropped part of ``export --stages 4 --keep 3`` (the last quarter):
  ``noisy_recall`` (share of the noisy pairs dropped; chance 25%), and ``teachable_kept``:
  of the *teachable hard* rows, the clean rows that ``paper`` drops and the teacher finds
  easy (``teacher_ce_loss`` at most the median over clean rows), the share the ranking keeps.
  Also the Spearman correlation of the kept rows' order with ``paper``'s (easy-to-hard for the
  student is kept) and the dropped share per level.
* **Choice rule**: the candidate with the highest mean of ``noisy_recall`` and
  ``teachable_kept`` over seeds; on a tie within 0.01, the smaller teacher weight.

Prints one table per seed and the means; writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import polars as pl  # noqa: E402

import srdata  # noqa: E402
from _common import testbed_models  # noqa: E402  (this folder)
from srd_distill.testbed_models import student_recipe, teacher_recipe  # noqa: E402
from srdata.demo.testbed import TestbedSpec  # noqa: E402
from srdata.run.io import write_json_atomic  # noqa: E402

CANDIDATES = {
    "paper": "rouge_l:desc,ce_loss:asc",
    "teach-1": "teacher_ce_loss:asc,rouge_l:desc,ce_loss:asc",
    "teach-2": "teacher_ce_loss:asc:2,rouge_l:desc,ce_loss:asc",
    "teach-3": "teacher_ce_loss:asc:3,rouge_l:desc,ce_loss:asc",
}
SPEC = TestbedSpec(train_pairs=800, dev_pairs=32, test_pairs=160, teacher_pairs=8000, warmup_pairs=4000, noise_fraction=0.10)
TEACHER = teacher_recipe(hidden_size=96, num_layers=3, steps=200)
STUDENT = student_recipe(steps=150)


def dropped_after(frame: pl.DataFrame, stages: int = 4, keep: int = 3) -> int:
    """Rows ranked after this position are the part ``export --stages 4 --keep 3`` drops."""
    return keep * (frame.height // stages)


def evaluate(annotated: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Every candidate ranking on the same rows: noisy recall, teachable hard rows kept, order kept."""
    rows = annotated.filter(pl.col("invalid_reason").is_null())
    cut = dropped_after(rows)
    paper = srdata.rank(rows, rank_by=CANDIDATES["paper"])
    clean = paper.filter(~pl.col("is_noisy"))
    easy_for_teacher = clean["teacher_ce_loss"].median()
    teachable_hard = set(clean.filter((pl.col("difficulty_rank") > cut) & (pl.col("teacher_ce_loss") <= easy_for_teacher))["srd_id"].to_list())
    noisy = set(rows.filter(pl.col("is_noisy"))["srd_id"].to_list())
    out = {}
    for name, spec in CANDIDATES.items():
        ranked = srdata.rank(rows, rank_by=spec)
        dropped = set(ranked.filter(pl.col("difficulty_rank") > cut)["srd_id"].to_list())
        kept = ranked.filter(pl.col("difficulty_rank") <= cut).join(paper.select("srd_id", pl.col("difficulty_rank").alias("paper_rank")), on="srd_id")
        order = kept.select(pl.corr(pl.col("difficulty_rank").rank(), pl.col("paper_rank").rank(), method="spearman")).item()
        by_level = ranked.group_by("difficulty").agg((pl.col("difficulty_rank") > cut).mean().alias("dropped")).sort("difficulty")
        out[name] = {
            "rank_by": spec,
            "noisy_recall": len(dropped & noisy) / len(noisy),
            "teachable_kept": 1 - len(dropped & teachable_hard) / len(teachable_hard) if teachable_hard else None,
            "teachable_hard_rows": len(teachable_hard),
            "kept_order_vs_paper": order,
            "dropped_share_by_level": {str(r["difficulty"]): round(r["dropped"], 3) for r in by_level.iter_rows(named=True)},
        }
    return out


def run_seed(out: Path, seed: int) -> dict[str, dict[str, Any]]:
    files, teacher, student = testbed_models(out, SPEC, TEACHER, STUDENT, seed)
    run = out / f"run-{seed}"
    srdata.score(dataset=str(files.train), model=str(student), output=str(run), device="cpu", dtype="float32",
                 max_new_tokens=24, max_prompt_tokens=64, max_reference_tokens=32, progress=False)
    srdata.teach(run=run, teacher=str(teacher), device="cpu", dtype="float32", progress=False)
    return evaluate(pl.read_parquet(run / "annotated.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-teachable"))
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args.out, seed)
        print(f"\nseed {seed}: noisy_recall, teachable_kept, kept order vs paper (Spearman)")
        for name, r in results[seed].items():
            print(f"  {name:8s} {r['rank_by']:50s} {r['noisy_recall']:.3f}  {r['teachable_kept']:.3f}  {r['kept_order_vs_paper']:.3f}  "
                  f"(teachable hard rows: {r['teachable_hard_rows']}; dropped by level {r['dropped_share_by_level']})")
    means = {name: {m: statistics.fmean(results[s][name][m] for s in args.seeds) for m in ("noisy_recall", "teachable_kept", "kept_order_vs_paper")}
             for name in CANDIDATES}
    print("\nmeans over seeds:")
    for name, m in means.items():
        print(f"  {name:8s} noisy_recall {m['noisy_recall']:.3f}  teachable_kept {m['teachable_kept']:.3f}  "
              f"score {(m['noisy_recall'] + m['teachable_kept']) / 2:.3f}  kept order vs paper {m['kept_order_vs_paper']:.3f}")
    write_json_atomic(args.out / "results.json", {"spec": str(SPEC), "candidates": CANDIDATES, "seeds": results, "means": means})


if __name__ == "__main__":
    main()
