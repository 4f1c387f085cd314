"""Score shards on a Ray cluster: a pool of actors (replicas), each holding one backend, fed lazily.

How a run flows:

* The driver (the process running ``srdata score``) loads the dataset, plans the shards
  and skips the finished ones exactly as the local engine does.
* It waits (``--wait-for-resources``) until some node can host a replica, then starts
  the replicas (:class:`srdata.engines.replica.ShardScorer`, ``num_gpus=gpus_per_replica``).
  Each one checks its node first (the model folder, sent as an absolute path, and
  ``--device``), fails at once naming the node when it cannot run, then loads the student
  and reports its node, backend, device, model fingerprint and package versions; replicas
  that differ are refused and the records go into the manifest (``replicas``). On a resume,
  a replica is also compared with the records of the call that scored the finished shards
  (kept in the manifest) and refused when it would compute otherwise (backend, device, dtype,
  model, versions).
* Shards are fed lazily: a replica holds at most :data:`DEPTH` shards at a time, so the
  driver's object store holds a few shards' rows, never the whole pending set.
* The scored frame goes back to the driver, which writes the shard file atomically, marks
  it done in the manifest and moves the progress bar: the output folder only has to exist
  where ``srdata score`` runs, with a single writer per run folder.

Faults: replicas are restarted by Ray (``max_restarts=-1``) when their process or node
dies; the shards they held go back to the queue and are scored by the replicas that are
alive. A shard is idempotent (its rows are fixed by its srd_id range, its file is written
atomically, once; a repeated report is ignored), so no row is lost or duplicated. When no
node can host a replica any more the run waits visibly, then fails with the finished
shards kept. Exceptions raised by the scoring code itself are not retried (they would
fail again): the run stops with the error and resumes from the finished shards.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import deque
from typing import Any

import polars as pl

from srdata.engines.cluster import CLUSTER_WAIT_SECONDS, ResourceWait, cluster_fit, wait_for_nodes
from srdata.engines.job import OnShard, ShardJob
from srdata.engines.replica import ShardScorer, absolute_model, node_name, replica_mismatch, resume_mismatch
from srdata.run.folder import Shard

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'srdata[ray]'"
#: Shards a replica holds at once: one it scores, one whose rows are already on its node.
DEPTH = 2
#: Seconds between two looks at the cluster while no shard finishes.
POLL = 1.0


class RayUnavailableError(ImportError, ValueError):
    """``--engine ray`` was asked for and Ray cannot be imported."""


def import_ray() -> Any:
    """Import Ray or explain how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            f"--engine ray needs Ray, which is not installed ({err}). Install the optional extra: "
            f"{INSTALL_HINT}, or run with --engine local"
        ) from err
    return ray


