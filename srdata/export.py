"""Turn a scored run into SRD's curriculum: stage files plus ``curriculum.json``.

A run folder (written by ``srdata score``) holds ``annotated.parquet`` and
``manifest.json``. Export splits the valid rows, easiest first, into ``stages`` equal
parts, keeps the easiest ``keep`` of them and writes one file per kept stage:

- ``cumulative`` (the paper): stage s holds the easiest ``floor(N/stages) * (s+1)`` rows;
- ``disjoint``: stage s holds only part s.

When every part is kept (``keep == stages``) the last stage also takes the remainder
rows, as the authors' ``tools/rank.py`` does. ``fractions`` replaces the equal cuts by
cumulative boundaries (``0.25,0.5,0.75``); the rows past the last boundary are dropped.

Rows keep their input (``srd_id``) order inside a stage file: trainers shuffle within a
stage anyway, and keeping the order lets export stream the text columns from disk
instead of holding them in memory; sort by ``difficulty_rank`` for easiest-first order.
Every file is written to a temporary name in the output folder and moved into place
with ``os.replace``, so a crash never leaves a half-written stage behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Sequence

import polars as pl

from srdata.io import write_json_atomic
from srdata.rank import (
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
        raise CurriculumError(f"{path} holds no srdata run ({MANIFEST_FILE} missing); create one with `srdata score ... --output {path}`")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CurriculumError(f"{manifest_path} is not valid JSON ({err})") from None


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
) -> Path:
    """Write ``stage-K.parquet`` (or ``.jsonl``) and ``curriculum.json``; return the folder.

    Defaults follow the paper: 4 stages, keep the easiest 3, cumulative. Ranking options
    (``rank_by``, ``rrf_k``, ``ties``) re-rank in memory without touching the run.

    Example:
        >>> out = export_curriculum("runs/dolly")               # doctest: +SKIP
        >>> sorted(p.name for p in out.iterdir())               # doctest: +SKIP
        ['curriculum.json', 'stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
    """
    if fmt not in FORMATS:
        raise CurriculumError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    plan = plan_stages(stages, keep, fractions, layout)
    run = read_run(run_dir)
    ranking = resolve_ranking(run, rank_by, rrf_k, ties)
    ranks = ranks_in_file_order(run, ranking)
    n_valid = ranks[DIFFICULTY_COLUMN].count()
    bounds = stage_bounds(n_valid, plan)
    out_dir = prepare_output(Path(out) if out is not None else run.path / "curriculum")
    rows = _ranked_rows(run, ranks if ranking.recompute else None)
    files = write_stages(rows, bounds, out_dir, fmt, compression)
    summary = curriculum_summary(run, plan, ranking, ranks, bounds, files, fmt, compression)
    write_json_atomic(out_dir / CURRICULUM_FILE, summary)
    _remove_stale_stage_files(out_dir, keep_names={f.name for f in files})
    return out_dir


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


def _ranked_rows(run: Run, new_ranks: pl.DataFrame | None) -> pl.LazyFrame:
    """The annotated rows, lazily, with fresh rank columns zipped on when re-ranked."""
    rows = pl.scan_parquet(run.annotated)
    if new_ranks is None:
        return rows
    original = rows.collect_schema().names()
    outputs = _rank_output_columns(new_ranks)
    # A row-wise zip, not a join: new_ranks is in file order, and a zip streams.
    zipped = pl.concat([rows.drop(outputs, strict=False), new_ranks.lazy().select(outputs)], how="horizontal")
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
    rows: pl.LazyFrame, bounds: Sequence[tuple[int, int]], out_dir: Path, fmt: str, compression: str = "zstd"
) -> list[Path]:
    """Write one file per stage, each streamed from the rows; return the final paths.

    Stages are written one after the other: scanning the input again per stage costs
    less CPU and far less memory than feeding several writers from one scan.
    """
    finals = [out_dir / f"stage-{s}.{fmt}" for s in range(len(bounds))]
    temps = [out_dir / f".tmp-{os.getpid()}-{final.name}" for final in finals]
    try:
        for s, ((start, stop), temp) in enumerate(zip(bounds, temps)):
            _sink(_stage_rows(rows, s, start, stop), temp, fmt, compression)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return finals


def _stage_rows(rows: pl.LazyFrame, stage: int, start: int, stop: int) -> pl.LazyFrame:
    in_stage = pl.col(DIFFICULTY_COLUMN).is_between(start + 1, stop)  # difficulty_rank is 1-based
    return rows.filter(in_stage).with_columns(pl.lit(stage, dtype=pl.Int64).alias(STAGE_COLUMN))


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
) -> dict[str, Any]:
    """The content of ``curriculum.json``: sizes, thresholds, settings and provenance."""
    from srdata import __version__

    score_columns = _score_columns(dict.fromkeys(ranks.columns), ranking.keys)
    valid = ranks.filter(pl.col(DIFFICULTY_COLUMN).is_not_null())
    last_stop = bounds[-1][1]
    return {
        "format_version": 1,
        "srdata_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "run_dir": str(run.path.resolve()),
            "config_hash": run.config_hash,
            "run_srdata_version": run.manifest.get("srdata_version"),
            "annotated_rows": ranks.height,
            "valid_rows": valid.height,
            "invalid_rows": ranks.height - valid.height,
        },
        "settings": {
            **plan.describe(),
            "format": fmt,
            "compression": compression if fmt == "parquet" else None,
            "compression_level": _compression_level(compression) if fmt == "parquet" else None,
        },
        "ranking": ranking.describe(),
        "stages": [
            {"stage": s, "file": f.name, **_range_summary(valid, start, stop, score_columns), "new_rows": stop - (bounds[s - 1][1] if s else 0)}
            for s, ((start, stop), f) in enumerate(zip(bounds, files))
        ],
        "dropped": _range_summary(valid, last_stop, valid.height, score_columns),
    }


def _range_summary(valid: pl.DataFrame, start: int, stop: int, score_columns: Sequence[str]) -> dict[str, Any]:
    """Size, rank and score thresholds of the rows at easy-to-hard positions [start, stop)."""
    part = valid.filter(pl.col(DIFFICULTY_COLUMN).is_between(start + 1, stop))
    if part.height == 0:
        return {"rows": 0}
    return {
        "rows": part.height,
        "difficulty_rank": {"min": part[DIFFICULTY_COLUMN].min(), "max": part[DIFFICULTY_COLUMN].max()},
        "rrf_score": {"min": part[FUSED_COLUMN].min(), "max": part[FUSED_COLUMN].max()},
        "thresholds": {"max_difficulty_rank": part[DIFFICULTY_COLUMN].max(), "min_rrf_score": part[FUSED_COLUMN].min()},
        "scores": {c: {"min": part[c].min(), "max": part[c].max(), "mean": part[c].mean()} for c in score_columns},
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
    rows = _ranked_rows(run, ranks).drop(stale)
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
    temp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    try:
        _sink(rows, temp, "parquet", compression)
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
