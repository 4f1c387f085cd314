"""Click commands ``export``, ``rank``, ``report`` and ``inspect``.

They only parse arguments and call the library; the ``srdata`` group adds them with
``main.add_command(...)``. User errors become ``click.UsageError`` (bad options) or
``click.ClickException`` (a run or folder that cannot be used): a message, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import click

from srdata.curriculum.export import FORMATS, LAYOUTS, CurriculumError, export_curriculum, plan_stages, rerank_run, share_check
from srdata.curriculum.groups import DEFAULT_MAX_SHARE_RATIO, DEFAULT_MIN_GROUP_ROWS, SHOWN_WARNINGS, GroupShareWarning, advice, format_share_table
from srdata.steps.rank import DEFAULT_RRF_K, TIE_MODES, RankingError, parse_rank_by
from srdata.curriculum.report import build_report, inspect_run

COMPRESSIONS = ("zstd", "lz4", "snappy", "gzip", "uncompressed")
RUN_DIR = click.Path(path_type=Path, file_okay=False)


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Option values the library refuses: shown as usage errors (exit code 2)."""
    try:
        yield
    except (CurriculumError, RankingError) as err:
        raise click.UsageError(str(err)) from None


@contextlib.contextmanager
def _run_errors() -> Iterator[None]:
    """A run, column or folder that cannot be used: shown as an error (exit code 1)."""
    try:
        yield
    except (CurriculumError, RankingError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None


def _parse_fractions(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.UsageError(f"--fractions {text!r}: expected comma-separated numbers such as 0.25,0.5,0.75") from None


def _check_rrf_k(rrf_k: int | None) -> None:
    if rrf_k is not None and rrf_k < 0:
        raise RankingError(f"--rrf-k must be >= 0, got {rrf_k}")


def _share_options(function):
    """``--max-share-ratio`` and ``--min-group-rows``: when a group's share of a part warns."""
    function = click.option(
        "--min-group-rows", type=int, default=DEFAULT_MIN_GROUP_ROWS, show_default=True,
        help="Groups with fewer ranked rows are listed but never warned about (chance moves small counts a lot).",
    )(function)
    return click.option(
        "--max-share-ratio", type=float, default=DEFAULT_MAX_SHARE_RATIO, show_default=True,
        help="Warn when a group's share of a stage or of the dropped part is more than this many times, or less than 1/this of, its share of all ranked rows.",
    )(function)


def _echo_shares(shares: Sequence[dict[str, Any]], tables: bool = True) -> None:
    """Per-group share tables on stdout; the warnings and what to do about them on stderr."""
    for result in shares:
        if tables:
            click.echo(f"share of each {result['column']} (! = warned):")
            for line in format_share_table(result):
                click.echo(f"  {line}")
        for message in result["warnings"][:SHOWN_WARNINGS]:
            click.echo(f"warning: {message}", err=True)
        if len(result["warnings"]) > SHOWN_WARNINGS:
            click.echo(f"warning: ... and {len(result['warnings']) - SHOWN_WARNINGS} more for {result['column']} (all are listed in the JSON/report)", err=True)
        if result["warnings"]:
            click.echo(advice(result), err=True)


def _rank_by_option(function):
    return click.option(
        "--rank-by",
        default=None,
        metavar="COL:asc|desc[:W],...",
        help="Columns fused by reciprocal rank fusion, each with a direction and optional weight, or a preset: paper (rouge_l:desc,ce_loss:asc) or noisy (ifd:asc:2,ce_loss:asc,pmi:desc; needs `srdata score --signals ifd`). [default: paper]",
    )(function)


@click.command("export", epilog="Example:\n\n\b\n  srdata export runs/dolly\n  srdata export runs/dolly --stages 4 --keep 4 --layout disjoint --format jsonl --out runs/dolly/pocl")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--stages", type=int, default=None, help="Number of equal parts, easy to hard. [default: 4]")
@click.option("--keep", type=int, default=None, help="Easiest parts kept as stages. [default: stages - 1]")
@click.option("--layout", type=click.Choice(LAYOUTS), default="cumulative", show_default=True, help="cumulative: stage s holds parts 0..s; disjoint: part s only.")
@click.option("--fractions", default=None, metavar="F1,F2,...", help="Uneven cuts: cumulative boundaries in (0, 1], e.g. 0.2,0.5,0.8 (instead of --stages).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder. [default: RUN_DIR/curriculum]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet", show_default=True)
@_rank_by_option
@click.option("--rrf-k", type=int, default=None, help="RRF constant k (re-ranks in memory). [default: the run's, 60]")
@click.option("--ties", type=click.Choice(TIE_MODES), default=None, help="input: ties by srd_id; reference: the authors' tools/rank.py order. [default: the run's]")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="zstd", show_default=True, help="Parquet compression (zstd at level 1).")
@click.option("--by", multiple=True, metavar="COLUMN", help="Check each value of this column (template, task, source, ...) against its share of every stage and of the dropped part; warn when far from it (repeatable).")
@click.option("--stratify", default=None, metavar="COLUMN", help="Cut the stages within each value of COLUMN, so every group keeps its share of every stage and of the dropped part (not the paper's cut).")
@_share_options
def export_cmd(run_dir, stages, keep, layout, fractions, out, fmt, rank_by, rrf_k, ties, compression, by, stratify, max_share_ratio, min_group_rows) -> None:
    """Cut a scored run into SRD curriculum stages (easiest first).

    Writes OUT/stage-K.parquet (annotated columns + `stage`) and OUT/curriculum.json
    (sizes, rank and score thresholds, settings, group shares, source run hash). Ranking
    options re-rank in memory; the run itself is not changed. With --by, groups whose share
    of a stage or of the dropped part is far from their overall share are warned about
    on stderr and listed in curriculum.json.
    """
    fraction_values = _parse_fractions(fractions)
    with _usage_errors():
        plan_stages(stages, keep, fraction_values, layout)
        parse_rank_by(rank_by)
        _check_rrf_k(rrf_k)
        share_check(max_share_ratio, min_group_rows)
    with _run_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupShareWarning)  # echoed below from curriculum.json, formatted for the terminal
        folder = export_curriculum(
            run_dir, stages=stages, keep=keep, layout=layout, fractions=fraction_values, out=out,
            fmt=fmt, rank_by=rank_by, rrf_k=rrf_k, ties=ties, compression=compression,
            by=list(by), stratify=stratify, max_share_ratio=max_share_ratio, min_group_rows=min_group_rows,
        )
    summary = json.loads((folder / "curriculum.json").read_text())
    for stage in summary["stages"]:
        thresholds = stage["thresholds"]
        if "max_difficulty_rank" in thresholds:
            cut = f"difficulty_rank <= {thresholds['max_difficulty_rank']}, rrf_score >= {thresholds['min_rrf_score']:.6g}"
        else:
            cut = f"stratified_rank <= {thresholds['max_stratified_rank']}: the easiest {stage['rows'] / summary['source']['valid_rows']:.0%} of every {stratify}"
        click.echo(f"{stage['file']}: {stage['rows']} rows ({cut})")
    click.echo(f"dropped: {summary['dropped']['rows']} hardest rows; invalid: {summary['source']['invalid_rows']} rows")
    _echo_shares(summary["groups"])
    click.echo(f"wrote {folder / 'curriculum.json'}")


