"""Engines run the pending shards of a scoring run: here (``local``) or on Ray (``ray``).

Every engine scores a shard with the same :func:`srdata.shard.score_shard` call, on
exactly the shard's rows, and hands each finished shard to ``on_shard`` (which writes
the shard file and the manifest on the driver). The output therefore does not depend on
the engine: only where and how fast the shards are scored does.

Example:
    >>> job = ShardJob(dataset, mapping, template, tokenizer, config)        # doctest: +SKIP
    >>> run_shards("ray", job, pending, on_shard=save)                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import polars as pl

from srdata.config import ScoreConfig
from srdata.steps.load import ColumnMapping
from srdata.run.folder import Shard

ENGINES = ("local", "ray")

#: Called on the driver for every finished shard: (shard, its scored frame, wall seconds it took).
OnShard = Callable[[Shard, pl.DataFrame, float], None]


@dataclass
class ShardJob:
    """What every shard of one run is scored with."""

    dataset: Any  # a datasets.Dataset; srd_id = row position
    mapping: ColumnMapping
    template: str
    tokenizer: Any
    config: ScoreConfig

    def rows(self, shard: Shard) -> dict[str, list]:
        """The shard's rows as ``{column: [values]}``."""
        return self.dataset[shard.start : shard.stop]


def run_shards(engine: str, job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """Score ``pending`` with the named engine; ``on_shard`` gets each shard once, when it is done."""
    if engine == "local":
        run_local(job, pending, on_shard, progress=progress)
    elif engine == "ray":
        from srdata.engines.ray import run_ray  # Ray is an optional extra: imported only when asked for

        run_ray(job, pending, on_shard, progress=progress)
    else:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")


def run_local(job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """One backend in this process, the shards one after the other."""
    from srdata.backends import load_backend
    from srdata.engines.progress import ProgressBar
    from srdata.shard import score_shard

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
