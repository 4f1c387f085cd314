"""The local engine: one backend in this process, the shards one after the other."""

from __future__ import annotations

import time

from srdata.engines.job import OnShard, ShardJob
from srdata.engines.progress import ProgressBar
from srdata.run.folder import Shard


def run_local(job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """One backend in this process, the shards one after the other."""
    student = job.open_student(job.config, job.tokenizer)
    # Rows an interrupted run already finished in these shards are not scored again: not counted.
    kept = sum(frame.height for frame in getattr(student, "kept", {}).values())
    bar = ProgressBar(sum(s.stop - s.start for s in pending) - kept, enabled=progress)
    try:
        for shard in pending:
            t0 = time.perf_counter()
            frame = student(job.rows(shard), shard, bar.update_work)
            on_shard(shard, frame, time.perf_counter() - t0)
    finally:
        bar.close()
        # A vLLM engine holds GPU (or host) memory and child processes until it is shut down:
        # not when the run ends, if anything still references it (a notebook, a traceback).
        student.close()
