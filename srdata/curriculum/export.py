"""Turn a scored run into SRD's curriculum: stage files plus ``curriculum.json``.

A run folder (written by ``srdata score``) holds ``annotated.parquet`` and
``manifest.json``. Export splits the valid rows, easiest first, into ``stages`` equal
parts, keeps the easiest ``keep`` of them and writes one file per kept stage:

- ``cumulative`` (the paper): stage s holds the easiest ``floor(N/stages) * (s+1)`` rows;
- ``disjoint``: stage s holds only part s.

When every part is kept (``keep == stages``) the last stage also takes the remainder
rows, as the authors' ``tools/rank.py`` does. ``fractions`` replaces the equal cuts by
cumulative boundaries (``0.25,0.5,0.75``); the rows past the last boundary are dropped.

``by`` checks every group of a column (template, task, source) against its share of each
stage and of the dropped part, and warns where a stage or the dropped part holds a group
far from its share (:mod:`srdata.curriculum.groups`); ``stratify`` cuts the stages inside every
group instead, from the ``stratified_rank`` order, so that every group keeps its share.

Inside a stage file the rows come part by part, easiest part first, each part in input
(``srd_id``) order, so the rows of cumulative stage s-1 are the first rows of stage s
(a disjoint stage is one part: input order). This lets export read the annotated rows
once and encode every part once, whatever the number of stages that hold it: each
encoded parquet row group is appended to every stage file that holds its part (see
``write_stages``), half the compression work of encoding every stage on its own.
Trainers shuffle within a stage anyway; sort by ``difficulty_rank`` for easiest-first.
Every file is written to a temporary name in the output folder and moved into place
with ``os.replace``, so a crash never leaves a half-written stage behind.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

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
from srdata.run.io import publish, remove_stale_temps, temp_path, write_json_atomic
from srdata.parquet_splice import (
    COPY_BLOCK_BYTES,
    AlignedBuffer,
    BlockFile,
    Footer,
    GROUP_COLUMNS,
    GROUP_NUM_ROWS,
    Struct,
    chunk_bytes_range,
    chunk_index,
    copy_bytes,
    footer_bytes,
    footer_from_bytes,
    get_field,
    moved_chunk,
    read_footer,
    row_groups,
    with_chunks,
    without_key_value_metadata,
)
from srdata.steps.rank import (
    CONTRACT_KEYS,
    DEFAULT_RRF_K,
    DIFFICULTY_COLUMN,
    FUSED_COLUMN,
    ID_COLUMN,
    INVALID_COLUMN,
    RankingError,
    RankKey,
    check_no_nan,
    format_rank_by,
    parse_rank_by,
    rank,
)

Layout = Literal["cumulative", "disjoint"]
Format = Literal["parquet", "jsonl"]
LAYOUTS: tuple[str, ...] = ("cumulative", "disjoint")
FORMATS: tuple[str, ...] = ("parquet", "jsonl")
STAGE_COLUMN = "stage"
ANNOTATED_FILE = "annotated.parquet"
MANIFEST_FILE = "manifest.json"
CURRICULUM_FILE = "curriculum.json"
DEFAULT_STAGES = 4
ZSTD_LEVEL = 1
STAGE_FILE_PATTERN = re.compile(r"stage-\d+\.(parquet|jsonl)")
QUEUED_BATCHES = 2  # per segment writer: enough to keep it busy, few enough to bound memory
ROW_GROUP_BYTES = 32 << 20  # Arrow bytes per parquet row group: ~85k rows of 300 chars (DuckDB writes 122,880 rows)
DICTIONARY_PAGE_BYTES = 64 << 10


class CurriculumError(ValueError):
    """A run that cannot be exported, or export settings that make no sense."""


@dataclass(frozen=True)
class Run:
    """A finished ``srdata score`` folder."""

    path: Path
    manifest: dict[str, Any]

    @property
    def annotated(self) -> Path:
        return self.path / ANNOTATED_FILE

    @property
    def config_hash(self) -> str | None:
        return self.manifest.get("config_hash")


@dataclass(frozen=True)
class StagePlan:
    """How to cut the ranked rows, independent of their number."""

    layout: str
    stages: int  # number of equal parts (0 when fractions are used)
    keep: int
    fractions: tuple[Fraction, ...] | None

    def describe(self) -> dict[str, Any]:
        cuts = self.fractions or tuple(Fraction(s + 1, self.stages) for s in range(self.keep))
        return {
            "layout": self.layout,
            "stages": self.stages if self.fractions is None else None,
            "keep": self.keep,
            "fractions": [float(f) for f in cuts],
        }


@dataclass(frozen=True)
class Ranking:
    """The ranking settings a curriculum is cut from, and whether export recomputes them."""

    keys: tuple[RankKey, ...]
    rrf_k: int
    ties: str
    recompute: bool

    def describe(self) -> dict[str, Any]:
        return {"rank_by": format_rank_by(self.keys), "rrf_k": self.rrf_k, "ties": self.ties, "recomputed": self.recompute}


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Open a run folder, refusing one whose scoring has not finished.

    Example:
        >>> read_run("runs/dolly").config_hash        # doctest: +SKIP
        '5f1c...'
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise CurriculumError(f"run folder {path} does not exist")
    manifest = read_manifest(path)
    if manifest.get("status") != "complete":
        raise CurriculumError(_unfinished_message(path, manifest))
    if not (path / ANNOTATED_FILE).is_file():
        raise CurriculumError(
            f"{path / ANNOTATED_FILE} is missing although the manifest says the run is complete; "
            "rerun the same `srdata score` command into this folder to rebuild it"
        )
    return Run(path, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a run folder, whatever its status."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CurriculumError(_not_a_run_message(path))
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CurriculumError(f"{manifest_path} is not valid JSON ({err})") from None


def _not_a_run_message(path: Path) -> str:
    """Why ``path`` is not a run folder, pointing to the run folder that exists nearby."""
    if (path / CURRICULUM_FILE).is_file() and (path.parent / MANIFEST_FILE).is_file():
        return f"{path} is an export (it holds {CURRICULUM_FILE}), not a run; its run is {path.parent}: `srdata export {path.parent}`"
    runs = sorted(p.name for p in path.iterdir() if (p / MANIFEST_FILE).is_file()) if path.is_dir() else []
    if runs:
        listed = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        return f"{path} is a folder of runs ({listed}), not a run; pass one of them, e.g. `srdata export {path / runs[0]}`"
    return f"{path} holds no srdata run ({MANIFEST_FILE} missing); create one with `srdata score ... --output {path}`"


def _unfinished_message(path: Path, manifest: dict[str, Any]) -> str:
    shards = manifest.get("shards", [])
    missing = [s for s in shards if not s.get("done") or not (path / s["file"]).is_file()]
    listed = ", ".join(f"{s['file']} (rows {s['start']}-{s['stop'] - 1})" for s in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    detail = f"{len(missing)} of {len(shards)} shards are missing: {listed}{more}" if missing else "no shard is missing, but the final merge did not run"
    return (
        f"the run in {path} is not finished (status {manifest.get('status')!r}): {detail}. "
        "Resume it by rerunning the same `srdata score` command"
    )


def plan_stages(
    stages: int | None = None,
    keep: int | None = None,
    fractions: Sequence[float] | None = None,
    layout: str = "cumulative",
) -> StagePlan:
    """Validate the stage settings; ``keep`` defaults to all parts but the hardest.

    Example:
        >>> plan_stages().describe()["fractions"]
        [0.25, 0.5, 0.75]
    """
    if layout not in LAYOUTS:
        raise CurriculumError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if fractions is not None:
        return _plan_from_fractions(stages, keep, fractions, layout)
    stages = DEFAULT_STAGES if stages is None else stages
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise CurriculumError(f"--stages must be a positive integer, got {stages!r}")
    keep = max(stages - 1, 1) if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise CurriculumError(f"--keep must be a positive integer, got {keep!r}")
    if keep > stages:
        raise CurriculumError(f"--keep {keep} is larger than --stages {stages}: at most {stages} stages can be kept")
    return StagePlan(layout, stages, keep, None)


def _plan_from_fractions(stages: int | None, keep: int | None, fractions: Sequence[float], layout: str) -> StagePlan:
    if stages is not None:
        raise CurriculumError("give either --stages or --fractions, not both: fractions set the stage boundaries")
    cuts = tuple(_exact_fraction(f) for f in fractions)
    if not cuts:
        raise CurriculumError("--fractions is empty; give increasing boundaries such as 0.25,0.5,0.75")
    if any(not 0 < c <= 1 for c in cuts):
        raise CurriculumError(f"--fractions must lie in (0, 1], got {', '.join(str(float(c)) for c in cuts)}")
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise CurriculumError(f"--fractions must be strictly increasing, got {', '.join(str(float(c)) for c in cuts)}")
    if keep is not None and keep != len(cuts):
        raise CurriculumError(f"--keep {keep} disagrees with the {len(cuts)} boundaries given by --fractions")
    return StagePlan(layout, 0, len(cuts), cuts)


def _exact_fraction(value: float | str) -> Fraction:
    # Fraction of the decimal text, not of the binary float: 0.29 * 100 must give 29 rows.
    try:
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise CurriculumError(f"--fractions entry {value!r} is not a number") from None


def stage_bounds(n_valid: int, plan: StagePlan) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` positions in easy-to-hard order of every kept stage.

    Example:
        >>> stage_bounds(10, plan_stages(4, 3))
        [(0, 2), (0, 4), (0, 6)]
    """
    ends = _part_ends(n_valid, plan)
    starts = [0] * len(ends) if plan.layout == "cumulative" else [0, *ends[:-1]]
    return list(zip(starts, ends))


