"""Benchmark the Ray engine (1 and 2 replicas) against the local engine on the same rows.

Usage:
    python benchmarks/bench_ray.py [--rows 240] [--shard-size 30] [--max-new-tokens 16] [--data PATH]

Scores the first ``--rows`` real T0 rows of ``../shared/data/t0-train.parquet`` (prompt,
response; ``--template raw``) with a tiny random-weight GPT-2 (tokenizer trained on the
same rows), once with ``--engine local`` and once per Ray replica count, each into a
fresh run folder, and prints rows/s. A local Ray runtime with all of this machine's CPUs
is started once before the timings (as a running cluster would be) and its start-up
time is shown apart. Two figures per run:

* end to end: the whole ``srdata.score`` call (load data, tokenizer, model(s), score,
  rank, write); for Ray this includes starting the actors and loading one model each;
* scoring: the manifest's ``rows_per_second`` (local: the shard loop after the model is
  loaded; Ray: from submitting the shards to the last one written on the driver, so
  actor start-up and model loading are inside it).

The script fails (exit 1) unless every engine's ``annotated.parquet`` equals the local one.
A speed-up is not expected on a small shared machine: the figures document Ray's overhead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "t0-train.parquet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="T0 train parquet (template, prompt, response)")
    parser.add_argument("--rows", type=int, default=240, help="rows scored per run (default 240)")
    parser.add_argument("--shard-size", type=int, default=30, help="rows per shard = per Ray work item (default 30)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per row (default 16)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray replica counts (default 1 2)")
    args = parser.parse_args()

    if not args.data.is_file():
        sys.exit(f"bench_ray: real data file {args.data} is absent (it ships in ../shared/data/); pass --data PATH")
    try:
        import ray
    except ImportError:
        sys.exit("bench_ray: Ray is not installed: pip install 'srdata[ray]'")
    import polars as pl
    import torch

    import srdata
    from srdata.demo.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_ray."))
    rows = pl.read_parquet(args.data, columns=["template", "prompt", "response"]).head(args.rows)
    data = work / "t0.parquet"
    rows.write_parquet(data)
    model = build_tiny_model(work / "model", [f"{p}\n{r}" for p, r in zip(rows["prompt"], rows["response"])], arch="gpt2")
    common = dict(
        dataset=str(data), model=str(model), prompt_column="prompt", response_column="response", template="raw",
        max_new_tokens=args.max_new_tokens, shard_size=args.shard_size, device="cpu", dtype="float32", progress=False,
    )

    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    runs = [("local", None, dict(engine="local"))] + [("ray", r, dict(engine="ray", num_replicas=r)) for r in args.replicas]
    results = []
    for engine, replicas, extra in runs:
        out = work / f"run-{engine}-{replicas or 0}"
        t0 = time.perf_counter()
        result = srdata.score(output=str(out), **common, **extra)
        wall = time.perf_counter() - t0
        timings = result.manifest["timings"]
        results.append((engine, replicas, wall, timings, result.to_polars()))
    ray.shutdown()

    reference = results[0][4]
    identical = all(frame.equals(reference) for *_, frame in results)
    n = reference.height
    print(f"srdata bench_ray: {n} T0 rows ({args.data.name}), {-(-n // args.shard_size)} shards of {args.shard_size}, "
          f"max_new_tokens={args.max_new_tokens}, tiny GPT-2 (random weights), CPU float32")
    print(f"machine: {cpus} CPU(s) ({platform.machine()}, shared), torch threads (local engine) {torch.get_num_threads()}, "
          f"1 CPU per Ray replica; ray {version('ray')}, torch {version('torch')}, python {platform.python_version()}")
    print(f"local Ray runtime start (once, not in the figures below): {ray_start:.1f} s")
    print()
    print("| engine | replicas | end-to-end s | end-to-end rows/s | scoring s | scoring rows/s | vs local (scoring) |")
    print("|---|---|---|---|---|---|---|")
    base = results[0][3]["rows_per_second"]
    for engine, replicas, wall, timings, _ in results:
        rps = timings["rows_per_second"]
        print(f"| {engine} | {replicas or '-'} | {wall:.1f} | {n / wall:.2f} | {timings['scoring_seconds']:.1f} | {rps:.2f} | {rps / base:.2f}x |")
    print()
    print(f"annotated.parquet identical to the local engine for every run: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
