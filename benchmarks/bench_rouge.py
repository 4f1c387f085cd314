"""Benchmark srdata.rouge_l against Google's rouge-score on the real SelfInst pairs.

Usage:
    python benchmarks/bench_rouge.py [--repeat 5] [--rounds 3] [--data PATH]

Both implementations score the same (prediction, reference) pairs in the same process:
the 1,008 real pairs of ``../shared/data/selfinst-predictions.parquet`` repeated
``--repeat`` times. rouge-score (``RougeScorer(["rougeL"], use_stemmer=True)``, one
``score()`` call per pair) is timed once; srdata is timed ``--rounds`` times and the
best round is kept, both with a cold stem cache (emptied before each round, so every
distinct token is Porter-stemmed once inside the timing) and warm (cache already
filled, the steady state of a long-running job). The script fails (exit 1) unless
every srdata score equals rouge-score's exactly.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "selfinst-predictions.parquet"


def load_pairs(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        sys.exit(
            f"bench_rouge: real data file {path} is absent.\n"
            "It ships in the shared data folder beside the repository "
            "(../shared/data/selfinst-predictions.parquet); pass --data PATH to use another copy."
        )
    import polars as pl

    frame = pl.read_parquet(path, columns=["prediction", "reference"])
    return frame["prediction"].to_list(), frame["reference"].to_list()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SelfInst predictions parquet")
    parser.add_argument("--repeat", type=int, default=5, help="times the pairs are repeated (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="srdata timing rounds, best kept (default 3)")
    args = parser.parse_args()

    predictions, references = load_pairs(args.data)
    n_real = len(predictions)
    predictions = predictions * args.repeat
    references = references * args.repeat
    n = len(predictions)

    try:
        from rouge_score import rouge_scorer
    except ImportError:
        sys.exit("bench_rouge: rouge-score is not installed (pip install 'rouge-score==0.1.2')")
    from srdata.steps import rouge
    from srdata.steps.rouge import rouge_l

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; rouge-score {version('rouge-score')}, "
        f"nltk {version('nltk')}, rapidfuzz {version('rapidfuzz')}"
    )
    print(f"pairs: {n_real} real SelfInst pairs x {args.repeat} = {n:,}")

    # rouge-score: the reference implementation, one RougeScorer reused for all pairs.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    start = time.perf_counter()
    expected = [
        scorer.score(target=r, prediction=p)["rougeL"].fmeasure
        for p, r in zip(predictions, references)
    ]
    baseline_s = time.perf_counter() - start

    # srdata, cold: stem cache emptied before each round (nltk itself is already
    # imported by rouge-score above, so its ~1 s import is not counted).
    cold_s = float("inf")
    for _ in range(args.rounds):
        rouge._reset_caches()
        start = time.perf_counter()
        cold = rouge_l(predictions, references)
        cold_s = min(cold_s, time.perf_counter() - start)

    # srdata, warm: the cache filled by the last cold round.
    warm_s = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        warm = rouge_l(predictions, references)
        warm_s = min(warm_s, time.perf_counter() - start)

    # The opt-in Unicode tokenizer (different numbers on non-ASCII rows by design).
    unicode_s = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        rouge_l(predictions, references, tokenizer="unicode")
        unicode_s = min(unicode_s, time.perf_counter() - start)

    max_diff = max(
        max(abs(a - b) for a, b in zip(cold, expected)),
        max(abs(a - b) for a, b in zip(warm, expected)),
    )
    n_differ = sum(a != b for a, b in zip(cold, expected)) + sum(
        a != b for a, b in zip(warm, expected)
    )

    def line(name: str, seconds: float) -> str:
        return f"{name:<40} {seconds:9.3f} s {n / seconds:12,.0f} pairs/s"

    print(line("rouge-score RougeScorer loop", baseline_s))
    print(line(f"srdata.rouge_l cold cache (best/{args.rounds})", cold_s)
          + f"   x{baseline_s / cold_s:,.0f}")
    print(line(f"srdata.rouge_l warm cache (best/{args.rounds})", warm_s)
          + f"   x{baseline_s / warm_s:,.0f}")
    print(line(f"srdata.rouge_l unicode warm (best/{args.rounds})", unicode_s)
          + f"   x{baseline_s / unicode_s:,.0f}  (not rouge-score parity)")
    print(f"max |srdata - rouge-score| = {max_diff!r} over {2 * n:,} scores "
          f"({n_differ} not bit-identical)")
    if n_differ:
        print("FAIL: srdata.rouge_l differs from rouge-score", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