def _part_ends(n_valid: int, plan: StagePlan) -> list[int]:
    if plan.fractions is None:
        size = n_valid // plan.stages
        if size == 0:
            raise CurriculumError(f"only {n_valid} rankable rows, fewer than the {plan.stages} stages: every stage would be empty")
        ends = [size * (s + 1) for s in range(plan.keep)]
        return ends[:-1] + [n_valid] if plan.keep == plan.stages else ends
    ends = [int(c * n_valid) for c in plan.fractions]  # exact floor of a Fraction
    for s, (before, end) in enumerate(zip([0, *ends], ends)):
        if end == before:
            raise CurriculumError(f"with {n_valid} rankable rows, stage {s} of --fractions would be empty; use fewer or wider stages")
    return ends


def resolve_ranking(
    run: Run,
    rank_by: str | Sequence[RankKey] | None = None,
    rrf_k: int | None = None,
    ties: str | None = None,
) -> Ranking:
    """The run's current ranking, with any option given here overriding it (and forcing a re-rank)."""
    current = run.manifest.get("ranking") or {}
    keys = parse_rank_by(rank_by if rank_by is not None else current.get("rank_by"))
    k = rrf_k if rrf_k is not None else current.get("rrf_k", scoring_rrf_k(run.manifest))
    tie_mode = ties if ties is not None else current.get("ties", "input")
    asked = rank_by is not None or rrf_k is not None or ties is not None
    return Ranking(keys, k, tie_mode, recompute=asked or not _has_ranks(run))


def scoring_rrf_k(manifest: dict[str, Any]) -> int:
    """The RRF k that ``srdata score`` ranked with (``config.metrics.rrf_k``)."""
    config = manifest.get("config") or {}
    return (config.get("metrics") or {}).get("rrf_k", config.get("rrf_k", DEFAULT_RRF_K))


def _has_ranks(run: Run) -> bool:
    return {DIFFICULTY_COLUMN, FUSED_COLUMN} <= set(pl.read_parquet_schema(run.annotated))


