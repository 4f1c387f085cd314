"""Engines run the pending shards of a scoring run: here (``local``) or on Ray (``ray``).

Engines receive what they run: ``job.open_student`` loads the student where the engine
runs (:class:`srdata.shard.LoadedStudent`, once per process or Ray actor) and scores a
shard on exactly the shard's rows; each finished shard goes to ``on_shard`` (which writes
the shard file and the manifest on the driver). Engines import no scoring code, and the
output does not depend on the engine: only where and how fast the shards are scored does.

Example:
    >>> job = ShardJob(dataset, mapping, template, tokenizer, config, open_student=LoadedStudent)   # doctest: +SKIP
    >>> run_shards("ray", job, pending, on_shard=save)                       # doctest: +SKIP
"""

from __future__ import annotations

from srdata.engines.job import OnShard, ShardJob
from srdata.run.folder import Shard

ENGINES = ("local", "ray")
__all__ = ["ENGINES", "OnShard", "ShardJob", "run_shards"]


def run_shards(engine: str, job: ShardJob, pending: list[Shard], on_shard: OnShard, *, progress: bool = True) -> None:
    """Score ``pending`` with the named engine; ``on_shard`` gets each shard once, when it is done."""
    if engine == "local":
        from srdata.engines.local import run_local  # loads the backends: only when a run starts

        run_local(job, pending, on_shard, progress=progress)
    elif engine == "ray":
        from srdata.engines.ray import run_ray  # Ray is an optional extra: imported only when asked for

        run_ray(job, pending, on_shard, progress=progress)
    else:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
