"""Benchmark SRD ranking and curriculum export against a reference-style implementation.

For each size (default 1M and 10M rows) it writes a synthetic finished run folder:
``srd_id``, scores with many ties (ROUGE-L on a 1e-4 grid, cross-entropy) and one text
column of realistic length (Zipf-distributed words, log-normal lengths, mean 300
characters by default, about an instruction-tuning response), then times, each in a
fresh process so that peak RSS belongs to that step alone:

- ``rank``: read the score columns and run ``srdata.steps.rank.rank`` (what ``srdata score``
  does at the end of a run);
- ``rank-polars``: the same with the packed-key sort of ``srdata.steps.order`` turned off,
  so every sort is polars' stable ``arg_sort_by`` (same ranks): what the packing saves;
- ``export``: ``export_curriculum(run, rrf_k=60)``: re-rank and write the paper's three
  cumulative stages as parquet (the whole ``srdata export`` path, text included), with a
  breakdown of its wall time by public step: re-rank (``ranks_in_file_order``), read the
  rows and split them into their parts' scratch files (``split_into_parts``), write the
  stage files from the parts (the rest of ``encode_stages``), and curriculum.json
  (``curriculum_summary``). The stage files' SHA-256 is part of writing them (each hashed on
  its writer thread once written);
- ``floor``: the work any export of the same stages must do, without the ranking, the
  routing and the cumulative copies: read every row once (polars), zip on rank columns
  computed before the timer starts, and encode 75% of the rows once with the stage files'
  writer (codec, level, encodings, row-group size) on two writer threads. The export's
  wall time over the floor's is what ranking, routing and writing the cumulative stages
  (1.5x the floor's rows) cost;
- ``export-jsonl``: the same, written as JSONL (at the reference sizes only);
- ``reference``: what the authors' ``tools/rank.py`` does, in plain Python: rows as
  dicts, three ``sorted`` calls, ``json.dumps`` of the three cumulative stages to JSONL.
  It also checks that ``rank(..., ties="reference")`` gives its exact order.

Every step starts from a settled page cache (``os.sync()``); ``--repeat N`` runs each
step N times and shows the median run (the machine is shared and its speed drifts by
~20% within an hour: compare the export with the floor measured in the same call).

Usage:
    python benchmarks/bench_rank.py                       # 1M and 10M rows
    python benchmarks/bench_rank.py --repeat 3 --compression zstd lz4   # what benchmarks/README.md records
    python benchmarks/bench_rank.py --rows 100000 --reference-rows 100000
    python benchmarks/bench_rank.py --rows 10000000 --reference-rows --steps export floor --compression lz4
    python benchmarks/bench_rank.py --rows 2000000 --steps export --workdir /tmp/bench   # keeps the run for reuse
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 100_000
STAGES, KEEP, RRF_K = 4, 3, 60
STEPS = ("rank", "rank-polars", "export", "floor", "export-jsonl", "reference")
TARGET_OVER_FLOOR, TARGET_RSS_GB, TARGET_OVER_REFERENCE = 2.5, 3.0, 5.0  # issue 17: at 10M, at 10M, at 1M rows


# --- synthetic run -----------------------------------------------------------------------


def word_corpus(rng: np.random.Generator, words: int = 12_000_000) -> np.ndarray:
    """Bytes of Zipf-distributed pseudo-words, sliced into the rows' texts."""
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(n))) for n in rng.integers(2, 10, 5000)]
    weights = 1 / np.arange(1, len(vocabulary) + 1)
    picks = rng.choice(len(vocabulary), size=words, p=weights / weights.sum())
    return np.frombuffer(" ".join(vocabulary[i] for i in picks).encode(), dtype=np.uint8)


def text_chunk(rng: np.random.Generator, corpus: np.ndarray, rows: int, mean_chars: int) -> pa.Array:
    lengths = np.clip(rng.lognormal(np.log(mean_chars) - 0.5, 1.0, rows), 1, 4000).astype(np.int32)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    start = int(rng.integers(0, len(corpus) - int(offsets[-1])))
    data = corpus[start : start + int(offsets[-1])].copy()
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))