def export_curriculum(
    run_dir: str | os.PathLike[str],
    stages: int | None = None,
    keep: int | None = None,
    layout: Layout = "cumulative",
    fractions: Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    fmt: Format = "parquet",
    rank_by: str | Sequence[RankKey] | None = None,
    rrf_k: int | None = None,
    ties: str | None = None,
    compression: str = "zstd",
    by: str | Sequence[str] | None = None,
    stratify: str | None = None,
    max_share_ratio: float = DEFAULT_MAX_SHARE_RATIO,
    min_group_rows: int = DEFAULT_MIN_GROUP_ROWS,
) -> Path:
    """Write ``stage-K.parquet`` (or ``.jsonl``) and ``curriculum.json``; return the folder.

    Defaults follow the paper: 4 stages, keep the easiest 3, cumulative. Ranking options
    (``rank_by``, ``rrf_k``, ``ties``) re-rank in memory without touching the run.

    ``by`` (one column or several) records each group's share of every stage and of the
    dropped part in ``curriculum.json`` and raises a
    :class:`~srdata.curriculum.groups.GroupShareWarning` for every group whose share of a part is
    more than ``max_share_ratio`` times, or less than ``1 / max_share_ratio`` of, its share
    of all ranked rows (groups of at least ``min_group_rows`` rows). ``stratify`` cuts the
    stages inside each group of that column, so every group keeps its share (the stage
    files then carry ``stratified_rank``, the order they were cut from); it is also checked.

    Example:
        >>> out = export_curriculum("runs/dolly")               # doctest: +SKIP
        >>> sorted(p.name for p in out.iterdir())               # doctest: +SKIP
        ['curriculum.json', 'stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
        >>> out = export_curriculum("runs/t0", by="template", stratify="template")   # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise CurriculumError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    plan = plan_stages(stages, keep, fractions, layout)
    check = share_check(max_share_ratio, min_group_rows)
    run = read_run(run_dir)
    group_columns = _group_columns(run, by, stratify)
    ranking = resolve_ranking(run, rank_by, rrf_k, ties)
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
    del groups
    out_dir = prepare_output(Path(out) if out is not None else run.path / "curriculum")
    remove_stale_temps(out_dir)  # left by an earlier export that was killed
    # Summarised before the rows are streamed, so that the score columns are freed first:
    # on a VM, memory that is reused is much cheaper than memory touched for the first time.
    summary = curriculum_summary(
        run, plan, ranking, ranks, bounds, stage_file_paths(out_dir, len(bounds), fmt), fmt, compression,
        stratify=stratify, shares=shares,
    )
    new_columns = [*(_rank_output_columns(ranks) if ranking.recompute else []), *([STRATIFIED_COLUMN] if stratify else [])]
    new_ranks = ranks.select(new_columns) if new_columns else None
    del ranks
    files = write_stages(_ranked_rows(run, new_ranks), bounds, out_dir, fmt, compression, position_column=position)
    for stage, file in zip(summary["stages"], files):
        stage["file_bytes"] = file.stat().st_size  # load_curriculum checks each file against it
    write_json_atomic(out_dir / CURRICULUM_FILE, summary)
    _remove_stale_stage_files(out_dir, keep_names={f.name for f in files})
    emit_warnings(summary["warnings"])
    return out_dir


def share_check(max_share_ratio: float = DEFAULT_MAX_SHARE_RATIO, min_group_rows: int = DEFAULT_MIN_GROUP_ROWS) -> ShareCheck:
    """The share-check settings, validated (a :class:`CurriculumError` names the bad one).

    Example:
        >>> share_check(3.0).describe()
        {'max_share_ratio': 3.0, 'min_group_rows': 40}
    """
    try:
        return ShareCheck(max_share_ratio, min_group_rows)
    except GroupError as err:
        raise CurriculumError(str(err)) from None


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


def ranks_in_file_order(run: Run, ranking: Ranking) -> pl.DataFrame:
    """Score and rank columns of every row, in the row order of ``annotated.parquet``."""
    schema = pl.read_parquet_schema(run.annotated)
    _check_keys_exist(schema, ranking.keys)
    score_columns = _score_columns(schema, ranking.keys)
    if not ranking.recompute:
        rank_columns = [k.rank_column for k in ranking.keys if k.rank_column in schema]
        wanted = [ID_COLUMN, *score_columns, *rank_columns, FUSED_COLUMN, DIFFICULTY_COLUMN]
        ranks = pl.read_parquet(run.annotated, columns=list(dict.fromkeys(wanted)))
        ranked_rows = ranks.filter(pl.col(DIFFICULTY_COLUMN).is_not_null())
        check_no_nan(ranked_rows, [RankKey(c, descending=False) for c in score_columns])
        return ranks
    optional = [INVALID_COLUMN] if INVALID_COLUMN in schema else []
    scores = pl.read_parquet(run.annotated, columns=[ID_COLUMN, *score_columns, *optional])
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
            raise RankingError(
                f"--rank-by column {key.column!r} does not exist in the run; numeric columns: {', '.join(numeric) or 'none'}"
            )


def _score_columns(schema: dict[str, Any], keys: Sequence[RankKey]) -> list[str]:
    contract = [column for column, _ in CONTRACT_KEYS if column in schema]
    return list(dict.fromkeys([*contract, *(k.column for k in keys if k.column in schema)]))


def _rank_output_columns(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("rank_") or c in (FUSED_COLUMN, DIFFICULTY_COLUMN)]


def _ranked_rows(run: Run, new_columns: pl.DataFrame | None) -> pl.LazyFrame:
    """The annotated rows, lazily, with every column of ``new_columns`` (fresh ranks, in file order) zipped on."""
    rows = pl.scan_parquet(run.annotated)
    if new_columns is None:
        return rows
    original = rows.collect_schema().names()
    outputs = new_columns.columns
    # A row-wise zip, not a join: new_columns is in file order, and a zip streams.
    zipped = pl.concat([rows.drop(outputs, strict=False), new_columns.lazy()], how="horizontal")
    return zipped.select([*original, *(c for c in outputs if c not in original)])


def prepare_output(out_dir: Path, what: str = "output folder") -> Path:
    """Create the output folder and prove it is writable before any work is done."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CurriculumError(f"{what} {out_dir} is not writable: {err.strerror or err}") from None
    return out_dir


