"""Run a job's pending shards with the engine registered under a name (:data:`srdata.engines.ENGINES`).

Example:
    >>> run_shards("ray", job, pending, on_shard=save)       # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Callable

from srdata.engines import ENGINES, unknown_engine
from srdata.engines.job import OnShard, ShardJob
from srdata.run.folder import Shard

#: What every engine is: ``run(job, pending, on_shard, progress=...)``.
EngineRun = Callable[..., None]


def engine_function(name: str) -> EngineRun:
    """The function of a registered engine, imported now (Ray only when it is asked for).

    Example:
        >>> engine_function("local").__name__
        'run_local'
    """
    if name not in ENGINES:
        raise unknown_engine(name)
    module, _, function = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def run_shards(engine: str, job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """Score ``pending`` with the named engine; ``on_shard`` gets each shard once, when it is done."""
    engine_function(engine)(job, pending, on_shard, progress=progress)