def write_run(folder: Path, rows: int, mean_chars: int, seed: int = 0) -> Path:
    """A finished run folder with ``rows`` scored rows (no ranks yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = word_corpus(rng)
    writer = None
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        rouge = np.round(rng.random(n), 4)
        table = pa.table({
            "srd_id": np.arange(start, start + n, dtype=np.int64),
            "prompt_text": text_chunk(rng, corpus, n, mean_chars),
            "rouge_l": rouge,
            "ce_loss": 3.0 - 2.0 * rouge + rng.gamma(2.0, 0.4, n),
        })
        writer = writer or pq.ParquetWriter(folder / "annotated.parquet", table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()
    manifest = {"srdata_version": "bench", "status": "complete", "config": {"rrf_k": RRF_K}, "config_hash": "bench", "shards": [], "counts": {"rows": rows}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# --- timed steps (each runs in its own process) -------------------------------------------


def step_rank(run: Path, out: Path, packed: bool = True) -> dict:
    import srdata.steps.order
    from srdata.steps.rank import rank

    if not packed:  # the one private hook: no public switch exists for an alternative that is not shipped
        srdata.steps.order._packed_arg_sort = lambda *args, **kwargs: None
    scores = pl.read_parquet(run / "annotated.parquet", columns=["srd_id", "rouge_l", "ce_loss"])
    ranked = rank(scores, RRF_K)
    return {"ranked_rows": ranked["difficulty_rank"].count()}


def step_export(run: Path, out: Path, fmt: str, compression: str) -> dict:
    import srdata.curriculum.export as export

    phases = time_phases(export, {"rank": "ranks_in_file_order", "write_stages": "encode_stages", "read_split": "split_into_parts",
                                  "summary": "curriculum_summary"})
    folder = export.export_curriculum(run, stages=STAGES, keep=KEEP, out=out, fmt=fmt, rrf_k=RRF_K, compression=compression)
    phases["write_stage_files"] = phases.pop("write_stages") - phases["read_split"]
    return {"written_bytes": sum(p.stat().st_size for p in folder.glob("stage-*")), "breakdown_s": {k: round(v, 2) for k, v in phases.items()}}


def prepare_floor(run: Path) -> pl.DataFrame:
    """The rank columns the floor writes, computed before its timer starts (file order)."""
    from srdata.steps.rank import rank

    ranked = rank(pl.read_parquet(run / "annotated.parquet", columns=["srd_id", "rouge_l", "ce_loss"]), RRF_K)
    return ranked.select("rank_rouge_l", "rank_ce_loss", "rrf_score", "difficulty_rank")


def step_floor(run: Path, out: Path, compression: str, ranks: pl.DataFrame) -> dict:
    """Decode every row once and encode 75% of them once, with the stage files' columns and
    encoder settings, on two writer threads: no ranking, no routing, no cumulative copies."""
    import queue
    import threading

    from srdata.curriculum.export import ROW_GROUP_BYTES
    from srdata.curriculum.stage_files import compression_level, parquet_writer

    out.mkdir(parents=True, exist_ok=True)
    columns = {**pl.scan_parquet(run / "annotated.parquet").collect_schema(), **ranks.schema, "stage": pl.Int64}
    schema = pl.DataFrame(schema=columns).to_arrow().schema
    queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _ in range(2)]

    def write(q: queue.Queue, path: Path) -> None:
        with parquet_writer(path, schema, compression, compression_level(compression)) as writer:
            pending, size = [], 0
            while (frame := q.get()) is not None:
                pending.append(frame.to_arrow())
                size += frame.estimated_size()
                if size >= ROW_GROUP_BYTES:
                    writer.write_table(pa.concat_tables(pending))
                    pending, size = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))

    threads = [threading.Thread(target=write, args=(q, out / f"part-{i}.parquet")) for i, q in enumerate(queues)]
    for thread in threads:
        thread.start()
    offset = 0
    for i, batch in enumerate(pl.scan_parquet(run / "annotated.parquet").collect_batches(maintain_order=True)):
        rows = batch.hstack(ranks.slice(offset, batch.height)).with_columns(stage=pl.lit(0, dtype=pl.Int64))
        queues[i % 2].put(rows.slice(0, batch.height * KEEP // STAGES))
        offset += batch.height
    for q in queues:
        q.put(None)
    for thread in threads:
        thread.join()
    return {"written_bytes": sum(p.stat().st_size for p in out.glob("part-*"))}


def time_phases(module, names: dict[str, str]) -> dict[str, float]:
    """Wrap public functions of ``module`` so that their wall seconds add up in the returned dict."""
    seconds = dict.fromkeys(names, 0.0)
    for label, name in names.items():
        def timed(*args, _inner=getattr(module, name), _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - started
        setattr(module, name, timed)
    return seconds


def step_reference(run: Path, out: Path) -> dict:
    """The authors' tools/rank.py, over the same rows: Python dicts, sorts, JSONL dumps."""
    data = pq.read_table(run / "annotated.parquet").to_pylist()
    # The authors' chain: each stable sort starts from the order the previous one left.
    for column, descending in (("rouge_l", True), ("ce_loss", False)):
        data = sorted(data, key=lambda x, column=column: x[column], reverse=descending)
        for i, row in enumerate(data):
            row[f"rank_{column}"] = i + 1
    for row in data:
        row["rrf_score"] = 1 / (int(row["rank_rouge_l"]) + RRF_K) + 1 / (int(row["rank_ce_loss"]) + RRF_K)
    data = sorted(data, key=lambda x: x["rrf_score"], reverse=True)
    for i, row in enumerate(data):
        row["difficulty_rank"] = i + 1
    out.mkdir(parents=True, exist_ok=True)
    each_stage = len(data) // STAGES
    for stage in range(KEEP):
        with open(out / f"stage-{stage}.jsonl", "w") as handle:
            for row in data[: (stage + 1) * each_stage]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"order": [row["srd_id"] for row in data]}


