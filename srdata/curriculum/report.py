"""See what SRD kept and dropped, and why: ``srdata report`` and ``srdata inspect``.

The report reads only the score and rank columns of a run (plus the few example rows it
shows), so it stays cheap on millions of rows. It writes ``report.md``, ``report.html``
and three PNG figures (drawn by :mod:`srdata.curriculum.plots`):

- ``score_histograms.png``: distributions of ROUGE-L, cross-entropy and every other score
  the ranking fuses (``ifd`` and ``pmi`` for ``--rank-by noisy``);
- ``scores_by_stage.png``: the ranking's first two scores against each other (ROUGE-L
  against cross-entropy for the paper's), coloured by curriculum stage, the dropped
  (hardest) part marked in grey;
- ``stage_sizes.png``: rows per stage, dropped and invalid rows.

Stages come from the run's ``curriculum/curriculum.json`` when it exists (or the one
given), ranked as that export ranked them and checked against its stage files
(:mod:`srdata.curriculum.report_data`: the report describes the export that exists),
otherwise from the paper's default cut (4 stages, keep 3). With ``by`` columns the
report also gives each group's share of every stage and of the dropped part, warns
(:class:`~srdata.curriculum.groups.GroupShareWarning`) where a share is far from the group's share
of all ranked rows, and writes the same tables to ``groups.json`` (empty without ``by``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl

from srdata.curriculum.cut import CurriculumError
from srdata.config import ReportConfig, command_settings
from srdata.curriculum.export import Run, read_run, read_run_manifest
from srdata.curriculum.source import check_unchanged
from srdata.run.folder import ANNOTATED_FILE, Manifest
from srdata.curriculum.groups import (
    advice,
    emit_warnings,
    group_shares,
    share_table_rows,
    small_groups_text,
)
from srdata.curriculum.plots import plot_histograms, plot_scatter, plot_stage_sizes
from srdata.curriculum.regime import report_section, warn_if_teachable
from srdata.curriculum.render import to_html, to_markdown
from srdata.curriculum.report_data import CONTRACT_RANKS, CONTRACT_SCORES, ReportRows, Stages, example_rows, report_rows
from srdata.curriculum.stage_files import ScratchFiles, as_write_error, prepare_output
from srdata.run.io import FolderLock, publish, remove_stale_temps
from srdata.steps.rank import DIFFICULTY_COLUMN, FUSED_COLUMN, ID_COLUMN, INVALID_COLUMN

SCORE_COLUMNS, RANK_COLUMNS = CONTRACT_SCORES, CONTRACT_RANKS
EXAMPLE_CHARS = 160
GROUPS_FILE = "groups.json"
FIGURE_FILES = ("score_histograms.png", "scores_by_stage.png", "stage_sizes.png")
SHARE_TABLE_GROUPS = 50  # largest groups in the report's share table; flagged groups are always shown


def ranking_agreement(scores: pl.DataFrame) -> dict[str, Any]:
    """Spearman rho between the ROUGE-L and cross-entropy rankings, and hardest-quarter overlap.

    rho is computed on the scores with average ranks for ties (ROUGE-L against minus the
    loss, so +1 means both signals order the rows the same way). The overlap is the share
    of the hardest quarter by ROUGE-L that is also in the hardest quarter by loss; 25% is
    what independent signals would give.

    Example:
        >>> df = pl.DataFrame({"rouge_l": [0.9, 0.5, 0.1, 0.3], "ce_loss": [1.0, 2.0, 4.0, 3.0],
        ...                    "rank_rouge_l": [1, 2, 4, 3], "rank_ce_loss": [1, 2, 4, 3]})
        >>> ranking_agreement(df)["spearman_rho"], ranking_agreement(df)["hardest_quarter_overlap"]
        (1.0, 1.0)
    """
    valid = scores.drop_nulls(list(SCORE_COLUMNS) + list(RANK_COLUMNS))
    n = valid.height
    quarter = n // 4
    rho = valid.select(pl.corr(pl.col("rouge_l"), -pl.col("ce_loss"), method="spearman")).item() if n > 1 else None
    if quarter == 0:
        return {"spearman_rho": rho, "hardest_quarter_rows": 0, "hardest_quarter_overlap": None, "overlap_rows": 0}
    hardest = (pl.col("rank_rouge_l") > n - quarter) & (pl.col("rank_ce_loss") > n - quarter)
    both = valid.filter(hardest).height
    return {"spearman_rho": rho, "hardest_quarter_rows": quarter, "hardest_quarter_overlap": both / quarter, "overlap_rows": both}


def build_report(run_dir: str | os.PathLike[str], config: ReportConfig | dict[str, Any] | None = None, **settings: Any) -> Path:
    """Write ``report.md``, ``report.html``, the PNG figures and ``groups.json``; return the report folder.

    Settings are a :class:`~srdata.config.ReportConfig` (what ``srdata report`` builds from
    its flags), a dict, keyword arguments named like its fields, or a mix (keywords win).
    For every ``by`` column the report holds each group's share of all ranked rows, of
    every stage and of the dropped part, and a :class:`~srdata.curriculum.groups.GroupShareWarning`
    is raised for each share more than ``max_share_ratio`` times, or less than
    ``1 / max_share_ratio`` of, the group's own (groups of ``min_group_rows`` rows or more).

    Example:
        >>> build_report("runs/dolly", by=["category"])       # doctest: +SKIP
        PosixPath('runs/dolly/report')
        >>> build_report("runs/dolly", ReportConfig(curriculum="runs/dolly/pocl", examples=10))   # doctest: +SKIP
        PosixPath('runs/dolly/report')
    """
    config = command_settings(ReportConfig, config, settings, CurriculumError)
    by, out, examples = config.by, config.out, config.examples
    check = config.share_check()
    run = read_run(run_dir)
    rows = report_rows(run, by, config.curriculum)  # ranked and cut as the export was, checked against its stage files
    scores, staged, stages = rows.scores, rows.staged, rows.stages
    valid = staged
    x, y = _scatter_axes(rows)
    shares = [group_shares(staged[stages.position], staged[column], stages.parts(staged.height), column, check) for column in by]
    out_dir = _writable_folder(Path(out) if out is not None else run.path / "report")
    with FolderLock(out_dir, "srdata report"):
        remove_stale_temps(out_dir)  # of a report killed mid-write
        figures = [out_dir / name for name in FIGURE_FILES]
        blocks = _report_blocks(run, rows, by, examples, figures, shares)
        regime = report_section(run.annotated, staged, stages.position, max(stages.ends))  # None without `srdata teach`
        blocks += regime.blocks if regime else []
        draw = {
            FIGURE_FILES[0]: lambda path: plot_histograms(valid, rows.score_columns, path),
            FIGURE_FILES[1]: lambda path: plot_scatter(staged, len(stages.ends), path, x=x, y=y),
            FIGURE_FILES[2]: lambda path: plot_stage_sizes(
                _stage_sizes(staged, stages), _count_part(staged, len(stages.ends)), scores.height - valid.height, stages.layout, path
            ),
            "report.md": lambda path: path.write_text(to_markdown(blocks), encoding="utf-8"),
            "report.html": lambda path: path.write_text(to_html(blocks, title=f"SRD report: {run.path.name}"), encoding="utf-8"),
            GROUPS_FILE: lambda path: path.write_text(
                json.dumps({"stages": stages.source, "ranking": rows.ranking.describe(), **check.describe(), "groups": shares},
                           indent=2, default=str) + "\n", encoding="utf-8"
            ),
            **(regime.draw if regime else {}),
        }
        _write_all(out_dir, draw, run)
    emit_warnings([message for result in shares for message in result["warnings"]])
    warn_if_teachable(regime.statement if regime else None, "srdata report")
    return out_dir


def _write_all(out_dir: Path, draw: dict[str, Callable[[Path], Any]], run: Run) -> None:
    """Write every report file to a temp file, then move them all into place: a full disk leaves the earlier report whole."""
    scratch = ScratchFiles(out_dir)
    try:
        temps = {name: scratch.new(name) for name in draw}
        for name, write in draw.items():
            try:
                write(temps[name])
            except Exception as err:
                failure = as_write_error(err, out_dir / name)
                if failure is None or failure is err:
                    raise
                raise failure from err
        check_unchanged(run, "report", out_dir)
        for name, temp in temps.items():
            publish(temp, out_dir / name)
    finally:
        scratch.remove_all()


def _scatter_axes(rows: ReportRows) -> tuple[tuple[str, bool], tuple[str, bool]]:
    """The scatter's two scores and whether higher is easier: the ranking's first two (ROUGE-L, cross-entropy for the paper's)."""
    keys = [(k.column, k.descending) for k in rows.keys if k.weight]
    axes = [*keys, *((c, c == "rouge_l") for c in CONTRACT_SCORES if c not in dict(keys))]
    return axes[0], axes[1]


def _writable_folder(path: Path) -> Path:
    return prepare_output(path, what="report folder")


def _count_part(staged: pl.DataFrame, part: int) -> int:
    return staged.filter(pl.col("part") == part).height


def _stage_sizes(staged: pl.DataFrame, stages: Stages) -> list[int]:
    """Rows in each stage file: cumulative stages include every easier part."""
    own = [_count_part(staged, part) for part in range(len(stages.ends))]
    return np.cumsum(own).tolist() if stages.layout == "cumulative" else own


# --- report content ----------------------------------------------------------------------


def _report_blocks(
    run: Run,
    rows: ReportRows,
    by: Sequence[str],
    examples: int,
    figures: Sequence[Path],
    shares: Sequence[dict[str, Any]] = (),
) -> list[tuple]:
    """The report, section by section: run, scores, agreement, curriculum, examples, invalid rows, groups."""
    scores, staged, stages, columns = rows.scores, rows.staged, rows.stages, rows.score_columns
    x, y = _scatter_axes(rows)
    blocks: list[tuple] = [
        ("h1", f"SRD report: {run.path}"),
        ("p", _run_line(run, scores, staged)),
        ("p", rows.ranking_text()),
        ("h2", "Scores"),
        ("table", ["score", "mean", "median", "min", "max"], _score_rows(staged, columns)),
        ("img", figures[0].name, f"Histograms of {', '.join(columns)}"),
        ("h2", "Agreement between the two rankings"),
        ("p", _agreement_text(ranking_agreement(staged))),
        ("h2", "Curriculum"),
        ("p", f"Stages from {stages.source}; {stages.layout} layout."),
        ("table", ["stage", "rows", "new rows", "difficulty ranks" if stages.stratify is None else "stratified ranks",
                   *(f"mean {c}" for c in columns)], _stage_rows(staged, stages, columns)),
        ("img", figures[1].name, f"{x[0]} against {y[0]}, coloured by stage"),
        ("img", figures[2].name, "Rows per stage"),
    ]
    blocks += _example_blocks(run, staged, examples, columns)
    blocks += _invalid_blocks(scores)
    for column, result in zip(by, shares):
        blocks += [("h2", f"By {column}"), ("table", *_group_table(scores, staged, stages, column))]
        blocks += _share_blocks(result)
    return blocks


def _share_blocks(result: dict[str, Any]) -> list[tuple]:
    """The share of each group in every stage and in the dropped part, and the warnings."""
    column = result["column"]
    headers, rows = share_table_rows(result, limit=SHARE_TABLE_GROUPS)
    shown = f"the {SHARE_TABLE_GROUPS} largest groups and every flagged one; " if len(rows) < result["groups"] else ""
    blocks: list[tuple] = [
        ("p", (f"Share of each {column} among all ranked rows, in every stage file and in the dropped part ({shown}"
               f"! = more than {result['max_share_ratio']:g}x or less than 1/{result['max_share_ratio']:g} of the group's "
               f"share of all ranked rows; groups under {result['min_group_rows']} ranked rows are not flagged).")),
        ("table", headers, rows),
    ]
    if result["warnings"]:
        blocks += [("p", f"Warning: {message}.") for message in result["warnings"]]
        blocks.append(("p", advice(result)))
    else:
        blocks.append(("p", f"No {column} is far from its share in any stage or in the dropped part."))
    small = small_groups_text(result)
    if small:
        blocks.append(("p", small))
    return blocks


def _run_line(run: Run, scores: pl.DataFrame, staged: pl.DataFrame) -> str:
    return (
        f"{scores.height} rows, {staged.height} ranked, {scores.height - staged.height} invalid. "
        f"Student: {_model_name(run.manifest)}. Run config hash: {run.config_hash}."
    )


def _model_name(manifest: Manifest) -> str:
    model = manifest.identity.get("model") or manifest.config.model
    if isinstance(model, dict):
        model = model.get("name")
    return str(getattr(model, "model", model) or "unknown model")


def _score_rows(valid: pl.DataFrame, columns: Sequence[str] = SCORE_COLUMNS) -> list[list[str]]:
    return [
        [column, *(_fmt(getattr(valid[column], stat)()) for stat in ("mean", "median", "min", "max"))]
        for column in columns
    ]


def _agreement_text(agreement: dict[str, Any]) -> str:
    rho = _fmt(agreement["spearman_rho"])
    if agreement["hardest_quarter_overlap"] is None:
        return f"Spearman rho between the ROUGE-L and cross-entropy rankings: {rho}. Too few rows for quarters."
    return (
        f"Spearman rho between the ROUGE-L and cross-entropy rankings: {rho} (1 = same order). "
        f"Hardest quarters: {agreement['overlap_rows']} of {agreement['hardest_quarter_rows']} rows "
        f"({agreement['hardest_quarter_overlap']:.0%}) are in both; independent signals would share about 25%."
    )


def _stage_rows(staged: pl.DataFrame, stages: Stages, columns: Sequence[str] = SCORE_COLUMNS) -> list[list[str]]:
    rows = []
    sizes = _stage_sizes(staged, stages)
    for part in range(len(stages.ends) + 1):
        own = staged.filter(pl.col("part") == part)
        in_file = own if stages.layout == "disjoint" or part == len(stages.ends) else staged.filter(pl.col("part") <= part)
        label = f"stage {part}" if part < len(stages.ends) else "dropped"
        size = sizes[part] if part < len(sizes) else own.height
        ranks = f"{in_file[stages.position].min()}-{in_file[stages.position].max()}" if in_file.height else "-"
        rows.append([label, str(size), str(own.height), ranks, *(_fmt(in_file[c].mean()) for c in columns)])
    return rows


def _text_columns(run: Run) -> list[str]:
    """Prompt, reference and student output columns. The source prompt column (from the
    column mapping srdata score recorded) reads better than prompt_text, whose template
    boilerplate would fill the clipped cell."""
    schema = pl.read_parquet_schema(run.annotated)
    mapping = run.manifest.columns
    prompt = mapping.get("prompt_column") if mapping.get("prompt_column") in schema else "prompt_text"
    wanted = [prompt, mapping.get("response_column"), "student_output"]
    return [c for c in wanted if c and c in schema]


def _easiest_and_hardest(n_valid: int, examples: int) -> tuple[list[int], list[int]]:
    count = min(examples, n_valid)
    return list(range(1, count + 1)), list(range(n_valid, n_valid - count, -1))


def _example_blocks(run: Run, staged: pl.DataFrame, examples: int, columns: Sequence[str] = SCORE_COLUMNS) -> list[tuple]:
    if examples <= 0 or staged.height == 0:
        return []
    easiest, hardest = _easiest_and_hardest(staged.height, examples)
    text_columns = _text_columns(run)
    headers = ["difficulty", "srd_id", *columns, *text_columns]
    blocks: list[tuple] = []
    for title, ranks in ((f"{len(easiest)} easiest rows", easiest), (f"{len(hardest)} hardest rows", hardest)):
        rows = example_rows(run, staged, ranks)
        table = [
            [str(r[DIFFICULTY_COLUMN]), str(r[ID_COLUMN]), *(_fmt(r[c]) for c in columns), *(_clip(r[c]) for c in text_columns)]
            for r in rows.iter_rows(named=True)
        ]
        blocks += [("h2", title), ("table", headers, table)]
    return blocks


def _invalid_blocks(scores: pl.DataFrame) -> list[tuple]:
    if INVALID_COLUMN not in scores.columns or scores[INVALID_COLUMN].null_count() == scores.height:
        return []
    reasons = scores.filter(pl.col(INVALID_COLUMN).is_not_null()).group_by(INVALID_COLUMN).len().sort("len", descending=True)
    return [("h2", "Invalid rows (not ranked)"), ("table", ["reason", "rows"], [[r, str(n)] for r, n in reasons.iter_rows()])]


def _group_table(scores: pl.DataFrame, staged: pl.DataFrame, stages: Stages, column: str) -> tuple[list[str], list[list[str]]]:
    dropped = len(stages.ends)
    totals = scores.group_by(column).agg(pl.len().alias("rows"))
    ranked = staged.group_by(column).agg(
        pl.len().alias("ranked"),
        pl.col("rouge_l").mean().alias("rouge_l"),
        pl.col("ce_loss").mean().alias("ce_loss"),
        (pl.col("part") < dropped).mean().alias("kept"),
        ((pl.col(DIFFICULTY_COLUMN).mean() - 1) / max(staged.height - 1, 1)).alias("percentile"),
    )
    table = totals.join(ranked, on=column, how="left").sort("rows", descending=True)
    headers = [column, "rows", "ranked", "mean rouge_l", "mean ce_loss", "kept", "mean difficulty (0 = easiest, 1 = hardest)"]
    rows = [
        [str(r[column]), str(r["rows"]), str(r["ranked"] or 0), _fmt(r["rouge_l"]), _fmt(r["ce_loss"]), _pct(r["kept"]), _fmt(r["percentile"])]
        for r in table.head(50).iter_rows(named=True)
    ]
    return headers, rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _clip(text: Any) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= EXAMPLE_CHARS else flat[: EXAMPLE_CHARS - 1] + "…"


# --- terminal summary --------------------------------------------------------------------


def inspect_run(run_dir: str | os.PathLike[str], examples: int = 5) -> str:
    """A plain-text summary of a run: progress if unfinished, else scores, agreement and stages.

    Example:
        >>> print(inspect_run("runs/dolly"))                 # doctest: +SKIP
        run runs/dolly: complete, 15011 rows (15011 ranked, 0 invalid), config hash 5f1c...
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise CurriculumError(f"run folder {path} does not exist")
    manifest = read_run_manifest(path)
    if manifest.status != "complete" or not (path / ANNOTATED_FILE).is_file():
        return _progress_text(path, manifest)
    run = read_run(path)
    rows = report_rows(run)  # ranked and cut as the export was, checked against its stage files
    scores, staged, stages, columns = rows.scores, rows.staged, rows.stages, rows.score_columns
    position = "difficulty" if stages.stratify is None else "stratified"
    lines = [
        f"run {path}: complete, {scores.height} rows ({staged.height} ranked, {scores.height - staged.height} invalid), "
        f"config hash {run.config_hash}",
        rows.ranking_text(),
        *(f"  {row[0]:<8} mean {row[1]}  median {row[2]}  min {row[3]}  max {row[4]}" for row in _score_rows(staged, columns)),
        "agreement: " + _agreement_text(ranking_agreement(staged)),
        f"stages ({stages.source}, {stages.layout}):",
        *(f"  {r[0]:<8} {r[1]:>8} rows  {position} {r[3]:<14} " + "  ".join(f"mean {c} {v}" for c, v in zip(columns, r[4:]))
          for r in _stage_rows(staged, stages, columns)),
    ]
    lines += _inspect_examples(run, staged, examples, columns)
    return "\n".join(lines)


def _progress_text(path: Path, manifest: Manifest) -> str:
    shards = manifest.shards
    done = [s for s in shards if s.done and (path / s.file).is_file()]
    rows_done = sum(s.stop - s.start for s in done)
    rows_total = sum(s.stop - s.start for s in shards)
    return (
        f"run {path}: {manifest.status}, {len(done)} of {len(shards)} shards done "
        f"({rows_done} of {rows_total} rows); rerun the same `srdata score` command to finish it"
    )


def _inspect_examples(run: Run, staged: pl.DataFrame, examples: int, columns: Sequence[str] = SCORE_COLUMNS) -> list[str]:
    if examples <= 0 or staged.height == 0:
        return []
    easiest, hardest = _easiest_and_hardest(staged.height, examples)
    lines: list[str] = []
    for title, ranks in (("easiest", easiest), ("hardest", hardest)):
        lines.append(f"{title}:")
        prompt_column = _text_columns(run)[0]
        for r in example_rows(run, staged, ranks).iter_rows(named=True):
            prompt = _clip(r.get(prompt_column))[:80]
            values = "  ".join(f"{c} {_fmt(r[c])}" for c in columns)
            lines.append(f"  #{r[DIFFICULTY_COLUMN]:<6} srd_id {r[ID_COLUMN]:<8} {values}  {prompt}")
    return lines
