"""Turn a scored run into SRD's curriculum: stage files plus ``curriculum.json``.

A run folder (written by ``srdata score``) holds ``annotated.parquet`` and
``manifest.json``. Export ranks the valid rows (or reads the run's ranks), cuts them into
stages (:mod:`srdata.curriculum.cut`) and writes one file per kept stage
(:mod:`srdata.curriculum.stage_files`) and ``curriculum.json``
(:mod:`srdata.curriculum.summary`).

``by`` checks every group of a column (template, task, source) against its share of each
stage and of the dropped part, and warns where a stage or the dropped part holds a group
far from its share (:mod:`srdata.curriculum.groups`); ``stratify`` cuts the stages inside every
group instead, from the ``stratified_rank`` order, so that every group keeps its share.

Inside a stage file the rows come part by part, easiest part first, each part in input
(``srd_id``) order, so the rows of cumulative stage s-1 are the first rows of stage s
(a disjoint stage is one part: input order). Trainers shuffle within a stage anyway;
sort by ``difficulty_rank`` for easiest-first.

Guarantees (the folder rules and the publishing order are in :mod:`srdata.curriculum.output`):

* **One writer per folder.** Export holds the output folder's lock (``.srdata.lock``,
  :class:`srdata.run.io.FolderLock`) from before it cleans the folder until it has
  published; a second export (or report) into it is refused at once, naming the holder.
  ``srdata rank`` holds the run folder's lock, the one ``srdata score`` takes.
* **No file of the user's touched.** A folder holding files but no ``curriculum.json`` is
  refused before anything in it changes; in an earlier export's folder only the stage files
  its ``curriculum.json`` lists are replaced or removed, with marked temp files of dead
  processes. A run replaced while it was read (a concurrent rank) is refused, not mixed.
* **Checksums.** The SHA-256, bytes and rows of every stage file are recorded in
  ``curriculum.json`` (each hashed on its stage's writer thread while the other stages
  still write) and checked wherever the stages are read (:func:`srdata.curriculum.reader.verified_curriculum`).
* **Atomic, and clear when it cannot write.** Every file is written to a marked temp file
  and moved into place; a kill or a full disk leaves the earlier export whole (or, killed
  among the final renames, a summary that readers refuse and a rerun cleans up), and a full
  disk or a read-only folder is a :class:`srdata.run.io.WriteError` naming the file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from srdata.config import ExportConfig, ShareCheckConfig, command_settings
from srdata.curriculum.cut import CurriculumError, StagePlan, plan_stages, stage_bounds, stage_parts
from srdata.curriculum.groups import (
    DEFAULT_MAX_SHARE_RATIO,
    DEFAULT_MIN_GROUP_ROWS,
    STRATIFIED_COLUMN,
    GroupError,
    ShareCheck,
    check_group_columns,
    curriculum_parts,
    emit_warnings,
    group_shares,
    stratified_ranks,
)
from srdata.curriculum.source import Run, check_unchanged, read_run, read_run_manifest  # noqa: F401 - read_run_manifest: re-exported
from srdata.curriculum.output import EncodedStage, check_output_folder, publish_export
from srdata.curriculum.remote_export import remote_capable
# Re-exported: they lived here before srdata.curriculum.ranking.
from srdata.curriculum.ranking import Ranking, rank_output_columns, ranked_rows, ranks_in_file_order, rerank_run, resolve_ranking  # noqa: F401
from srdata.curriculum.ranking_record import rank_columns_record
from srdata.curriculum.replacing import export_decisions, replaced_export
from srdata.curriculum.regime import regime_of_cut, tell_regime
from srdata.curriculum.stage_files import (STAGE_COLUMN, ScratchFiles, as_write_error, compression_level, part_batches, part_schema, part_sinks,
                                           prepare_output, split_into_parts, stage_file_paths, stage_schema, write_jsonl_stage,
                                           write_parquet_stage)
from srdata.curriculum.summary import range_summaries, score_columns
from srdata.run.folder import CURRICULUM_FILE
from srdata.run.io import FolderLock, file_sha256, publish, remove_stale_temps
from srdata.run.storage import use_options
from srdata.steps.rank import DIFFICULTY_COLUMN, format_rank_by

log = logging.getLogger(__name__)
ROW_GROUP_BYTES = 32 << 20  # Arrow bytes per parquet row group: ~85k rows of 300 chars (DuckDB writes 122,880 rows)


def export_curriculum(
    run_dir: str | os.PathLike[str],
    config: ExportConfig | dict[str, Any] | None = None,
    *,
    echo: Callable[[str], None] | None = None,
    **settings: Any,
) -> Path:
    """Write ``stage-K.parquet`` (or ``.jsonl``) and ``curriculum.json``; return the folder.

    Settings are an :class:`~srdata.config.ExportConfig` (what ``srdata export`` builds from
    its flags), a dict, keyword arguments named like its fields (``fmt`` for ``format``), or
    a mix (keywords win); they are validated by the model, with the CLI's messages.

    Defaults follow the paper: 4 stages, keep the easiest 3, cumulative. Ranking options
    (``rank_by``, ``rrf_k``, ``ties``) re-rank in memory without touching the run.

    ``by`` (one column or several) records each group's share of every stage and of the
    dropped part in ``curriculum.json`` and raises a
    :class:`~srdata.curriculum.groups.GroupShareWarning` for every group whose share of a part is
    more than ``max_share_ratio`` times, or less than ``1 / max_share_ratio`` of, its share
    of all ranked rows (groups of at least ``min_group_rows`` rows). ``stratify`` cuts the
    stages inside each group of that column, so every group keeps its share (the stage
    files then carry ``stratified_rank``, the order they were cut from); it is also checked.

    An earlier export in ``out`` cut with other settings (ranking, stages, format, ...) is
    refused unless ``overwrite`` (:mod:`srdata.curriculum.replacing`); what is replaced is
    said through ``echo`` (default: the log). Which ranking the stage files' rank columns
    come from is recorded in ``curriculum.json`` and in each parquet file's metadata
    (:mod:`srdata.curriculum.ranking_record`). ``storage_options`` are used for a remote
    run or ``out`` (``s3://...``).

    Example:
        >>> out = export_curriculum("runs/dolly")               # doctest: +SKIP
        >>> sorted(p.name for p in out.iterdir())               # doctest: +SKIP
        ['curriculum.json', 'stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
        >>> out = export_curriculum("runs/t0", ExportConfig(by=["template"], stratify="template"))   # doctest: +SKIP
        >>> out = export_curriculum("runs/t0", by="template", stages=3, keep=2)                     # doctest: +SKIP
    """
    if "fmt" in settings:  # the keyword's name before ExportConfig
        settings["format"] = settings.pop("fmt")
    config = command_settings(ExportConfig, config, settings, CurriculumError)
    with use_options(config.storage_options):
        return _export_at(run_dir, config, out=config.out, overwrite=config.overwrite, echo=echo)


# remote_capable reads run_dir, out, overwrite and echo by name, and swaps a remote out for a local staging folder.
@remote_capable  # RUN_DIR or --out in object storage (s3://...): srdata.curriculum.remote_export
def _export_at(
    run_dir: str | os.PathLike[str],
    config: ExportConfig,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """:func:`export_curriculum` into the local folder ``out`` (default: RUN_DIR/curriculum) of a local run."""
    fmt, stratify = config.format, config.stratify
    plan = plan_stages(config.stages, config.keep, config.fractions, config.layout)  # checked by ExportConfig already
    check = config.share_check()
    run = read_run(run_dir)
    group_columns = _group_columns(run, config.by, stratify)
    ranking = resolve_ranking(run, config.rank_by, config.rrf_k, config.ties)
    ranks = ranks_in_file_order(run, ranking)
    groups = pl.read_parquet(run.annotated, columns=group_columns) if group_columns else None  # file order, as ranks
    position = DIFFICULTY_COLUMN
    if stratify is not None:
        assert groups is not None
        ranks = ranks.with_columns(stratified_ranks(ranks[DIFFICULTY_COLUMN], groups[stratify]).alias(STRATIFIED_COLUMN))
        position = STRATIFIED_COLUMN
    n_valid = ranks[DIFFICULTY_COLUMN].count()
    bounds = stage_bounds(n_valid, plan)
    parts = curriculum_parts(bounds, n_valid)
    shares = [group_shares(ranks[position], groups[c], parts, c, check) for c in group_columns] if groups is not None else []
    regime = regime_of_cut(run.annotated, ranks[position], max(stop for _, stop in bounds))  # None without `srdata teach`
    del groups
    out_dir = Path(out) if out is not None else run.path / "curriculum"
    finals = stage_file_paths(out_dir, len(bounds), fmt)
    decisions = export_decisions(run, plan, ranking, fmt, stratify)
    check_output_folder(out_dir, finals)  # before anything is created there: a refused folder is left as it was
    replaced_export(out_dir, decisions, overwrite)
    prepare_output(out_dir)
    with FolderLock(out_dir, "srdata export"):
        owned = check_output_folder(out_dir, finals)  # again, now that no other export can change it
        replacing = replaced_export(out_dir, decisions, overwrite)
        remove_stale_temps(out_dir)  # left by an earlier export that was killed
        # Summarised before the rows are streamed, so that the score columns are freed first:
        # on a VM, memory that is reused is much cheaper than memory touched for the first time.
        summary = curriculum_summary(run, plan, ranking, ranks, bounds, finals, fmt, config.compression, stratify=stratify, shares=shares)
        new_columns = [*(rank_output_columns(ranks) if ranking.recompute else []), *([STRATIFIED_COLUMN] if stratify else [])]
        new_ranks = ranks.select(new_columns) if new_columns else None
        del ranks
        encoded = encode_stages(ranked_rows(run, new_ranks), bounds, out_dir, fmt, config.compression, position_column=position,
                                metadata=ranking.metadata())
        try:
            check_unchanged(run, "export", out_dir)
            for stage, file in zip(summary["stages"], encoded):
                stage["file_bytes"], stage["sha256"] = file.bytes, file.sha256  # verified wherever the stages are read
            publish_export(out_dir, encoded, summary, owned)
        finally:
            for file in encoded:
                file.temp.unlink(missing_ok=True)
    if replacing is not None:
        (echo or log.warning)(replacing)
    emit_warnings(summary["warnings"])
    tell_regime(regime, echo)
    return out_dir


def share_check(max_share_ratio: float = DEFAULT_MAX_SHARE_RATIO, min_group_rows: int = DEFAULT_MIN_GROUP_ROWS) -> ShareCheck:
    """The share-check settings, validated (a :class:`CurriculumError` names the bad one).

    Example:
        >>> share_check(3.0).describe()
        {'max_share_ratio': 3.0, 'min_group_rows': 40}
    """
    return ShareCheckConfig.model_construct(max_share_ratio=max_share_ratio, min_group_rows=min_group_rows).share_check()


def _group_columns(run: Run, by: str | Sequence[str] | None, stratify: str | None) -> list[str]:
    """The columns whose groups are checked (``by``, then ``stratify``), each checked against the run."""
    schema = pl.read_parquet_schema(run.annotated)
    by_columns = [by] if isinstance(by, str) else list(by or [])
    try:
        check_group_columns(schema, by_columns, "--by")
        if stratify is not None:
            check_group_columns(schema, [stratify], "--stratify")
    except GroupError as err:
        raise CurriculumError(str(err)) from None
    return list(dict.fromkeys([*by_columns, *([stratify] if stratify is not None else [])]))


def write_stages(rows: pl.LazyFrame, bounds: Sequence[tuple[int, int]], out_dir: Path, fmt: str, compression: str = "zstd",
                 position_column: str = DIFFICULTY_COLUMN) -> list[Path]:
    """Write one file per stage (rows whose ``position_column`` is in ``(start, stop]``); return the final paths.

    :func:`encode_stages`, then every stage moved onto its name. ``export_curriculum``
    publishes the stages with their ``curriculum.json`` instead (:mod:`srdata.curriculum.output`).

    Example:
        >>> rows = pl.scan_parquet("runs/dolly/annotated.parquet")             # doctest: +SKIP
        >>> write_stages(rows, [(0, 10), (0, 20)], Path("out"), "parquet")    # doctest: +SKIP
        [PosixPath('out/stage-0.parquet'), PosixPath('out/stage-1.parquet')]
    """
    encoded = encode_stages(rows, bounds, out_dir, fmt, compression, position_column)
    try:
        # A summary beside the folder's stage files would describe other files: it goes first.
        (out_dir / CURRICULUM_FILE).unlink(missing_ok=True)
        for file in encoded:
            publish(file.temp, file.path)
    finally:
        for file in encoded:
            file.temp.unlink(missing_ok=True)
    return [file.path for file in encoded]


def encode_stages(
    rows: pl.LazyFrame,
    bounds: Sequence[tuple[int, int]],
    out_dir: Path,
    fmt: str,
    compression: str = "zstd",
    position_column: str = DIFFICULTY_COLUMN,
    metadata: dict[str, str] | None = None,
) -> list[EncodedStage]:
    """Write every stage file to a temp file beside its name and checksum it; nothing is moved into place.

    The rows are read once and cut into parts (the pieces between stage boundaries); each
    stage file is written from its parts, easiest first, one stage per thread (see
    :mod:`srdata.curriculum.stage_files`) and checksummed on that thread once written.
    A cumulative stage's rows come part by part, in input order inside each part, so stage
    s-1 is the first part of stage s. On any failure every temp file is removed; a full disk
    or a read-only folder is a :class:`WriteError` naming the file. ``metadata`` goes into
    every parquet file's key-value metadata (which ranking its rank columns come from).

    Example:
        >>> [f.path.name for f in encode_stages(rows, [(0, 10), (0, 20)], Path("out"), "parquet")]   # doctest: +SKIP
        ['stage-0.parquet', 'stage-1.parquet']
    """
    rows = rows.drop(STAGE_COLUMN, strict=False)  # a stale `stage` column is replaced, last
    parts, members = stage_parts(bounds)
    finals = stage_file_paths(out_dir, len(bounds), fmt)
    scratch = ScratchFiles(out_dir)
    temps = [scratch.new(final.name) for final in finals]
    encoded: list[EncodedStage] = []
    try:
        live, stored, sinks = part_sinks(members, len(parts), scratch, part_schema(rows))
        schema, level = stage_schema(rows).with_metadata(metadata or {}), compression_level(compression)

        def write(s: int) -> EncodedStage:
            stream = live[s]
            stored_parts = members[s][1:] if stream is not None else members[s]
            batches = chain(stream if stream is not None else (), part_batches([stored[g].path for g in stored_parts]))
            try:
                if fmt == "parquet":
                    write_parquet_stage(temps[s], s, batches, schema, compression, level, ROW_GROUP_BYTES)
                else:
                    write_jsonl_stage(temps[s], s, batches)
            except BaseException as err:
                if stream is not None:
                    stream.drain()  # the reading thread must never wait on a writer that stopped
                failure = as_write_error(err, finals[s])
                if failure is not None and failure is not err:
                    raise failure from err
                raise
            # Hashed here, on the stage's writer thread, while the other stages still write.
            # (Hashing the file as it grows, on a thread of its own, cost more CPU at 10M rows.)
            return EncodedStage(finals[s], temps[s], file_sha256(temps[s]), temps[s].stat().st_size)

        # One thread per stage, not per core: all stages share the cores to the end. Stages
        # that stream a part start with the reading; the others once their scratch files exist.
        with ThreadPoolExecutor(max_workers=max(1, len(finals))) as pool:
            writers = {s: pool.submit(write, s) for s in range(len(finals)) if live[s] is not None}
            try:
                split_into_parts(rows, parts, position_column, sinks)
            except Exception as err:  # a scratch file of the parts (a full disk, most likely)
                failure = as_write_error(err, out_dir)
                if failure is None or failure is err:
                    raise
                raise failure from err
            writers.update({s: pool.submit(write, s) for s in range(len(finals)) if live[s] is None})
            encoded = [writers[s].result() for s in sorted(writers)]
    finally:
        scratch.remove_all(keep={file.temp for file in encoded})
    return encoded


def curriculum_summary(
    run: Run,
    plan: StagePlan,
    ranking: Ranking,
    ranks: pl.DataFrame,
    bounds: Sequence[tuple[int, int]],
    files: Sequence[Path],
    fmt: str,
    compression: str,
    stratify: str | None = None,
    shares: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The content of ``curriculum.json``: sizes, thresholds, settings, group shares and provenance.

    With ``stratify`` the stages were cut from ``ranks[stratified_rank]``, else from the
    difficulty ranks; ``shares`` holds the :func:`srdata.curriculum.groups.group_shares` of each checked column.
    """
    from srdata import __version__

    position = DIFFICULTY_COLUMN if stratify is None else STRATIFIED_COLUMN
    summarised = score_columns(dict.fromkeys(ranks.columns), ranking.keys)
    n_valid = ranks[DIFFICULTY_COLUMN].count()
    *stage_ranges, dropped = range_summaries(ranks, [*bounds, (bounds[-1][1], n_valid)], summarised, position)
    return {
        "format_version": 1,
        "srdata_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "run_dir": str(run.path.resolve()),
            "config_hash": run.config_hash,
            "run_srdata_version": run.manifest.srdata_version,
            "annotated_rows": ranks.height,
            "valid_rows": n_valid,
            "invalid_rows": ranks.height - n_valid,
        },
        "settings": {
            **plan.describe(),
            "format": fmt,
            "compression": compression if fmt == "parquet" else None,
            "compression_level": compression_level(compression) if fmt == "parquet" else None,
            "stratify": stratify,
        },
        "ranking": ranking.describe(),
        "rank_columns": rank_columns_record(format_rank_by(ranking.keys), ranking.rrf_k, ranking.ties, run.manifest.ranking,
                                            run.manifest.config.metrics.rrf_k),
        "stages": [
            {"stage": s, "file": f.name, **summary, "new_rows": stop - (bounds[s - 1][1] if s else 0)}
            for s, ((_, stop), f, summary) in enumerate(zip(bounds, files, stage_ranges))
        ],
        "dropped": dropped,
        "groups": list(shares),
        "warnings": [warning for share in shares for warning in share["warnings"]],
    }


