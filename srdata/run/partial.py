"""The finished rows of an interrupted shard: kept in a file of their own, checksummed.

A shard is scored in batches of similar length, so the rows finished when Ctrl-C comes
are a scattered subset of the shard's ``srd_id`` range. They go to
``shards/shard-NNNNN.partial.parquet`` (written atomically), and the shard's record in
the manifest gets ``partial = {file, sha256, bytes, rows}``. A rerun with the same
settings reads the file back only when its bytes match that record and its ``srd_id``
column is a sorted subset of the shard's range, scores the other rows, and writes the
whole shard as usual; the partial file is then removed. A file that does not match its
record is not trusted: the shard is scored from the start (and the rerun says so).

Example:
    >>> record = write_partial(store, shard, frame)               # doctest: +SKIP
    >>> entry.partial = record                                     # doctest: +SKIP
    >>> frame = read_partial(store.dir, entry)                     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from srdata.run.folder import RunStore, Shard, ShardRecord
from srdata.run.io import IntegrityError, verify_file


def partial_file(index: int) -> str:
    """``shards/shard-00003.partial.parquet`` for shard 3.

    Example:
        >>> partial_file(3)
        'shards/shard-00003.partial.parquet'
    """
    return f"shards/shard-{index:05d}.partial.parquet"


@dataclass(frozen=True)
class _PartialShard(Shard):
    """A shard whose file is its partial file (what :meth:`RunStore.write_shard` writes to)."""

    @property
    def file(self) -> str:
        return partial_file(self.index)


def partial_record(entry: ShardRecord) -> dict[str, Any] | None:
    """The ``partial`` record of a shard's manifest entry, when it has a well-formed one."""
    record = (entry.model_extra or {}).get("partial")
    if not isinstance(record, dict) or record.get("file") != partial_file(entry.index):
        return None
    return record


def write_partial(store: RunStore, shard: Shard, frame: pl.DataFrame) -> dict[str, Any]:
    """Write a shard's finished rows atomically; returns the record to keep in the manifest entry."""
    written = store.write_shard(_PartialShard(shard.index, shard.start, shard.stop), frame.sort("srd_id"))
    return {"file": partial_file(shard.index), **written}


def read_partial(folder: str | Path, entry: ShardRecord) -> pl.DataFrame | None:
    """The finished rows an interrupted run kept for this shard, verified; ``None`` when there are none.

    Raises :class:`IntegrityError` naming the file when it does not match its record.
    """
    record = partial_record(entry)
    if record is None:
        return None
    path = Path(folder) / record["file"]
    if not path.exists():
        return None
    if not record.get("sha256"):
        raise IntegrityError(f"{path} has no checksum in the manifest")
    verify_file(path, record["sha256"], record.get("bytes"))
    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # bytes as recorded, yet unreadable: refuse rather than guess
        raise IntegrityError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    ids = frame["srd_id"].to_list()
    if ids != sorted(set(ids)) or (ids and (ids[0] < entry.start or ids[-1] >= entry.stop)) or len(ids) != record.get("rows"):
        raise IntegrityError(f"{path} does not hold a subset of rows {entry.start}..{entry.stop - 1} in its srd_id column")
    return frame


def drop_partial(folder: str | Path, entry: ShardRecord) -> None:
    """Forget a shard's partial rows once the whole shard is written: its record, then its file."""
    record = partial_record(entry)
    if entry.model_extra and "partial" in entry.model_extra:
        del entry.model_extra["partial"]
    if record is not None:
        (Path(folder) / record["file"]).unlink(missing_ok=True)