def check_reference_order(run: Path, order: list[int]) -> bool:
    from srdata.steps.rank import rank

    scores = pl.read_parquet(run / "annotated.parquet", columns=["srd_id", "rouge_l", "ce_loss"])
    ours = rank(scores, RRF_K, ties="reference").sort("difficulty_rank")["srd_id"].to_list()
    return ours == order


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, does not carry over
    the parent's peak through fork + exec, so each step is measured on its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): unlike wall time, it barely
    moves when other jobs share the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(step: str, run: Path, out: Path, compression: str) -> None:
    """Entry point of a child process: time one step, report seconds and peak RSS."""
    import srdata.curriculum.export  # noqa: F401  imports are not part of the timed work
    import srdata.steps.rank  # noqa: F401

    floor_ranks = prepare_floor(run) if step == "floor" else None  # not part of the timed work
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if step in ("rank", "rank-polars"):
        extra = step_rank(run, out, packed=step == "rank")
    elif step in ("export", "export-jsonl"):
        extra = step_export(run, out, "jsonl" if step == "export-jsonl" else "parquet", compression)
    elif step == "floor":
        extra = step_floor(run, out, compression, floor_ranks)
    else:
        extra = step_reference(run, out)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    peak_gb = peak_rss_gb()
    if step == "reference":
        extra = {"same_order_as_ties_reference": check_reference_order(run, extra.pop("order"))}
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gb": peak_gb, **extra}))