def run_ray(job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """Score ``pending`` on Ray; ``on_shard`` runs on the driver, once per shard, as each finishes."""
    ray = import_ray()
    from srdata.engines.noise import quiet_ray

    settings = job.config.engine
    started_here = not ray.is_initialized()
    with quiet_ray():
        if started_here:
            ray.init(address=settings.ray_address, log_to_driver=False, logging_level=logging.WARNING)
        try:
            fixed = _local_runtime(ray)  # a Ray started in this process never grows; a cluster's autoscaler may add nodes
            seconds = settings.wait_for_resources
            if seconds is None:
                seconds = 0.0 if fixed else CLUSTER_WAIT_SECONDS
            wait = ResourceWait(seconds, settings.cpus_per_replica, settings.gpus_per_replica)
            wait_for_nodes(ray, wait)
            replicas = _replicas(ray, settings, len(pending), strict=fixed)
            _Pool(ray, job, replicas, wait).run(pending, on_shard, progress)
        finally:
            if started_here:
                ray.shutdown()


class _Pool:
    """The replicas of one run and the shards they hold; the driver's loop that feeds and watches them."""

    def __init__(self, ray: Any, job: ShardJob, replicas: int, wait: ResourceWait) -> None:
        self.ray, self.job, self.wait = ray, job, wait
        settings = job.config.engine
        config = job.config.model_copy(deep=True)
        config.model.path = absolute_model(config.model.path)  # the nodes must not resolve it against their own folder
        actor = ray.remote(ShardScorer).options(
            num_cpus=settings.cpus_per_replica, num_gpus=settings.gpus_per_replica, max_restarts=-1, max_task_retries=0
        )
        args = (config.model_dump(), job.open_student, settings.gpus_per_replica)
        log.debug("scoring on Ray with %d replica(s)", replicas)
        self.actors = [actor.remote(*args) for _ in range(replicas)]
        self.arrow = job.dataset.with_format("arrow")  # memory-mapped: a shard's rows are read when it is sent
        self.ready: set[int] = set()  # replicas that reported in and are alive as far as the driver knows
        self.probes = {a.info.remote(): n for n, a in enumerate(self.actors)}
        self.running: dict[Any, tuple[int, Shard]] = {}  # score call -> (replica, shard)
        self.reference: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.ask_again: dict[int, float] = {}  # replica -> when to ask a restarting replica again whether it is up
        self.watched = self.lost_since = time.monotonic()

    def run(self, pending: list[Shard], on_shard: OnShard, progress: bool) -> None:
        from srdata.engines.progress import ProgressBar

        queue, done = deque(pending), set()
        bar = ProgressBar(sum(s.stop - s.start for s in pending), enabled=progress)
        last = time.perf_counter()
        try:
            while len(done) < len(pending):
                self._feed(queue, done)
                waiting_on = [*self.running, *self.probes]
                finished = self.ray.wait(waiting_on, num_returns=1, timeout=POLL)[0] if waiting_on else []
                if not waiting_on:  # every replica lost and about to be asked again
                    time.sleep(POLL)
                self._watch()  # every turn (at most once per POLL): failing calls must not hide a cluster that is gone
                for ref in finished:
                    if ref in self.probes:
                        self._reported(ref)
                        continue
                    result = self._result(ref, queue)
                    if result is None or result[0].index in done:  # lost, or reported twice (same rows, already written)
                        continue
                    shard, frame = result
                    now = time.perf_counter()
                    on_shard(shard, frame, now - last)  # wall time on the driver: start-up included in the first
                    last = now
                    done.add(shard.index)
                    bar.update_work(shard.stop - shard.start, _tokens(frame))
        finally:
            bar.close()
            for actor in self.actors:  # leave nothing running on a cluster the driver only joined
                self.ray.kill(actor, no_restart=True)

    def _feed(self, queue: deque, done: set[int]) -> None:
        """Give each live replica shards up to DEPTH; rows are read from the dataset only now."""
        for n in sorted(self.ready):
            held = sum(1 for replica, _ in self.running.values() if replica == n)
            while held < DEPTH and queue:
                shard = queue.popleft()
                if shard.index in done:
                    continue
                rows = _table_to_ipc(self.arrow[shard.start : shard.stop])
                self.running[self.actors[n].score.remote(shard.index, shard.start, shard.stop, rows)] = (n, shard)
                held += 1

    def _result(self, ref: Any, queue: deque) -> tuple[Shard, pl.DataFrame] | None:
        """The finished shard and its frame; ``None`` when its replica was lost (the shard goes back to the queue)."""
        n, shard = self.running.pop(ref)
        try:
            index, blob, _ = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            queue.appendleft(shard)
            if n in self.ready:
                self.ready.discard(n)
                where = next((node_name(r) for r in reversed(self.records) if r["replica"] == n), "?")
                log.warning("replica %d on node %s was lost (its process or node died: %s); its shards go to the other "
                            "replicas while Ray restarts it", n, where, type(err).__name__)
                self.probes[self.actors[n].info.remote()] = n  # answers once the restarted replica has loaded
            return None
        except self.ray.exceptions.RayTaskError as err:  # the scoring code raised: the same error, without Ray's wrapping
            raise (err.cause if isinstance(err.cause, Exception) else err) from None
        return shard, _frame_from_ipc(blob, shard)

    def _reported(self, ref: Any) -> None:
        """A replica has started (or restarted): check it where it runs, against the others and the driver."""
        n = self.probes.pop(ref)
        try:
            record = self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:  # still restarting: ask again a little later
            self.ask_again[n] = time.monotonic() + POLL
            return
        except self.ray.exceptions.RayActorError as err:
            raise RuntimeError(f"replica {n} could not start: {_last_error_line(err)}") from None
        record = {"replica": n, **record}
        problem = record.pop("problem")
        if problem:
            raise ValueError(f"replica {n} on node {node_name(record)}: {problem}")
        resumed = resume_mismatch(record, self.job.earlier_replicas or [])
        if resumed:  # before it gets a shard: the finished shards and this replica's would mix precisions
            raise ValueError(resumed)
        self.reference = self.reference or record
        mismatch = replica_mismatch(record, self.reference, self.job.model_identity)
        if mismatch:
            raise ValueError(f"refusing to score with replicas that differ: {mismatch}")
        self.records.append(record)
        if self.job.on_replica is not None:
            self.job.on_replica(record)
        self.ready.add(n)

    def _watch(self) -> None:
        """At most once per POLL: ask restarting replicas again, and wait (then fail) while no node can host one."""
        now = time.monotonic()
        if now - self.watched < POLL:
            return
        self.watched = now
        for n, when in list(self.ask_again.items()):
            if when <= now:
                del self.ask_again[n]
                self.probes[self.actors[n].info.remote()] = n
        settings = self.job.config.engine
        fit = cluster_fit(self.ray, settings.cpus_per_replica, settings.gpus_per_replica)
        self.wait.check(fit, why="no live node has them" + ("; all replicas were lost" if self.records and not self.ready else ""))
        if self.ready or not self.records:
            self.lost_since = now
        elif now - self.lost_since >= 30:  # replicas were up, none is now: say so, not a silent stall
            self.lost_since = now
            log.warning("no replica is alive: Ray is restarting %d replica(s) (each reloads the model)", len(self.actors))


def _local_runtime(ray: Any) -> bool:
    """Whether this process started the Ray it uses (``ray.init()`` without a cluster): no node will join it."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    return bool(getattr(node, "head", False))


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
        log.warning("%s (the others start when the cluster grows)", message)
    return min(replicas, n_shards)


def _last_error_line(err: BaseException) -> str:
    """The original error's ``Type: message`` line out of Ray's wrapping (its last such line)."""
    lines = [line.strip() for line in str(err).splitlines() if re.match(r"^\s*[\w.]*(Error|Exception)\b.*:", line)]
    return lines[-1] if lines else _first_line(err)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _tokens(frame: pl.DataFrame) -> int:
    """The shard's tokens for the progress bar; a teacher pass's frames have no ``output_tokens``."""
    names = [c for c in ("prompt_tokens", "reference_tokens", "output_tokens") if c in frame.columns]
    return int(frame.select(pl.sum_horizontal(pl.sum(c) for c in names)).item() or 0) if names else 0


def _table_to_ipc(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _frame_from_ipc(blob: bytes, shard: Shard) -> pl.DataFrame:
    frame = pl.read_ipc_stream(io.BytesIO(blob))
    expected = list(range(shard.start, shard.stop))
    if frame["srd_id"].to_list() != expected:  # a guard: a shard's file holds exactly its rows
        raise RuntimeError(f"shard {shard.index} came back with rows other than srd_id {shard.start}..{shard.stop - 1}")
    return frame
