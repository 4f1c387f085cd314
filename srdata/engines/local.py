"""The local engine: one backend in this process, the shards one after the other."""

from __future__ import annotations

import time

from srdata.backends import load_backend
from srdata.engines.job import OnShard, ShardJob
from srdata.engines.progress import ProgressBar
from srdata.run.folder import Shard
from srdata.shard import score_shard


def run_local(job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """One backend in this process, the shards one after the other."""
    config = job.config
    backend = load_backend(config, tokenizer=job.tokenizer)
    bar = ProgressBar(sum(s.stop - s.start for s in pending), enabled=progress)
    try:
        for shard in pending:
            t0 = time.perf_counter()
            frame = score_shard(job.rows(shard), shard, job.mapping, job.template, job.tokenizer, backend, config, bar.update_work)
            on_shard(shard, frame, time.perf_counter() - t0)
    finally:
        bar.close()
        # A vLLM engine holds GPU (or host) memory and child processes until it is shut down:
        # not when the run ends, if anything still references it (a notebook, a traceback).
        if hasattr(backend, "close"):
            backend.close()