def time_step(step: str, run: Path, out: Path, compression: str, repeat: int = 1) -> dict:
    """Run a step ``repeat`` times, each in a fresh process; the run with the median wall time.

    Every run starts from a settled page cache (``os.sync()``): a run folder is written
    long before it is exported, and dirty pages left by the previous step would otherwise
    throttle this one's writes. ``wall_s_all`` lists every run's wall seconds.
    """
    results = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        command = [sys.executable, __file__, "--child", step, str(run), str(out), compression]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{step} failed:\n{result.stderr}")
        results.append(json.loads(result.stdout.strip().splitlines()[-1]))
    results.sort(key=lambda r: r["seconds"])
    median = results[(len(results) - 1) // 2]
    return {**median, "wall_s_all": [round(r["seconds"], 2) for r in results]} if repeat > 1 else median


# --- driver ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--reference-rows", type=int, nargs="*", default=[1_000_000], help="sizes at which the reference-style run is timed too")
    parser.add_argument("--text-chars", type=int, default=300, help="mean length of the text column")
    parser.add_argument("--compression", nargs="+", default=["zstd"], help="parquet compression(s) of the stage files; the export step runs once per codec (srdata export's default: zstd)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the median run is shown, with every run's wall time (the machine is shared)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to time (default: all; export-jsonl and reference only at --reference-rows)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs are written and kept for reuse by later calls with the same --text-chars (default: a temporary folder, removed)")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "RUN", "OUT", "COMPRESSION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.child[3])
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="srd-bench-rank-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"python {platform.python_version()}, polars {pl.__version__}; text column mean {args.text_chars} chars; "
          f"stage files: parquet {', '.join(args.compression)}; median of {args.repeat} run(s) per step")
    print(f"{'rows':>11}  {'step':<13} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12}  notes")
    results: dict[tuple[int, str], dict] = {}
    try:
        for rows in args.rows:
            run = workdir / f"run-{rows}"
            if not (run / "manifest.json").is_file():  # a kept --workdir reuses its runs
                write_run(run, rows, args.text_chars)
            size_gb = (run / "annotated.parquet").stat().st_size / 1e9
            steps = [s for s in args.steps if s in ("rank", "rank-polars", "export", "floor") or rows in args.reference_rows]
            for step, compression in [(s, c) for s in steps for c in (args.compression if s in ("export", "floor") else args.compression[:1])]:
                label = f"{step} {compression}" if step in ("export", "floor") and len(args.compression) > 1 else step
                result = time_step(step, run, workdir / f"out-{rows}-{step}", compression, args.repeat)
                results[rows, label] = {**result, "compression": compression}
                notes = {k: v for k, v in result.items() if k not in ("seconds", "cpu_seconds", "peak_rss_gb")}
                if step == "export":
                    notes["input_parquet_gb"] = round(size_gb, 2)
                if step == "rank-polars" and (rows, "rank") in results:
                    notes["polars_over_packed"] = round(result["seconds"] / results[rows, "rank"]["seconds"], 2)
                if step == "floor" and (rows, label.replace("floor", "export")) in results:
                    notes["export_over_floor"] = round(results[rows, label.replace("floor", "export")]["seconds"] / result["seconds"], 2)
                print(f"{rows:>11,}  {label:<13} {result['seconds']:>8.2f} {result['cpu_seconds']:>8.2f} {result['peak_rss_gb']:>12.2f}  {json.dumps(notes) if notes else ''}", flush=True)
                shutil.rmtree(workdir / f"out-{rows}-{step}", ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(run, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summarise(results)


def summarise(results: dict[tuple[int, str], dict]) -> None:
    """The issue-17 targets, each checked against figures measured in this call."""
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    for (rows, step), result in sorted(results.items()):
        if step == "rank-polars" and (rows, "rank") in results:
            ratio = result["seconds"] / results[rows, "rank"]["seconds"]
            print(f"{rows:,} rows: rank with polars' stable arg_sort_by takes {ratio:.2f}x the packed-key sort's wall time (kept only if >= 2x)")
        if step == "reference":
            for ours in [s for (r, s) in results if r == rows and s.startswith("export")]:
                ratio = result["seconds"] / results[rows, ours]["seconds"]
                memory = result["peak_rss_gb"] / results[rows, ours]["peak_rss_gb"]
                verdict = "meets" if ratio >= TARGET_OVER_REFERENCE else "misses"
                print(f"{rows:,} rows: reference-style takes {ratio:.1f}x the wall time and {memory:.1f}x the peak memory "
                      f"of srdata {ours}: {verdict} the >= {TARGET_OVER_REFERENCE:g}x target")
        floor = results.get((rows, step.replace("export", "floor")))
        if step.startswith("export") and step != "export-jsonl" and floor is not None:
            ratio = result["seconds"] / floor["seconds"]
            verdict = "meets" if ratio <= TARGET_OVER_FLOOR and result["peak_rss_gb"] <= TARGET_RSS_GB else "misses"
            print(f"{rows:,} rows: export {result['compression']} (re-rank included) {result['seconds']:.1f} s = {ratio:.2f}x the "
                  f"encode-once floor ({floor['seconds']:.1f} s), peak RSS {result['peak_rss_gb']:.2f} GB: {verdict} the "
                  f"<= {TARGET_OVER_FLOOR:g}x / <= {TARGET_RSS_GB:g} GB target")


if __name__ == "__main__":
    main()
