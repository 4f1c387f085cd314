"""Peak driver memory of the Ray engine at 1M and 10M rows: lazy feeding (now) against the whole
pending set in the object store at once (the engine before #24, ``ray.data.from_arrow``).

Usage:
    python benchmarks/bench_ray_memory.py [--rows 1000000 10000000] [--shard-size 1000] [--baseline-max 10000000]

What is measured: the driver process of ``run_shards("ray", ...)`` only, the part of a run
that the engine owns (loading the data before and ranking after are the pipeline's). The
dataset is a memory-mapped Arrow file read through ``datasets`` (as ``srdata score`` reads
its input), alpaca-like rows of ~150 bytes of text. The scoring is trivial on purpose (each
replica returns the shard's ``srd_id`` and prompt text in the shard schema without running a
model): a tiny model scores a few rows per second here, so 10M rows could not be scored;
what the engine does with the rows (read, serialise, ship, receive, hand to ``on_shard``)
is the same. ``on_shard`` drops the frames (the pipeline writes them to disk).

Each engine runs in a fresh subprocess with its own local Ray runtime (2 CPUs, 2 replicas);
a thread samples ``/proc/self/status`` every 20 ms: ``VmRSS`` (all resident pages, the
mapped data file's pages and the object store's shared memory the driver touched included)
and ``RssAnon`` (the driver's own heap: what grows with the rows it holds). Peaks are
printed relative to the value just before ``run_shards``.

The baseline is the engine of commit 96e7b16 (``srdata/engines/ray.py`` read from git),
Ray Data over ``from_arrow`` of every pending shard; it needs ``ray[data]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "96e7b16"


class TrivialStudent:
    """Scores nothing: the shard's srd_ids and prompt text in the shard schema (what the engine ships back)."""

    def __init__(self, config, tokenizer) -> None:  # the open_student signature
        pass

    def __call__(self, rows, shard, progress=None):
        import polars as pl

        from srdata.shard import SHARD_SCHEMA

        n = shard.stop - shard.start
        columns = {name: [None] * n for name in SHARD_SCHEMA}
        columns["srd_id"] = list(range(shard.start, shard.stop))
        columns["prompt_text"] = rows["instruction"]
        columns["reference_text"] = rows["output"]
        columns["prompt_tokens"] = columns["reference_tokens"] = columns["output_tokens"] = [0] * n
        return pl.DataFrame(columns, schema=SHARD_SCHEMA)

    def close(self) -> None:
        pass


def make_data(rows: int, folder: Path) -> Path:
    """An Arrow stream file of ``rows`` alpaca-like rows, written in slices (the writer never holds them all)."""
    import pyarrow as pa

    path = folder / f"rows-{rows}.arrow"
    if path.exists():
        return path
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    step = 500_000
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, rows, step):
            ids = range(start, min(start + step, rows))
            writer.write_table(pa.table({
                "instruction": [f"Explain item {i} of the catalogue in two sentences, please." for i in ids],
                "input": [""] * len(ids),
                "output": [f"Item {i} is a thing. It is described here in a sentence of moderate length." for i in ids],
            }, schema=schema))
    return path


def measure(engine: str, data: Path, shard_size: int) -> dict:
    """In this (fresh) process: peak driver memory of one ``run_shards`` over every shard of ``data``."""
    import datasets
    import ray

    from srdata.config import build_config
    from srdata.engines import ShardJob
    from srdata.run.folder import plan_shards

    dataset = datasets.Dataset.from_file(str(data))  # memory-mapped, as srdata score reads its input
    config = build_config({"dataset": str(data), "model": "none", "output": "none", "engine": "ray", "num_replicas": 2,
                           "shard_size": shard_size})
    job = ShardJob(dataset, config, None, open_student=TrivialStudent)
    pending = plan_shards(len(dataset), shard_size)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if engine == "baseline":
        run = _baseline_module().run_ray
        ray.data.DataContext.get_current().enable_progress_bars = False
    else:
        from srdata.engines.ray import run_ray as run

    rows = {"n": 0}

    def on_shard(shard, frame, seconds):
        rows["n"] += frame.height

    before = _status()
    peaks = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            for key, value in _status().items():
                peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    run(job, pending, on_shard, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ray.shutdown()
    assert rows["n"] == len(dataset), f"{rows['n']} rows came back of {len(dataset)}"
    return {"engine": engine, "rows": len(dataset), "shards": len(pending), "seconds": round(seconds, 1),
            "before_mib": {k: round(v / 2**20) for k, v in before.items()},
            "peak_over_before_mib": {k: round((peaks[k] - before[k]) / 2**20) for k in before}}


def _status() -> dict[str, int]:
    wanted = {"VmRSS", "RssAnon"}
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) * 1024
    return values


def _baseline_module() -> types.ModuleType:
    """The Ray engine as it was before #24, read from git."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:srdata/engines/ray.py"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("srdata_engines_ray_before_24")
    exec(compile(source, f"{BASELINE_COMMIT}:srdata/engines/ray.py", "exec"), module.__dict__)  # noqa: S102 (our own code)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per shard (srdata's default: 1000)")
    parser.add_argument("--baseline-max", type=int, default=10_000_000, help="largest row count the baseline is run at")
    parser.add_argument("--measure", nargs=3, metavar=("ENGINE", "DATA", "SHARD_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        engine, data, shard_size = args.measure
        print(json.dumps(measure(engine, Path(data), int(shard_size))))
        return 0

    print(f"srdata bench_ray_memory: load average {os.getloadavg()[0]:.1f} (uptime), {os.cpu_count()} CPUs")
    print("| rows | engine | shards | seconds | driver VmRSS before MiB | peak VmRSS over it MiB | peak RssAnon over it MiB |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="srd-bench-mem-") as folder:
        for rows in args.rows:
            data = make_data(rows, Path(folder))
            for engine in ("lazy", "baseline") if rows <= args.baseline_max else ("lazy",):
                done = subprocess.run([sys.executable, __file__, "--measure", engine, str(data), str(args.shard_size)],
                                      capture_output=True, text=True, cwd=REPO_ROOT, env=env)
                if done.returncode != 0:
                    print(f"| {rows:,} | {engine} | failed: {done.stderr.strip().splitlines()[-1:]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {rows:,} | {engine} | {r['shards']} | {r['seconds']} | {r['before_mib']['VmRSS']} | "
                      f"{r['peak_over_before_mib']['VmRSS']} | {r['peak_over_before_mib']['RssAnon']} |", flush=True)
            Path(data).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
