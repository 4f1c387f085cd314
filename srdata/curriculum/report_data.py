"""What ``srdata report`` and ``srdata inspect`` describe: the export that exists, under the ranking it was cut from.

An export may rank the rows itself (``srdata export --rank-by noisy`` re-ranks in memory):
its stage files' ``difficulty_rank`` and ``rrf_score`` then come from that ranking, while
``annotated.parquet`` keeps the run's own (the paper's, unless ``srdata rank`` changed it).
So the report reads the ranking ``curriculum.json`` records, ranks the run's rows by it
again (the same code and settings as the export: the same ranks), and checks the result
against the stage files themselves: every stage file must hold exactly the rows, with
exactly the ``difficulty_rank`` values, that the report puts in it. A stage file that does
not (the run was re-scored or re-ranked since, or the files are another export's) is
refused, naming the file and the fix; the report never shows a cut that was not made.

Without an export the report shows the paper's default cut (4 stages, keep 3) of the run's
own ranking.

Example:
    >>> rows = report_rows(read_run("runs/dolly"))          # doctest: +SKIP
    >>> rows.ranking.describe()["rank_by"], rows.staged.height   # doctest: +SKIP
    ('ifd:asc:2,ce_loss:asc,pmi:desc', 15011)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from srdata.curriculum.cut import CurriculumError, plan_stages, stage_bounds
from srdata.curriculum.export import Ranking, ranks_in_file_order, resolve_ranking
from srdata.curriculum.groups import STRATIFIED_COLUMN, GroupError, check_group_columns, curriculum_parts, stratified_ranks
from srdata.curriculum.reader import VerifiedCurriculum, verified_curriculum
from srdata.curriculum.ranking_record import ranking_name
from srdata.curriculum.source import Run
from srdata.curriculum.summary import score_columns
from srdata.run.folder import CURRICULUM_FILE
from srdata.steps.rank import DIFFICULTY_COLUMN, ID_COLUMN, INVALID_COLUMN, RankKey, parse_rank_by

#: Scores and ranks the report always shows (the agreement section compares these two).
CONTRACT_SCORES = ("rouge_l", "ce_loss")
CONTRACT_RANKS = ("rank_rouge_l", "rank_ce_loss")


@dataclass(frozen=True)
class Stages:
    """Where the curriculum cuts the ranked rows: last position of every kept stage.

    Positions are difficulty ranks, or the stratified ranks within ``stratify`` groups
    of a stratified export.
    """

    ends: list[int]
    layout: str
    source: str  # "curriculum.json at ..." or "paper default"
    stratify: str | None = None

    @property
    def position(self) -> str:
        """The column the stages were cut from."""
        return DIFFICULTY_COLUMN if self.stratify is None else STRATIFIED_COLUMN

    def part_of(self, difficulty: pl.Expr) -> pl.Expr:
        """Stage (part) in which a row is first trained; ``len(ends)`` means dropped."""
        expr = pl.lit(len(self.ends), dtype=pl.Int64)
        for stage, end in reversed(list(enumerate(self.ends))):
            expr = pl.when(difficulty <= end).then(pl.lit(stage, dtype=pl.Int64)).otherwise(expr)
        return expr

    def parts(self, n_ranked: int) -> list:
        """Every stage file and the dropped part as :class:`srdata.curriculum.groups.Part` ranges of positions."""
        starts = [0] * len(self.ends) if self.layout == "cumulative" else [0, *self.ends[:-1]]
        return curriculum_parts(list(zip(starts, self.ends)), n_ranked)

    def in_file(self, stage: int) -> pl.Expr:
        """Rows of stage file ``stage``: parts 0..stage when cumulative, part ``stage`` alone when disjoint."""
        return pl.col("part") <= stage if self.layout == "cumulative" else pl.col("part") == stage


@dataclass(frozen=True)
class ReportRows:
    """Every row's scores and ranks under the export's ranking, and the ranked rows with their part."""

    scores: pl.DataFrame  # every row, in annotated.parquet's order
    staged: pl.DataFrame  # the ranked rows, with "part" (len(stages.ends) = dropped)
    stages: Stages
    ranking: Ranking
    score_columns: list[str]  # rouge_l, ce_loss, then every column the ranking fuses

    @property
    def keys(self) -> tuple[RankKey, ...]:
        return self.ranking.keys

    def ranking_text(self) -> str:
        """One sentence: which ranking the ranks and stages shown come from.

        Example:
            >>> rows.ranking_text()     # doctest: +SKIP
            'Ranking: noisy (ifd:asc:2,ce_loss:asc,pmi:desc, rrf_k 60, ties input), computed by the export ...'
        """
        described = self.ranking.describe()
        name = ranking_name(described["rank_by"])
        label = f"{name} ({described['rank_by']}" if name else f"custom ({described['rank_by']}"
        where = ("computed by the export, not the run's: annotated.parquet's difficulty_rank and rrf_score are another ranking's"
                 if self.ranking.recompute else "the run's own, as in annotated.parquet")
        return f"Ranking: {label}, rrf_k {described['rrf_k']}, ties {described['ties']}); {where}."


def report_rows(run: Run, by: Sequence[str] = (), curriculum: str | os.PathLike[str] | None = None) -> ReportRows:
    """The rows a report describes: ranked as the export was, cut as its stage files are (checked against them).

    ``curriculum`` is an export folder or its ``curriculum.json``; default ``RUN/curriculum``
    when it exists, else the paper's default cut of the run's own ranking.
    """
    exported = _exported(run, curriculum)
    ranking = _export_ranking(run, exported.summary) if exported is not None else resolve_ranking(run)
    scores = read_scores(run, ranking, by)
    n_valid = scores[DIFFICULTY_COLUMN].count()
    stages = _stages_of(exported, n_valid)
    scores = with_positions(run, scores, stages)
    staged = scores.filter(pl.col(DIFFICULTY_COLUMN).is_not_null()).with_columns(stages.part_of(pl.col(stages.position)).alias("part"))
    if exported is not None:
        check_stage_files(exported, stages, staged)
    columns = score_columns(dict.fromkeys(scores.columns), ranking.keys)
    return ReportRows(scores, staged, stages, ranking, columns)


def _exported(run: Run, curriculum: str | os.PathLike[str] | None) -> VerifiedCurriculum | None:
    path = Path(curriculum) if curriculum is not None else run.path / "curriculum"
    summary_path = path if path.name == CURRICULUM_FILE else path / CURRICULUM_FILE
    if summary_path.is_file():
        return verified_curriculum(summary_path)  # stage files checked: the report describes what a trainer reads
    if curriculum is not None:
        raise CurriculumError(f"no {CURRICULUM_FILE} at {path}")
    return None


def _export_ranking(run: Run, summary: dict[str, Any]) -> Ranking:
    """The ranking an export was cut from, as ``curriculum.json`` records it.

    Recomputed when the export recomputed it, and also when the run's own ranking is no
    longer the one the export read (``srdata rank`` since): the run's rank columns would be
    another ranking's.
    """
    recorded = summary["ranking"]
    keys = parse_rank_by(recorded["rank_by"])
    rrf_k, ties = recorded["rrf_k"], recorded["ties"]
    current = resolve_ranking(run)
    same_as_run = (current.keys, current.rrf_k, current.ties) == (keys, rrf_k, ties) and not current.recompute
    return Ranking(keys, rrf_k, ties, recompute=bool(recorded.get("recomputed")) or not same_as_run)


def _stages_of(exported: VerifiedCurriculum | None, n_valid: int) -> Stages:
    if exported is None:
        bounds = stage_bounds(n_valid, plan_stages())
        return Stages([stop for _, stop in bounds], "cumulative", "paper default (4 stages, keep 3; not exported yet)")
    summary = exported.summary
    stratify = summary["settings"].get("stratify")
    threshold = "max_difficulty_rank" if stratify is None else f"max_{STRATIFIED_COLUMN}"
    ends = [stage["thresholds"][threshold] for stage in exported.stages if stage["rows"]]
    cut = f", stratified by {stratify}" if stratify is not None else ""
    return Stages(ends, summary["settings"]["layout"], f"{exported.folder / CURRICULUM_FILE}{cut}", stratify)


def read_scores(run: Run, ranking: Ranking, by: Sequence[str] = ()) -> pl.DataFrame:
    """Scores and ranks of every row under ``ranking`` (recomputed in memory if it says so), plus the grouping columns.

    The row order is ``annotated.parquet``'s. Texts are not read.
    """
    schema = pl.read_parquet_schema(run.annotated)
    try:
        check_group_columns(schema, by, "--by")
    except GroupError as err:
        raise CurriculumError(str(err)) from None
    absent = [c for c in CONTRACT_SCORES if c not in schema]
    if absent:
        raise CurriculumError(f"{run.annotated} lacks {', '.join(absent)}: it is not a finished `srdata score` run")
    ranks = ranks_in_file_order(run, ranking)
    wanted = [c for c in (*CONTRACT_SCORES, *CONTRACT_RANKS, INVALID_COLUMN, *by) if c in schema and c not in ranks.columns]
    if not wanted:
        return ranks
    return pl.concat([ranks, pl.read_parquet(run.annotated, columns=list(dict.fromkeys(wanted)))], how="horizontal")


def with_positions(run: Run, scores: pl.DataFrame, stages: Stages) -> pl.DataFrame:
    """``scores`` with the ``stratified_rank`` a stratified export cut from (recomputed from the run), else as is."""
    if stages.stratify is None:
        return scores
    column = stages.stratify
    groups = scores[column] if column in scores.columns else pl.read_parquet(run.annotated, columns=[column])[column]
    return scores.with_columns(stratified_ranks(scores[DIFFICULTY_COLUMN], groups).alias(STRATIFIED_COLUMN))


def check_stage_files(exported: VerifiedCurriculum, stages: Stages, staged: pl.DataFrame) -> None:
    """Refuse unless every stage file holds exactly the rows (``srd_id``) and ``difficulty_rank`` values the report gives it.

    Example:
        >>> check_stage_files(verified_curriculum("runs/dolly/curriculum"), stages, staged)   # doctest: +SKIP
    """
    files = [file for file, stage in zip(exported.files, exported.stages) if stage["rows"]]
    builder = exported.summary["settings"]["format"]
    for stage, file in enumerate(files):
        found = _stage_ranks(file, builder).sort(ID_COLUMN)
        expected = staged.filter(stages.in_file(stage)).select(ID_COLUMN, DIFFICULTY_COLUMN).sort(ID_COLUMN)
        if not found.equals(expected):
            raise CurriculumError(
                f"{file} does not hold the rows the run ranks into it now ({found.height} rows in the file, {expected.height} "
                f"expected under the ranking {exported.folder / CURRICULUM_FILE} records): the run was re-scored or re-ranked "
                f"after that export. Export again (`srdata export {Path(str(exported.summary['source']['run_dir']))}` with "
                "the same options) so that the report describes the curriculum a trainer reads"
            )


def _stage_ranks(file: Path, fmt: str) -> pl.DataFrame:
    """``srd_id`` and ``difficulty_rank`` of a stage file (parquet: only those two columns are read)."""
    columns = [ID_COLUMN, DIFFICULTY_COLUMN]
    rows = pl.scan_parquet(file) if fmt == "parquet" else pl.scan_ndjson(file, infer_schema_length=None)
    try:
        return rows.select(columns).collect().cast({ID_COLUMN: pl.Int64, DIFFICULTY_COLUMN: pl.Int64})
    except pl.exceptions.PolarsError as err:
        raise CurriculumError(f"{file} cannot be read as a stage file ({type(err).__name__}: {err}); export again") from None


def example_rows(run: Run, staged: pl.DataFrame, positions: Sequence[int]) -> pl.DataFrame:
    """The full rows at the given difficulty ranks (of the report's ranking), in that order, with the report's ranks.

    Rows are found by ``srd_id`` (annotated.parquet's own difficulty_rank may be another ranking's), streamed.
    """
    wanted = staged.filter(pl.col(DIFFICULTY_COLUMN).is_in(list(positions))).select(ID_COLUMN, DIFFICULTY_COLUMN)
    order = pl.DataFrame({DIFFICULTY_COLUMN: list(positions)}, schema={DIFFICULTY_COLUMN: pl.Int64}).join(
        wanted, on=DIFFICULTY_COLUMN, how="inner", maintain_order="left")
    found = pl.scan_parquet(run.annotated).filter(pl.col(ID_COLUMN).is_in(order[ID_COLUMN].to_list())).collect()
    found = found.drop([c for c in staged.columns if c in found.columns and c != ID_COLUMN])
    return order.join(found, on=ID_COLUMN, how="inner", maintain_order="left").join(
        staged.drop(DIFFICULTY_COLUMN), on=ID_COLUMN, how="left", maintain_order="left")
