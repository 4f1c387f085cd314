"""Score shards on a Ray cluster with Ray Data: a pool of actors, each holding one backend.

How a run flows:

* The driver (the process running ``srdata score``) loads the dataset, plans the shards
  and skips the finished ones exactly as the local engine does.
* Each pending shard becomes one row of a Ray Dataset (its index, srd_id range and its
  input rows as an Arrow IPC blob), in a block of its own, so one shard is one unit of
  work that Ray can schedule, retry and never split.
* ``map_batches`` runs :class:`ShardScorer` on a fixed pool of actors
  (``ActorPoolStrategy(size=num_replicas)``, ``num_gpus=gpus_per_replica``); each actor
  calls ``job.open_student`` once (the tokenizer and one backend) and scores whole
  shards with it: the same code, on the same rows, as the local engine, so the values
  are identical.
* The scored frame goes back to the driver, which writes the shard file atomically, marks
  it done in the manifest and moves the progress bar. Writing on the driver means the
  output folder only has to exist where ``srdata score`` runs (no shared file system
  for the output), and there is a single writer per run folder.

Faults: Ray Data starts its actors with ``max_restarts=-1`` and ``max_task_retries=-1``
(its defaults; srdata keeps them), so an actor that dies (OOM, segfault, a lost node) is
restarted, reloads its model, and the shard it was scoring is retried. A shard is
idempotent: its rows are fixed by its srd_id range and its file is written atomically
by index, once; a repeated report of a shard is ignored. No row is lost or duplicated,
and the finished shards of a run that fails anyway are kept for the next ``srdata score``.
Exceptions raised by the scoring code itself are not retried (they would fail again):
the run stops with the error and resumes from the finished shards.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import polars as pl

from srdata.run.folder import Shard
from srdata.engines.job import OnShard, OpenStudent, ShardJob

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'srdata[ray]'"


class RayUnavailableError(ImportError, ValueError):
    """``--engine ray`` was asked for and Ray Data cannot be imported."""


def import_ray() -> Any:
    """Import Ray (with Ray Data) or explain how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library ships in the ray[data] extra)
    except ImportError as err:
        raise RayUnavailableError(
            f"--engine ray needs Ray Data, which is not installed ({err}). Install the optional extra: "
            f"{INSTALL_HINT}, or run with --engine local"
        ) from err
    return ray


class ShardScorer:
    """Ray Data UDF: one instance per actor, one backend per instance, whole shards per call.

    The input batch holds rows ``shard, start, stop, rows`` (``rows``: the shard's input
    table as Arrow IPC bytes); the output holds ``shard, frame`` (the scored frame as
    Arrow IPC bytes) and ``seconds`` (time spent scoring on the actor).
    """

    def __init__(self, config: dict[str, Any], mapping: Any, template: str, open_student: OpenStudent) -> None:
        from srdata.config import ScoreConfig

        self.student = open_student(ScoreConfig.model_validate(config), mapping, template, None)  # its own tokenizer

    def score(self, shard: Shard, rows: dict[str, list]) -> pl.DataFrame:
        return self.student(rows, shard)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out: dict[str, list] = {"shard": [], "frame": [], "seconds": []}
        for index, start, stop, blob in zip(*(batch[c].to_pylist() for c in ("shard", "start", "stop", "rows"))):
            t0 = time.perf_counter()
            shard = Shard(index, start, stop)
            rows = pa.ipc.open_stream(blob).read_all().to_pydict()
            frame = self.score(shard, rows)
            out["shard"].append(index)
            out["frame"].append(_frame_to_ipc(frame))
            out["seconds"].append(time.perf_counter() - t0)
        return pa.table(out, schema=pa.schema([("shard", pa.int64()), ("frame", pa.large_binary()), ("seconds", pa.float64())]))


def run_ray(job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """Score ``pending`` on Ray; ``on_shard`` runs on the driver, once per shard, as each finishes."""
    ray = import_ray()
    settings = job.config.engine
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.ray_address, log_to_driver=progress)
    try:
        replicas = _replicas(ray, settings, len(pending), strict=started_here)
        _score_on_ray(ray, job, pending, on_shard, replicas, progress)
    finally:
        if started_here:
            ray.shutdown()