def write_stages(
    rows: pl.LazyFrame,
    bounds: Sequence[tuple[int, int]],
    out_dir: Path,
    fmt: str,
    compression: str = "zstd",
    position_column: str = DIFFICULTY_COLUMN,
) -> list[Path]:
    """Write one file per stage (rows whose ``position_column`` is in ``(start, stop]``); return the final paths.

    The rows are read once. Every boundary cuts them into disjoint segments (the paper's
    three cumulative stages are three segments); each row goes to its segment's writer,
    and each segment is encoded and compressed once, on its own thread. Parquet: each
    row group is appended byte for byte to every stage file that holds its segment (only
    the small ``stage`` column chunk is re-made for the later stages). JSON lines: each
    segment is written to a file of its own, and the stage files are concatenated from
    them with the ``stage`` value rewritten. A cumulative stage's rows thus come segment
    by segment, easiest first, in input order inside each segment, and stage s-1 is the
    first part of stage s.

    Example:
        >>> rows = pl.scan_parquet("runs/dolly/annotated.parquet")             # doctest: +SKIP
        >>> write_stages(rows, [(0, 10), (0, 20)], Path("out"), "parquet")    # doctest: +SKIP
        [PosixPath('out/stage-0.parquet'), PosixPath('out/stage-1.parquet')]
    """
    rows = rows.drop(STAGE_COLUMN, strict=False)  # a stale `stage` column is replaced, last
    segments, members = _segments(bounds)
    finals = stage_file_paths(out_dir, len(bounds), fmt)
    temps = _TempFiles(out_dir)
    try:
        if fmt == "parquet":
            stage_files = _write_parquet_stages(rows, segments, members, compression, temps, position_column)
        else:
            stage_files = _write_jsonl_stages(rows, segments, members, temps, position_column)
        # Every stage is encoded: the old curriculum.json goes before the first file is
        # replaced, so a kill among the renames leaves no curriculum, never an old summary
        # beside new stage files (a failure before this point leaves the old export intact).
        (out_dir / CURRICULUM_FILE).unlink(missing_ok=True)
        for stage_file, final in zip(stage_files, finals):
            publish(stage_file, final)
    finally:
        temps.remove_all()
    return finals


def stage_file_paths(out_dir: Path, n_stages: int, fmt: str) -> list[Path]:
    """Where ``write_stages`` puts each stage: ``stage-0.parquet``, ``stage-1.parquet``, ...

    Example:
        >>> [p.name for p in stage_file_paths(Path("out"), 2, "jsonl")]
        ['stage-0.jsonl', 'stage-1.jsonl']
    """
    return [out_dir / f"stage-{s}.{fmt}" for s in range(n_stages)]


@dataclass(frozen=True)
class _Segment:
    """Easy-to-hard positions ``[start, stop)`` written once, with ``stage`` = ``first_stage``."""

    start: int
    stop: int
    first_stage: int


def _segments(bounds: Sequence[tuple[int, int]]) -> tuple[list[_Segment], list[list[int]]]:
    """The disjoint segments between all stage boundaries, and each stage's segments in order.

    Example:
        >>> [(g.start, g.stop) for g in _segments([(0, 2), (0, 4), (0, 6)])[0]], _segments([(0, 2), (0, 4)])[1]
        ([(0, 2), (2, 4), (4, 6)], [[0], [0, 1]])
    """
    points = sorted({p for bound in bounds for p in bound})
    pieces = [(a, b) for a, b in zip(points, points[1:]) if any(start <= a and b <= stop for start, stop in bounds)]
    members = [[g for g, (a, b) in enumerate(pieces) if start <= a and b <= stop] for start, stop in bounds]
    first = [min(s for s, m in enumerate(members) if g in m) for g in range(len(pieces))]
    return [_Segment(a, b, f) for (a, b), f in zip(pieces, first)], members


class _TempFiles:
    """Temporary files in the output folder, all removed at the end, whatever happens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []

    def new(self, name: str) -> Path:
        path = temp_path(self.folder / name)
        self.paths.append(path)
        return path

    def remove_all(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Schemas:
    """The Arrow schema the stage files declare, and the one their rows are encoded from.

    Polars holds strings as views; converting them to Arrow's ``large_string`` copies
    every text (about 12% of the encoding CPU at 10M rows). Top-level string and
    binary columns are therefore encoded straight from ``string_view``/``binary_view``
    arrays. Parquet stores both types identically (BYTE_ARRAY, STRING), so only the
    footer's ``ARROW:schema`` entry differs: every stage file gets ``footer`` (that of an
    empty file of ``public``), and readers see the same types as before.
    """

    public: pa.Schema
    encoded: pa.Schema
    footer: Footer


def _output_schemas(rows: pl.LazyFrame, compression: str, temps: _TempFiles) -> _Schemas:
    """The stage files' schema (the rows' columns, then ``stage``) and how to encode it."""
    empty = pl.DataFrame(schema=rows.collect_schema()).with_columns(pl.lit(0, dtype=pl.Int64).alias(STAGE_COLUMN))
    public = empty.to_arrow().schema
    public_footer = _empty_file_footer(public, compression, temps.new("public-schema.parquet"))
    views = {pa.large_string(): pa.string_view(), pa.large_binary(): pa.binary_view()}
    encoded = pa.schema([f.with_type(views.get(f.type, f.type)) for f in public], metadata=public.metadata)
    if encoded.equals(public):
        return _Schemas(public, public, public_footer)
    # Only ever a faster path: if this pyarrow cannot write views, or writes anything but
    # ARROW:schema differently for them, encode from the public types.
    try:
        encoded_footer = _empty_file_footer(encoded, compression, temps.new("encoded-schema.parquet"))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return _Schemas(public, public, public_footer)
    if without_key_value_metadata(encoded_footer) != without_key_value_metadata(public_footer):
        return _Schemas(public, public, public_footer)
    return _Schemas(public, encoded, public_footer)


def _empty_file_footer(schema: pa.Schema, compression: str, path: Path) -> Footer:
    _parquet_writer(path, schema, compression).close()
    return read_footer(path)


def _write_segments(
    rows: pl.LazyFrame, segments: Sequence[_Segment], sinks: Sequence["_TeeParquetSink | _JsonlSink"], position_column: str = DIFFICULTY_COLUMN
) -> None:
    """Stream the rows once and send each to its segment's writer thread."""
    if not segments:
        return
    writers = [_SegmentWriter(sink) for sink in sinks]
    failed = False
    try:
        for batch in rows.collect_batches(maintain_order=True):
            segment_of_row = _segment_of_rows(batch, segments, position_column)
            for g, writer in enumerate(writers):
                in_segment = segment_of_row == g
                if in_segment.any():
                    writer.put(batch.filter(in_segment))
            _raise_first_error(writers)
    except BaseException:
        failed = True
        raise
    finally:
        for writer in writers:
            writer.finish(discard=failed)
    _raise_first_error(writers)