@click.command("rank", epilog="Example:\n\n\b\n  srdata rank runs/dolly --ties reference\n  srdata rank runs/dolly --rank-by rouge_l:desc,ce_loss:asc:2,output_tokens:asc")
@click.argument("run_dir", type=RUN_DIR)
@_rank_by_option
@click.option("--rrf-k", type=int, default=DEFAULT_RRF_K, show_default=True, help="RRF constant k.")
@click.option("--ties", type=click.Choice(TIE_MODES), default="input", show_default=True, help="input: ties by srd_id; reference: the authors' tools/rank.py order.")
def rank_cmd(run_dir, rank_by, rrf_k, ties) -> None:
    """Recompute the ranks of a finished run without re-scoring.

    Rewrites RUN_DIR/annotated.parquet in place (atomically) and records the ranking
    settings in manifest.json, so a later `srdata export` cuts from them.
    """
    with _usage_errors():
        parse_rank_by(rank_by)
        _check_rrf_k(rrf_k)
    with _run_errors():
        path = rerank_run(run_dir, rank_by=rank_by, rrf_k=rrf_k, ties=ties)
    click.echo(f"re-ranked {path} (rank_by {rank_by or 'rouge_l:desc,ce_loss:asc'}, rrf_k {rrf_k}, ties {ties})")


@click.command("report", epilog="Example:\n\n\b\n  srdata report runs/dolly --by category\n  srdata report runs/dolly --curriculum runs/dolly/pocl --out reports/dolly")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report folder. [default: RUN_DIR/report]")
@click.option("--by", multiple=True, metavar="COLUMN", help="Summarise per value of this column (repeatable).")
@click.option("--curriculum", type=click.Path(path_type=Path), default=None, help="Export whose stages to show. [default: RUN_DIR/curriculum if present, else the paper's cut]")
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True, help="Easiest and hardest rows shown.")
@_share_options
def report_cmd(run_dir, out, by, curriculum, examples, max_share_ratio, min_group_rows) -> None:
    """Write report.md, report.html and PNG figures for a scored run.

    Histograms of rouge_l and ce_loss, a rouge_l vs ce_loss scatter by stage with the
    dropped part marked, stage sizes, agreement of the two rankings (Spearman rho,
    hardest-quarter overlap), the easiest and hardest rows, and --by summaries with each
    group's share of every stage and of the dropped part (far-off shares are warned about
    on stderr).
    """
    with _usage_errors():
        share_check(max_share_ratio, min_group_rows)
    with _run_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupShareWarning)  # echoed below, formatted for the terminal
        folder = build_report(run_dir, out=out, by=by, curriculum=curriculum, examples=examples,
                              max_share_ratio=max_share_ratio, min_group_rows=min_group_rows)
    figures = sorted(p.name for p in folder.glob("*.png"))
    click.echo(f"wrote {folder / 'report.md'} and {folder / 'report.html'}" + (f", figures in {folder}: {', '.join(figures)}" if figures else ""))
    _echo_shares(json.loads((folder / "groups.json").read_text())["groups"], tables=False)


@click.command("inspect", epilog="Example:\n\n\b\n  srdata inspect runs/dolly")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True, help="Easiest and hardest rows shown.")
def inspect_cmd(run_dir, examples) -> None:
    """Print a summary of a run: progress, scores, ranking agreement, stages, examples."""
    with _run_errors():
        click.echo(inspect_run(run_dir, examples=examples))


COMMANDS = (export_cmd, rank_cmd, report_cmd, inspect_cmd)