def _score_on_ray(ray: Any, job: ShardJob, pending: list[Shard], on_shard: OnShard, replicas: int, progress: bool) -> None:
    from srdata.engines.progress import ProgressBar

    settings = job.config.engine
    log.info("scoring %d shards on Ray with %d replica(s)", len(pending), replicas)
    scored = _input_dataset(ray, job, pending).map_batches(
        ShardScorer,
        fn_constructor_args=(job.config.model_dump(), job.mapping, job.template, job.open_student),
        batch_size=1,  # one shard per call: the unit of work and of retry
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=settings.cpus_per_replica,
        num_gpus=settings.gpus_per_replica or None,
    )
    by_index = {s.index: s for s in pending}
    done: set[int] = set()
    context = ray.data.DataContext.get_current()
    ray_bars, context.enable_progress_bars = context.enable_progress_bars, False  # the driver shows its own bar
    bar = ProgressBar(sum(s.stop - s.start for s in pending), enabled=progress)
    last = time.perf_counter()
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for index, blob in zip(batch["shard"].to_pylist(), batch["frame"].to_pylist()):
                if index in done:  # reported twice (a retried task): same rows, already written
                    continue
                shard = by_index[index]
                frame = _frame_from_ipc(blob, shard)
                now = time.perf_counter()
                on_shard(shard, frame, now - last)  # wall time on the driver: start-up included in the first
                last = now
                done.add(index)
                bar.update_work(shard.stop - shard.start, _tokens(frame))
    finally:
        context.enable_progress_bars = ray_bars
        bar.close()
    missing = sorted(set(by_index) - done)
    if missing:
        raise RuntimeError(f"Ray finished without scoring shard(s) {missing}; re-run `srdata score` to resume them")


def _input_dataset(ray: Any, job: ShardJob, pending: list[Shard]) -> Any:
    """One single-row block per pending shard: index, srd_id range, input rows (Arrow IPC)."""
    import pyarrow as pa

    arrow = job.dataset.with_format("arrow")
    blocks = [
        pa.table({"shard": [s.index], "start": [s.start], "stop": [s.stop], "rows": pa.array([_table_to_ipc(arrow[s.start : s.stop])], pa.large_binary())})
        for s in pending
    ]
    return ray.data.from_arrow(blocks)


def _replicas(ray: Any, settings: Any, n_shards: int, strict: bool) -> int:
    """``--num-replicas``, or as many actors as the cluster's CPUs/GPUs fit; never more than shards.

    A request the cluster cannot fit is an error on a Ray runtime srdata started itself
    (it would wait forever) and a warning on a cluster (an autoscaler may add nodes).
    """
    available = ray.cluster_resources()
    gpus, cpus = settings.gpus_per_replica, settings.cpus_per_replica
    fits = int(available.get("GPU", 0) // gpus) if gpus else int(available.get("CPU", 0) // cpus)
    replicas = settings.num_replicas or max(fits, 1)
    if replicas > fits:
        need = f"{replicas} replica(s) x {gpus:g} GPU" if gpus else f"{replicas} replica(s) x {cpus:g} CPU"
        have = f"{available.get('GPU', 0):g} GPU(s)" if gpus else f"{available.get('CPU', 0):g} CPU(s)"
        message = f"the Ray cluster has {have}, {need} do not fit; lower --num-replicas or --gpus-per-replica"
        if strict:
            raise ValueError(message)
        log.warning("%s (waiting for the cluster to grow)", message)
    return min(replicas, n_shards)


def _tokens(frame: pl.DataFrame) -> int:
    return int(frame.select(pl.sum("prompt_tokens") + pl.sum("reference_tokens") + pl.sum("output_tokens")).item() or 0)


def _table_to_ipc(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _frame_to_ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc_stream(buffer)
    return buffer.getvalue()


def _frame_from_ipc(blob: bytes, shard: Shard) -> pl.DataFrame:
    frame = pl.read_ipc_stream(io.BytesIO(blob))
    expected = list(range(shard.start, shard.stop))
    if frame["srd_id"].to_list() != expected:  # a guard: a shard's file holds exactly its rows
        raise RuntimeError(f"shard {shard.index} came back with rows other than srd_id {shard.start}..{shard.stop - 1}")
    return frame