def _segment_of_rows(rows: pl.DataFrame, segments: Sequence[_Segment], position_column: str = DIFFICULTY_COLUMN) -> pl.Series:
    """Each row's segment index; -1 for rows in no segment (invalid or dropped).

    A polars expression, not numpy: ~10x faster per batch, and this runs on the thread
    that feeds every encoder.
    """
    rank = pl.col(position_column)  # 1-based: the row at easy-to-hard position p has rank p + 1
    segment = pl.lit(-1, dtype=pl.Int32)  # a null rank (invalid row) matches no segment
    for g, piece in reversed(list(enumerate(segments))):
        segment = pl.when((rank > piece.start) & (rank <= piece.stop)).then(pl.lit(g, dtype=pl.Int32)).otherwise(segment)
    return rows.select(segment).to_series()


def _raise_first_error(writers: Sequence["_SegmentWriter"]) -> None:
    for writer in writers:
        if writer.error is not None:
            raise writer.error


class _SegmentWriter:
    """Encodes one segment on its own thread, fed through a bounded queue.

    pyarrow and polars release the GIL while encoding and compressing, so the segments
    and the reading thread share the cores; the bounded queue keeps memory bounded.
    """

    def __init__(self, sink: "_TeeParquetSink | _JsonlSink") -> None:
        self.sink = sink
        self.error: BaseException | None = None
        self._queue: queue.Queue[pl.DataFrame | None] = queue.Queue(maxsize=QUEUED_BATCHES)
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="srdata-segment-writer", daemon=True)
        self._thread.start()

    def put(self, rows: pl.DataFrame) -> None:
        self._queue.put(rows)

    def finish(self, discard: bool = False) -> None:
        """Let the thread write what it has (or drop it) and wait for it; never raises."""
        self._discard = discard
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        got_end = False
        try:
            while (rows := self._queue.get()) is not None:
                if not self._discard:
                    self.sink.write(rows)
            got_end = True
            self.sink.close(complete=not self._discard)
        except BaseException as err:  # handed to the reading thread, which raises it
            self.error = err
            with suppress(BaseException):  # the file is temporary: the first error is the one to report
                self.sink.close(complete=False)
            while not got_end and self._queue.get() is not None:  # keep the reader from blocking on put
                pass


def _write_parquet_stages(
    rows: pl.LazyFrame,
    segments: Sequence[_Segment],
    members: Sequence[Sequence[int]],
    compression: str,
    temps: _TempFiles,
    position_column: str = DIFFICULTY_COLUMN,
) -> list[Path]:
    """Write every stage file; return their temporary paths.

    Each segment's rows are encoded once into row groups, and every row group is appended,
    byte for byte, to each stage file that holds its segment (three files for the
    easiest rows of the paper's three cumulative stages), in aligned blocks that bypass
    the page cache (``BlockFile``). Each file's footer then lists its row groups in
    segment order; a row group appended to a later stage than its segment's first gets a
    ``stage`` column chunk of that stage's value, written after the row groups (the
    original chunk stays in the file, unreferenced).
    """
    schema = _output_schemas(rows, compression, temps)
    paths = [temps.new(f"stage-{s}.parquet") for s in range(len(members))]
    files: list[BlockFile] = []
    try:
        files += [BlockFile(path) for path in paths]
        sinks = [
            _TeeParquetSink(segment.first_stage, schema.encoded, compression, [files[s] for s, held in enumerate(members) if g in held])
            for g, segment in enumerate(segments)
        ]
        _write_segments(rows, segments, sinks, position_column)
        for s, (file, held) in enumerate(zip(files, members)):
            file.finish(_stage_file_end(s, file, [(segments[g], sinks[g]) for g in held], schema, compression))
    finally:
        for file in files:
            file.close()
    return paths


def _stage_file_end(stage: int, file: BlockFile, parts: Sequence[tuple[_Segment, "_TeeParquetSink"]], schema: _Schemas, compression: str) -> bytes:
    """What follows a stage file's row groups: relabelled ``stage`` column chunks, then the footer."""
    relabelled = [get_field(group, GROUP_NUM_ROWS) for segment, sink in parts if segment.first_stage != stage for group in row_groups(sink.footer)]
    stage_chunks = iter(_stage_column_chunks(stage, relabelled, schema.public, compression))
    tail = bytearray()
    groups: list[Struct] = []
    for segment, sink in parts:
        for group, (start, offsets) in zip(row_groups(sink.footer), sink.placed):
            chunks = [moved_chunk(chunk, offsets[sink.files.index(file)] - start) for chunk in get_field(group, GROUP_COLUMNS)[1]]
            if segment.first_stage != stage:
                data, chunk = next(stage_chunks)
                chunks[chunk_index(group, STAGE_COLUMN)] = moved_chunk(chunk, file.end + len(tail) - chunk_bytes_range(chunk)[0])
                tail += data
            groups.append(with_chunks(group, chunks, len(groups)))
    return bytes(tail) + footer_bytes(schema.footer, groups)


