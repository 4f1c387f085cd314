"""Engines run the pending shards of a scoring run: here (``local``) or on Ray (``ray``).

Engines receive what they run: ``job.open_student`` loads the student where the engine
runs (:class:`srdata.shard.StudentScorer`, once per process or Ray actor) and scores a
shard on exactly the shard's rows; each finished shard goes to ``on_shard`` (which writes
the shard file and the manifest on the driver). ``job.config`` is the run's resolved
config: the template and the columns travel in it. Engines import no scoring code, and the
output does not depend on the engine: only where and how fast the shards are scored does.

Engines are registered by name in :data:`ENGINES` (the one place an engine is added, and
where ``--engine``'s choices come from); an engine's module is imported when a run uses it.
This module imports nothing else: :mod:`srdata.config` reads the names from it.

Example:
    >>> job = ShardJob(dataset, config, tokenizer, open_student=StudentScorer)   # doctest: +SKIP
    >>> run_shards("ray", job, pending, on_shard=save)                       # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

#: name -> "module:function" that runs a job's pending shards, imported lazily.
ENGINES: dict[str, str] = {
    "local": "srdata.engines.local:run_local",  # this process; loads the backends only when a run starts
    "ray": "srdata.engines.ray:run_ray",  # Ray is an optional extra: imported only when asked for
}

#: The type of ``EngineConfig.engine``: pydantic refuses any other name, listing these.
EngineName = Literal[tuple(ENGINES)]  # type: ignore[valid-type]  # built from the registry, not written twice

__all__ = ["ENGINES", "EngineName", "OnShard", "ShardJob", "run_shards", "unknown_engine"]

# Imported when first used: they need srdata.config, which reads ENGINES from here.
_LAZY = {"OnShard": "srdata.engines.job", "ShardJob": "srdata.engines.job", "run_shards": "srdata.engines.dispatch"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unknown_engine(name: str) -> ValueError:
    """The error for an engine name that is not registered, naming the ones that are.

    Example:
        >>> str(unknown_engine("slurm"))
        "unknown engine 'slurm'; use one of local, ray"
    """
    return ValueError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
