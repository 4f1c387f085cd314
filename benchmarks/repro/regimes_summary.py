"""The two-regime comparison's verdicts, by the rules of PLAN.md, and the regime statement's threshold.

    python benchmarks/repro/regimes_summary.py            # reads results-{teachable,paper}.json and the run folders

Reads ``benchmarks/repro/results-teachable.json`` and ``results-paper.json`` (written by
``run.py --regime R``) and the scored, taught run of every seed (``runs/repro-R/seed-K/score``),
and writes ``benchmarks/repro/results-regimes.json`` and ``table-regimes.md``:

* every paired comparison of PLAN.md (B - A, C - A, C - B, D - A) per regime over the 6
  (seed, loss) pairs, with its verdict: *helps* (mean > 0 and >= 5 of 6 pairs > 0),
  *hurts* (mean < 0 and >= 5 of 6 < 0), else *no clear difference*; and whether SRD is
  *cheaper* (B's time with its passes below A's training time in all 6 pairs);
* the regime statement of ``srdata.curriculum.regime`` on every seed's run (the ``paper``
  ranking's cut, 4 stages keep 3) and the warning threshold: the midpoint between the
  regimes' mean teachable shares when every ``teachable`` seed lies above every ``paper`` seed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from srdata.run.io import write_json_atomic  # noqa: E402

REGIMES = ("teachable", "paper")
PAIRS = (("srd", "baseline"), ("srd_teachable", "baseline"), ("srd_teachable", "srd"), ("baseline_offline", "baseline"))
NAMES = {"srd": "B. SRD (paper)", "srd_teachable": "C. SRD (teachable)", "baseline": "A. full-data KD (online)",
         "baseline_offline": "D. full-data KD (offline logits)"}


def verdict(values: list[float]) -> str:
    """PLAN.md's rule on the 6 paired differences."""
    mean = statistics.fmean(values)
    if mean > 0 and sum(v > 0 for v in values) >= 5:
        return "helps"
    if mean < 0 and sum(v < 0 for v in values) >= 5:
        return "hurts"
    return "no clear difference"


def pair_rows(results: dict[str, Any]) -> dict[str, Any]:
    """Every pair's per-(seed, loss) differences (EM, ROUGE-L points), its verdict, and the time ratios."""
    out = {}
    for arm, other in PAIRS:
        em, rouge, time_ratio, with_passes = [], [], [], []
        for loss, pairs in results["summary"]["paired_differences"].items():
            d = pairs[f"{arm}_minus_{other}"]
            em += [v * 100 for v in d["exact_match"]["values"]]
            rouge += [v * 100 for v in d["rouge_l"]["values"]]
            time_ratio += d["train_seconds_ratio"]["values"]
            with_passes += d["train_plus_passes_seconds_ratio"]["values"]
        out[f"{arm}_minus_{other}"] = {
            "exact_match_points": em, "exact_match_mean": statistics.fmean(em), "verdict_exact_match": verdict(em),
            "rouge_l_points": rouge, "rouge_l_mean": statistics.fmean(rouge), "verdict_rouge_l": verdict(rouge),
            "train_seconds_ratio_mean": statistics.fmean(time_ratio), "with_passes_ratio_mean": statistics.fmean(with_passes),
        }
    return out


def srd_cheaper(results: dict[str, Any]) -> bool:
    """B's training + score/export time below A's training time in every (seed, loss) pair."""
    checks = []
    for seed in results["seeds"].values():
        scoring = seed["scoring"]
        for arms in seed["arms"].values():
            checks.append(arms["srd"]["train_seconds"] + scoring["score_seconds"] + scoring["export_seconds"] < arms["baseline"]["train_seconds"])
    return all(checks)


def statements(regime: str, runs: Path) -> list[dict[str, Any]]:
    """The regime statement of every seed's scored and taught run (the paper ranking's cut)."""
    import polars as pl

    from srdata.curriculum.regime import regime_of_cut

    found = []
    for score in sorted(runs.glob(f"repro-{regime}/seed-*/score")):
        annotated = score / "annotated.parquet"
        ranks = pl.read_parquet(annotated, columns=["difficulty_rank"])["difficulty_rank"]
        statement = regime_of_cut(annotated, ranks, 3 * (ranks.count() // 4))
        frame = pl.read_parquet(annotated, columns=["difficulty_rank", "is_noisy", "task"])
        dropped = frame.filter(pl.col("difficulty_rank") > 3 * (ranks.count() // 4))
        found.append({"seed": score.parent.name, **(statement or {}), "dropped_noise_share": float(dropped["is_noisy"].mean()),
                      "dropped_task_share": {t: float((dropped["task"] == t).mean()) for t in sorted(set(frame["task"].to_list()))}})
    return found


def main() -> int:
    runs = REPO / "runs"
    record: dict[str, Any] = {"plan": "benchmarks/repro/PLAN.md", "regimes": {}}
    for regime in REGIMES:
        results = json.loads((HERE / f"results-{regime}.json").read_text(encoding="utf-8"))
        record["regimes"][regime] = {"pairs": pair_rows(results), "srd_cheaper": srd_cheaper(results),
                                     "statements": statements(regime, runs),
                                     "teacher_exact_match_by_task": {t: v["exact_match"] for t, v in results["teacher"]["test"]["by_task"].items()},
                                     "wall_seconds": results["wall_seconds"], "load_average": results["machine"]}
    shares = {r: [s["teachable_share"] for s in record["regimes"][r]["statements"]] for r in REGIMES}
    separated = min(shares["teachable"]) > max(shares["paper"])
    record["threshold"] = {
        "teachable_shares": shares, "separated": separated,
        "warn_share": (statistics.fmean(shares["teachable"]) + statistics.fmean(shares["paper"])) / 2 if separated else 0.5,
        "rule": "midpoint between the regimes' mean teachable shares when every teachable-regime seed lies above every paper-regime "
                "seed (PLAN.md); else 0.5, labelled post hoc",
    }
    write_json_atomic(HERE / "results-regimes.json", record)
    lines = ["| regime | comparison | EM difference (points, mean; 6 pairs) | verdict (EM) | ROUGE-L difference | verdict (ROUGE-L) | train time ratio | with passes |",
             "|---|---|---|---|---|---|---|---|"]
    for regime in REGIMES:
        for name, p in record["regimes"][regime]["pairs"].items():
            arm, other = name.split("_minus_")
            lines.append(f"| {regime} | {NAMES[arm]} - {NAMES[other]} | {p['exact_match_mean']:+.1f} ({', '.join(f'{v:+.0f}' for v in p['exact_match_points'])}) "
                         f"| {p['verdict_exact_match']} | {p['rouge_l_mean']:+.1f} | {p['verdict_rouge_l']} | {p['train_seconds_ratio_mean']:.2f} | {p['with_passes_ratio_mean']:.2f} |")
    lines += ["", "| regime | seed | teachable share of the dropped part | median teacher CE dropped / kept | noise share of the dropped part |", "|---|---|---|---|---|"]
    for regime in REGIMES:
        for s in record["regimes"][regime]["statements"]:
            lines.append(f"| {regime} | {s['seed']} | {s['teachable_share']:.2f} | {s['median_ratio']:.2f} | {s['dropped_noise_share']:.2f} |")
    t = record["threshold"]
    lines += ["", f"Warning threshold: {t['warn_share']:.2f} ({'regimes separated' if separated else 'NOT separated: 0.5, post hoc'})."]
    (HERE / "table-regimes.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