def _stage_column_chunks(stage: int, row_counts: Sequence[int], schema: pa.Schema, compression: str) -> list[tuple[bytes, Struct]]:
    """One ``stage`` column chunk (its bytes and footer entry) per row count, all of value ``stage``."""
    if not row_counts:
        return []
    column_schema = pa.schema([schema.field(STAGE_COLUMN)])
    sink = pa.BufferOutputStream()
    with _parquet_writer(sink, column_schema, compression) as writer:
        for rows in row_counts:
            # From a buffer: pa.scalar or pa.array would import pandas (0.3 s) on first use.
            values = pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(np.full(rows, stage, dtype=np.int64))])
            writer.write_table(pa.table([values], schema=column_schema), row_group_size=max(rows, 1))
    data = sink.getvalue().to_pybytes()
    chunks = []
    for group in row_groups(footer_from_bytes(data)):
        chunk = get_field(group, GROUP_COLUMNS)[1][0]
        start, length = chunk_bytes_range(chunk)
        chunks.append((data[start : start + length], chunk))
    return chunks


class _PyArrowTarget:
    """The file-like object pyarrow writes a segment to: bytes are kept until a row group is whole."""

    closed = False

    def __init__(self, buffer: AlignedBuffer) -> None:
        self.buffer = buffer
        self.position = 0  # offsets in pyarrow's footer are counted from here

    def write(self, data: bytes) -> int:
        size = memoryview(data).nbytes
        self.buffer.append(data)
        self.position += size
        return size

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _TeeParquetSink:
    """A segment encoded once, in row groups of about ``ROW_GROUP_BYTES`` of Arrow data, each
    appended to every stage file that holds the segment."""

    def __init__(self, stage: int, schema: pa.Schema, compression: str, files: Sequence[BlockFile]) -> None:
        self.stage = stage
        self.schema = schema
        self.files = list(files)
        self.io = _BlockWriter()
        self.target = _PyArrowTarget(self.io.free_buffer())
        self.writer = _parquet_writer(pa.PythonFile(self.target, mode="w"), schema, compression)
        self.target.buffer.clear()  # the leading magic: every stage file has its own
        self.placed: list[tuple[int, list[int]]] = []  # per row group: its offset for pyarrow, and in each file
        self.footer: Footer | None = None
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0

    def write(self, rows: pl.DataFrame) -> None:
        # newest(): strings as zero-copy views (see _Schemas); other types are cast if they differ.
        table = rows.with_columns(pl.lit(self.stage, dtype=pl.Int64).alias(STAGE_COLUMN)).to_arrow(compat_level=pl.CompatLevel.newest())
        self.pending.append(table if table.schema == self.schema else table.cast(self.schema))
        self.pending_bytes += rows.estimated_size()  # table.nbytes counts the whole buffers a view points into
        if self.pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending)
            self.writer.write_table(table, row_group_size=table.num_rows)  # one row group
            start = self.target.position - self.target.buffer.size
            block = self.target.buffer.padded()
            offsets = [file.reserve(len(block)) for file in self.files]
            self.placed.append((start, offsets))
            # Written on the I/O thread while the next row group is encoded into another buffer.
            self.io.submit(self.target.buffer, block, list(zip(self.files, offsets)))
            self.target.buffer = self.io.free_buffer()
        self.pending, self.pending_bytes = [], 0

    def close(self, complete: bool) -> None:
        try:
            if complete:
                self._flush()
            self.pending = []
            self.writer.close()  # pyarrow's footer: what is left in the buffer
        finally:
            self.io.finish()  # every row group written (or the first write error raised)
        if complete:
            self.footer = footer_from_bytes(bytes(self.target.buffer.content()))
            self._check_layout()


    def _check_layout(self) -> None:
        # Every row group's chunks lie in the bytes that were appended for it; a pyarrow that
        # wrote anything else between row groups would make the moved offsets wrong.
        assert self.footer is not None
        groups = row_groups(self.footer)
        if len(groups) != len(self.placed):
            raise RuntimeError(f"pyarrow wrote {len(groups)} row groups, {len(self.placed)} were appended")
        ends = [start for start, _ in self.placed[1:]] + [self.target.position - self.target.buffer.size]
        for group, (start, _), end in zip(groups, self.placed, ends):
            for chunk in get_field(group, GROUP_COLUMNS)[1]:
                first, length = chunk_bytes_range(chunk)
                if not start <= first <= first + length <= end:
                    raise RuntimeError("a parquet column chunk lies outside its row group's bytes")


