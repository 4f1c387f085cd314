"""The ranking a curriculum is cut from: resolved from the run and the options, computed in memory, or written into the run.

:func:`resolve_ranking` says which ranking an export (or a report) uses: the run's own
(``manifest.json``'s ``ranking``, the paper's by default), or the options given, which
re-rank in memory. :func:`ranks_in_file_order` gives every row's scores and ranks under it;
:func:`rerank_run` (``srdata rank``) rewrites the run's ranks in place and records the
ranking in ``manifest.json`` and in ``annotated.parquet``'s metadata
(:mod:`srdata.curriculum.ranking_record`).

Example:
    >>> ranking = resolve_ranking(read_run("runs/dolly"), rank_by="noisy")   # doctest: +SKIP
    >>> ranking.describe()["name"], ranking.recompute                          # doctest: +SKIP
    ('noisy', True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from srdata.config import RankConfig, command_settings
from srdata.curriculum.cut import CurriculumError
from srdata.curriculum.ranking_record import ranking_metadata
from srdata.curriculum.source import Run, read_run
from srdata.curriculum.stage_files import as_write_error, compression_level
from srdata.curriculum.summary import score_columns
from srdata.run.folder import ANNOTATED_FILE, write_manifest
from srdata.run.io import FolderLock, publish, remove_stale_temps, temp_path
from srdata.steps.rank import (
    DIFFICULTY_COLUMN,
    FUSED_COLUMN,
    ID_COLUMN,
    INVALID_COLUMN,
    RankingError,
    RankKey,
    check_no_nan,
    format_rank_by,
    missing_column,
    parse_rank_by,
    rank,
)


@dataclass(frozen=True)
class Ranking:
    """The ranking settings a curriculum is cut from, and whether export recomputes them."""

    keys: tuple[RankKey, ...]
    rrf_k: int
    ties: str
    recompute: bool

    def describe(self) -> dict[str, Any]:
        """What ``curriculum.json`` records under ``ranking`` (and ``rank_columns``: :mod:`srdata.curriculum.ranking_record`)."""
        return {"rank_by": format_rank_by(self.keys), "rrf_k": self.rrf_k, "ties": self.ties, "recomputed": self.recompute}

    def metadata(self) -> dict[str, str]:
        """The parquet key-value metadata of a file whose rank columns come from this ranking."""
        return ranking_metadata(format_rank_by(self.keys), self.rrf_k, self.ties)


def resolve_ranking(
    run: Run,
    rank_by: str | Sequence[RankKey] | None = None,
    rrf_k: int | None = None,
    ties: str | None = None,
) -> Ranking:
    """The run's current ranking, with any option given here overriding it (and forcing a re-rank)."""
    current = run.manifest.ranking
    keys = parse_rank_by(rank_by if rank_by is not None else current.get("rank_by"))
    k = rrf_k if rrf_k is not None else current.get("rrf_k", run.manifest.config.metrics.rrf_k)
    tie_mode = ties if ties is not None else current.get("ties", "input")
    asked = rank_by is not None or rrf_k is not None or ties is not None
    return Ranking(keys, k, tie_mode, recompute=asked or not _has_ranks(run))


def _has_ranks(run: Run) -> bool:
    return {DIFFICULTY_COLUMN, FUSED_COLUMN} <= set(pl.read_parquet_schema(run.annotated))


def ranks_in_file_order(run: Run, ranking: Ranking) -> pl.DataFrame:
    """Score and rank columns of every row, in the row order of ``annotated.parquet``."""
    schema = pl.read_parquet_schema(run.annotated)
    _check_keys_exist(schema, ranking.keys)
    summarised = score_columns(schema, ranking.keys)
    if not ranking.recompute:
        rank_columns = [k.rank_column for k in ranking.keys if k.rank_column in schema]
        wanted = [ID_COLUMN, *summarised, *rank_columns, FUSED_COLUMN, DIFFICULTY_COLUMN]
        ranks = pl.read_parquet(run.annotated, columns=list(dict.fromkeys(wanted)))
        ranked_rows = ranks.filter(pl.col(DIFFICULTY_COLUMN).is_not_null())
        check_no_nan(ranked_rows, [RankKey(c, descending=False) for c in summarised])
        return ranks
    optional = [INVALID_COLUMN] if INVALID_COLUMN in schema else []
    scores = pl.read_parquet(run.annotated, columns=[ID_COLUMN, *summarised, *optional])
    ranked = rank(scores, ranking.rrf_k, rank_by=ranking.keys, ties=ranking.ties)
    if scores[ID_COLUMN].is_sorted():
        return ranked
    # rank() returns srd_id order; bring it back to the file's order for a row-wise zip.
    return scores.select(ID_COLUMN).join(ranked, on=ID_COLUMN, how="left", maintain_order="left")


