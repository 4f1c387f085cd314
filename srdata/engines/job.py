"""What every shard of one run is scored with, and the callback that receives a finished shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import polars as pl

from srdata.config import ScoreConfig
from srdata.run.folder import Shard

#: Loads the student where an engine runs: (resolved config, tokenizer or None) -> a callable
#: ``(rows, shard, progress) -> scored frame`` with ``close()`` (srdata.shard.StudentScorer).
OpenStudent = Callable[[ScoreConfig, Any], Any]

#: Called on the driver for every finished shard: (shard, its scored frame, wall seconds it took).
OnShard = Callable[[Shard, pl.DataFrame, float], None]

#: Called on the driver when a Ray replica has started (or restarted) and passed its checks: its
#: record (node, device, backend, model fingerprint and package versions as resolved there).
OnReplica = Callable[[dict[str, Any]], None]


@dataclass
class ShardJob:
    """What every shard of one run is scored with.

    ``config`` is the run's resolved config (:func:`srdata.steps.prompts.resolved_config`):
    the template and the columns are in it, not beside it.

    Example:
        >>> job = ShardJob(dataset, config, tokenizer, open_student=StudentScorer)   # doctest: +SKIP
    """

    dataset: Any  # a datasets.Dataset; srd_id = row position
    config: ScoreConfig
    tokenizer: Any
    open_student: OpenStudent
    #: The driver's model identity (``model_identity``): Ray replicas that see another model are refused.
    model_identity: dict[str, Any] | None = None
    on_replica: OnReplica | None = None
    #: What scored the run's finished shards in earlier calls (:func:`srdata.engines.replica.earlier_records`):
    #: a Ray replica that would compute otherwise is refused before it scores a shard.
    earlier_replicas: list[dict[str, Any]] | None = None

    def rows(self, shard: Shard) -> dict[str, list]:
        """The shard's rows as ``{column: [values]}``."""
        return self.dataset[shard.start : shard.stop]