class _BlockWriter:
    """Writes one segment's row groups to their stage files on a thread of its own.

    Two buffers: pyarrow encodes the next row group into one while the other is written,
    so the encoder never waits for the disk (O_DIRECT writes wait for the device).
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._free: queue.Queue[AlignedBuffer] = queue.Queue()
        for _ in range(2):
            self._free.put(AlignedBuffer())
        self._todo: queue.Queue[tuple[AlignedBuffer, memoryview, list[tuple[BlockFile, int]]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="srdata-block-writer", daemon=True)
        self._thread.start()

    def free_buffer(self) -> AlignedBuffer:
        """An empty buffer, once one is free (at most one row group waits to be written)."""
        buffer = self._free.get()
        if self.error is not None:
            raise self.error
        return buffer

    def submit(self, buffer: AlignedBuffer, block: memoryview, writes: list[tuple[BlockFile, int]]) -> None:
        if self.error is not None:
            raise self.error
        self._todo.put((buffer, block, writes))

    def finish(self) -> None:
        self._todo.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            buffer, block, writes = job
            try:
                if self.error is None:
                    for file, offset in writes:
                        file.write_at(block, offset)
            except BaseException as err:  # raised on the encoding thread at its next step
                self.error = err
            finally:
                block.release()  # the buffer's memory may be remapped once it is reused
                del job, block
                buffer.clear()
                self._free.put(buffer)

class _JsonlSink:
    """A JSON-lines file, one object per row, ``stage`` its last key."""

    def __init__(self, path: Path, stage: int) -> None:
        self.stage = stage
        self.handle = open(path, "wb")

    def write(self, rows: pl.DataFrame) -> None:
        rows.with_columns(pl.lit(self.stage, dtype=pl.Int64).alias(STAGE_COLUMN)).write_ndjson(self.handle)

    def close(self, complete: bool) -> None:
        self.handle.close()


def _parquet_writer(path: Path, schema: pa.Schema, compression: str) -> pq.ParquetWriter:
    codec = "none" if compression == "uncompressed" else compression
    delta = [f.name for f in schema if pa.types.is_integer(f.type)]
    return pq.ParquetWriter(
        path,
        schema,
        compression=codec,
        compression_level=_compression_level(compression),
        # Integer columns (srd_id, the ranks, stage) as DELTA_BINARY_PACKED: a rank is a
        # shuffled 1..N, which zstd barely shrinks from 8 bytes; bit-packed deltas take
        # ~3, smaller than plain + zstd, for a third of its CPU time. Every parquet
        # reader in use (pyarrow, polars, duckdb, Spark 3.3+) decodes them.
        use_dictionary=[c for c in _leaf_columns(schema) if c not in delta] if delta else True,
        column_encoding=dict.fromkeys(delta, "DELTA_BINARY_PACKED") or None,
        # Dictionaries only for columns with few distinct values: the hashing of a long
        # text or a float column until its dictionary overflows costs ~10% of the encoding.
        dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES,
        write_page_index=False,  # row groups are later copied into other files, which moves them
    )


@functools.lru_cache(maxsize=16)
def _leaf_columns(schema: pa.Schema) -> tuple[str, ...]:
    """Parquet's leaf column paths of ``schema`` (``meta.x``, ``tokens.list.element``)."""
    sink = pa.BufferOutputStream()
    # from_batches, not schema.empty_table(): that builds arrays with pa.array, which imports
    # pandas on first use (0.4-0.8 s, inside every export).
    pq.write_table(pa.Table.from_batches([], schema=schema), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return tuple(parquet_schema.column(i).path for i in range(len(parquet_schema)))


@dataclass(frozen=True)
class _Written:
    """A segment's temporary JSON-lines file."""

    segment: _Segment
    path: Path


def _write_jsonl_stages(
    rows: pl.LazyFrame,
    segments: Sequence[_Segment],
    members: Sequence[Sequence[int]],
    temps: _TempFiles,
    position_column: str = DIFFICULTY_COLUMN,
) -> list[Path]:
    """Write each segment once as JSON lines, then every stage file from its segments; return their temporary paths."""
    segment_files = [temps.new(f"segment-{g}.jsonl") for g in range(len(segments))]
    sinks = [_JsonlSink(path, segment.first_stage) for segment, path in zip(segments, segment_files)]
    _write_segments(rows, segments, sinks, position_column)
    written = [_Written(segment, path) for segment, path in zip(segments, segment_files)]
    # Side by side: mostly reading and writing blocks, which release the GIL.
    with ThreadPoolExecutor(max_workers=max(1, min(len(members), os.cpu_count() or 1))) as pool:
        return list(pool.map(_jsonl_stage_file, range(len(members)), [[written[g] for g in held] for held in members], [temps] * len(members)))


def _jsonl_stage_file(stage: int, parts: Sequence[_Written], temps: _TempFiles) -> Path:
    """The temporary file that becomes a JSON-lines stage file: a segment as written, or a concatenation."""
    if len(parts) == 1 and parts[0].segment.first_stage == stage:
        return parts[0].path  # written with this stage's value already: moved, not copied
    path = temps.new(f"stage-{stage}.jsonl")
    _concat_jsonl(path, stage, parts)
    return path


def _concat_jsonl(path: Path, stage: int, parts: Sequence[_Written]) -> None:
    with open(path, "wb") as out:
        for part in parts:
            _copy_jsonl(part.path, out, part.segment.first_stage, stage)


def _copy_jsonl(source: Path, out: BinaryIO, written_stage: int, stage: int) -> None:
    if written_stage == stage:
        out.flush()
        with open(source, "rb") as handle:
            copy_bytes(handle.fileno(), out.fileno(), 0, os.fstat(handle.fileno()).st_size)
        return
    # Every line ends with `,"stage":N}`: `stage` is the last key, and a raw newline
    # never occurs inside a JSON line, so the replacement touches nothing else.
    old, new = f',"stage":{written_stage}}}\n'.encode(), f',"stage":{stage}}}\n'.encode()
    rest = b""
    with open(source, "rb") as handle:
        while block := handle.read(COPY_BLOCK_BYTES):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            out.write(block[:cut].replace(old, new))
            rest = block[cut:]
    out.write(rest)


def _sink(rows: pl.LazyFrame, path: Path, fmt: str, compression: str) -> None:
    if fmt == "parquet":
        rows.sink_parquet(path, compression=compression, compression_level=_compression_level(compression))
    else:
        rows.sink_ndjson(path)


def _compression_level(compression: str) -> int | None:
    # zstd level 1 instead of polars' default 3: about 30% less CPU for 10% larger files,
    # a good trade for files written once per export.
    return ZSTD_LEVEL if compression == "zstd" else None


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
    score_columns = _score_columns(dict.fromkeys(ranks.columns), ranking.keys)
    n_valid = ranks[DIFFICULTY_COLUMN].count()
    *stage_ranges, dropped = _range_summaries(ranks, [*bounds, (bounds[-1][1], n_valid)], score_columns, position)
    return {
        "format_version": 1,
        "srdata_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "run_dir": str(run.path.resolve()),
            "config_hash": run.config_hash,
            "run_srdata_version": run.manifest.get("srdata_version"),
            "annotated_rows": ranks.height,
            "valid_rows": n_valid,
            "invalid_rows": ranks.height - n_valid,
        },
        "settings": {
            **plan.describe(),
            "format": fmt,
            "compression": compression if fmt == "parquet" else None,
            "compression_level": _compression_level(compression) if fmt == "parquet" else None,
            "stratify": stratify,
        },
        "ranking": ranking.describe(),
        "stages": [
            {"stage": s, "file": f.name, **summary, "new_rows": stop - (bounds[s - 1][1] if s else 0)}
            for s, ((_, stop), f, summary) in enumerate(zip(bounds, files, stage_ranges))
        ],
        "dropped": dropped,
        "groups": list(shares),
        "warnings": [warning for share in shares for warning in share["warnings"]],
    }