def _check_keys_exist(schema: dict[str, Any], keys: Sequence[RankKey]) -> None:
    # Checked against the whole file so the message can list every usable column.
    numeric = [c for c, t in schema.items() if t.is_numeric() and c != ID_COLUMN]
    for key in keys:
        if key.column not in schema:
            raise missing_column(key.column, numeric)


def rank_output_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("rank_") or c in (FUSED_COLUMN, DIFFICULTY_COLUMN)]


def ranked_rows(run: Run, new_columns: pl.DataFrame | None) -> pl.LazyFrame:
    """The annotated rows, lazily, with every column of ``new_columns`` (fresh ranks, in file order) zipped on."""
    rows = pl.scan_parquet(run.annotated)
    if new_columns is None:
        return rows
    original = rows.collect_schema().names()
    outputs = new_columns.columns
    # A row-wise zip, not a join: new_columns is in file order, and a zip streams.
    zipped = pl.concat([rows.drop(outputs, strict=False), new_columns.lazy()], how="horizontal")
    return zipped.select([*original, *(c for c in outputs if c not in original)])


def rerank_run(
    run_dir: str | os.PathLike[str],
    config: RankConfig | dict[str, Any] | None = None,
    *,
    compression: str = "zstd",
    **settings: Any,
) -> Path:
    """Recompute the ranks of a finished run in place (no re-scoring); return annotated.parquet.

    Settings are a :class:`~srdata.config.RankConfig` (what ``srdata rank`` builds from its
    flags), a dict, keyword arguments named like its fields, or a mix (keywords win). The
    new settings are recorded under ``"ranking"`` in ``manifest.json`` so that a later
    export cuts from them.

    Example:
        >>> rerank_run("runs/dolly", ties="reference")        # doctest: +SKIP
        PosixPath('runs/dolly/annotated.parquet')
        >>> rerank_run("runs/dolly", RankConfig(rank_by="noisy", rrf_k=10))   # doctest: +SKIP
        PosixPath('runs/dolly/annotated.parquet')
    """
    config = command_settings(RankConfig, config, settings, RankingError)
    run = read_run(run_dir)
    ranking = Ranking(parse_rank_by(config.rank_by), config.rrf_k, config.ties, recompute=True)
    if not os.access(run.path, os.W_OK):  # EROFS holds for root too
        raise CurriculumError(
            f"run folder {run.path} is not writable (a read-only file system, or no permission): `srdata rank` rewrites "
            f"{ANNOTATED_FILE} there in place. Copy the run folder somewhere writable and rank the copy, or export with "
            "ranking options (`srdata export RUN --rank-by ...`), which re-ranks in memory and leaves the run as it is"
        )
    with FolderLock(run.path, "srdata rank"):  # the lock `srdata score` takes: never while it writes the run
        run = read_run(run.path)  # again, under the lock: the run as no other command changes it now
        remove_stale_temps(run.path)  # an earlier rank (or score) killed mid-write
        ranks = ranks_in_file_order(run, ranking)
        stale = _previous_rank_columns(run, ranks)
        rows = ranked_rows(run, ranks.select(rank_output_columns(ranks))).drop(stale)
        _sink_one(rows, run.annotated, compression, ranking.metadata())
        recorded = {k: v for k, v in ranking.describe().items() if k in ("rank_by", "rrf_k", "ties")}
        run.manifest.ranking = {**recorded, "ranked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_manifest(run.path, run.manifest)
    return run.annotated


def _previous_rank_columns(run: Run, new_ranks: pl.DataFrame) -> list[str]:
    """Rank columns of a previous custom --rank-by that the new ranking does not produce."""
    previous = run.manifest.ranking.get("rank_by")
    if previous is None:
        return []
    schema = pl.read_parquet_schema(run.annotated)
    old = [k.rank_column for k in parse_rank_by(previous)]
    return [c for c in old if c in schema and c not in new_ranks.columns]


def _sink_one(rows: pl.LazyFrame, final: Path, compression: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``rows`` to a marked temp file beside ``final`` and move it into place; a full disk leaves ``final`` as it was."""
    temp = temp_path(final)
    try:
        rows.sink_parquet(temp, compression=compression, compression_level=compression_level(compression), metadata=metadata)
        publish(temp, final)
    except Exception as err:
        failure = as_write_error(err, final)
        if failure is None or failure is err:
            raise
        raise failure from err
    finally:
        temp.unlink(missing_ok=True)