def _range_summaries(
    ranks: pl.DataFrame, ranges: Sequence[tuple[int, int]], score_columns: Sequence[str], position: str = DIFFICULTY_COLUMN
) -> list[dict[str, Any]]:
    """Size, rank and score thresholds of the rows at each range of easy-to-hard positions [start, stop).

    One grouped pass over the rows: aggregates per piece between any two range
    boundaries, combined per range (the cumulative stages overlap). Positions are the
    ``position`` column (the difficulty rank, or the stratified rank).
    """
    points = sorted({p for r in ranges for p in r})
    pieces = _piece_aggregates(ranks, points, score_columns, position)
    return [
        _combine_pieces([pieces[i] for i in range(len(points) - 1) if start <= points[i] and points[i + 1] <= stop and i in pieces], score_columns, position)
        for start, stop in ranges
    ]


def _piece_aggregates(ranks: pl.DataFrame, points: Sequence[int], score_columns: Sequence[str], position_column: str = DIFFICULTY_COLUMN) -> dict[int, dict[str, Any]]:
    """Per piece ``i`` = easy-to-hard positions ``[points[i], points[i+1])``: count, min, max, sum."""
    position = pl.col(position_column).fill_null(0) - 1  # null (not ranked) -> -1, in no piece
    piece = pl.sum_horizontal([(position >= p).cast(pl.Int8) for p in points]) - 1
    aggregates = [pl.len().alias("rows")]
    for column in dict.fromkeys((DIFFICULTY_COLUMN, position_column, FUSED_COLUMN, *score_columns)):
        aggregates += [pl.col(column).min().alias(f"{column}:min"), pl.col(column).max().alias(f"{column}:max")]
    for column in score_columns:
        aggregates += [pl.col(column).sum().alias(f"{column}:sum"), pl.col(column).count().alias(f"{column}:count")]
    grouped = ranks.lazy().group_by(piece.alias("piece")).agg(aggregates).collect()  # lazy: parallel, no copies
    return {row.pop("piece"): row for row in grouped.iter_rows(named=True)}


def _combine_pieces(pieces: Sequence[dict[str, Any]], score_columns: Sequence[str], position: str = DIFFICULTY_COLUMN) -> dict[str, Any]:
    rows = sum(piece["rows"] for piece in pieces)
    if rows == 0:
        return {"rows": 0}

    def low(column: str) -> Any:
        return min(piece[f"{column}:min"] for piece in pieces)

    def high(column: str) -> Any:
        return max(piece[f"{column}:max"] for piece in pieces)

    def mean(column: str) -> float | None:
        count = sum(piece[f"{column}:count"] for piece in pieces)
        return sum(piece[f"{column}:sum"] for piece in pieces) / count if count else None

    if position == DIFFICULTY_COLUMN:
        thresholds = {"max_difficulty_rank": high(DIFFICULTY_COLUMN), "min_rrf_score": low(FUSED_COLUMN)}
    else:
        # Cut within groups: no difficulty or score threshold separates the stages, only the order cut from.
        thresholds = {f"max_{position}": high(position)}
    return {
        "rows": rows,
        "difficulty_rank": {"min": low(DIFFICULTY_COLUMN), "max": high(DIFFICULTY_COLUMN)},
        "rrf_score": {"min": low(FUSED_COLUMN), "max": high(FUSED_COLUMN)},
        "thresholds": thresholds,
        "scores": {c: {"min": low(c), "max": high(c), "mean": mean(c)} for c in score_columns},
    }


def _remove_stale_stage_files(out_dir: Path, keep_names: set[str]) -> None:
    # A previous export with more stages (or the other format) would leave files that
    # curriculum.json no longer lists; remove only names this module writes.
    for path in out_dir.iterdir():
        if STAGE_FILE_PATTERN.fullmatch(path.name) and path.name not in keep_names:
            path.unlink()


def rerank_run(
    run_dir: str | os.PathLike[str],
    rank_by: str | Sequence[RankKey] | None = None,
    rrf_k: int = DEFAULT_RRF_K,
    ties: str = "input",
    compression: str = "zstd",
) -> Path:
    """Recompute the ranks of a finished run in place (no re-scoring); return annotated.parquet.

    The new settings are recorded under ``"ranking"`` in ``manifest.json`` so that a later
    export cuts from them.

    Example:
        >>> rerank_run("runs/dolly", ties="reference")        # doctest: +SKIP
        PosixPath('runs/dolly/annotated.parquet')
    """
    run = read_run(run_dir)
    ranking = Ranking(parse_rank_by(rank_by), rrf_k, ties, recompute=True)
    ranks = ranks_in_file_order(run, ranking)
    stale = _previous_rank_columns(run, ranks)
    rows = _ranked_rows(run, ranks.select(_rank_output_columns(ranks))).drop(stale)
    _sink_one(rows, run.annotated, compression)
    manifest = {**run.manifest, "ranking": {**ranking.describe(), "ranked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    manifest["ranking"].pop("recomputed")
    write_json_atomic(run.path / MANIFEST_FILE, manifest)
    return run.annotated


def _previous_rank_columns(run: Run, new_ranks: pl.DataFrame) -> list[str]:
    """Rank columns of a previous custom --rank-by that the new ranking does not produce."""
    previous = (run.manifest.get("ranking") or {}).get("rank_by")
    if previous is None:
        return []
    schema = pl.read_parquet_schema(run.annotated)
    old = [k.rank_column for k in parse_rank_by(previous)]
    return [c for c in old if c in schema and c not in new_ranks.columns]


def _sink_one(rows: pl.LazyFrame, final: Path, compression: str) -> None:
    temp = temp_path(final)
    try:
        _sink(rows, temp, "parquet", compression)
        publish(temp, final)
    finally:
        temp.unlink(missing_ok=True)
