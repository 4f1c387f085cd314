"""The ``srdata`` command line: it parses arguments and calls the library, nothing more.

Every option of ``score``, ``export``, ``rank`` and ``report`` is generated from a field of
the pydantic settings in :mod:`srdata.config` (name, type, choices, help, default), so a
setting is declared once and the CLI, the config file and the manifest agree on it.
User errors become ``click.UsageError`` (bad options, exit 2) or ``click.ClickException``
(a run or folder that cannot be used, exit 1): a message, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import click
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from srdata.run.path_param import PathParam
from srdata.config import SECTIONS, TEACH_SECTIONS, ExportConfig, RankConfig, ReportConfig, merge, nest, read_config_file, validation_problems

F = TypeVar("F", bound=Callable[..., Any])
SHORT_FLAGS = {"output": "-o"}
RUN_DIR = PathParam()  # a URI is refused, naming the argument (never a local folder named s3:)
REMOTE_RUN_DIR = PathParam(remote=True)  # export, teach: also s3://... (srdata.run.storage)

EXAMPLE = """
\b
Example:
  srdata score data/train.jsonl --model ./student --output runs/student-a \\
      --max-new-tokens 128 --shard-size 500
  srdata export runs/student-a            # 4 stages, keep the easiest 3
"""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """The click type of a field's annotation, and whether it is a list (comma-separated or repeated)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(choice) for choice in typing.get_args(annotation)]), False
    if typing.get_origin(annotation) is list:
        return str, True
    if annotation is Path:
        return PathParam(), False
    return annotation, False


def config_options(*models: type[BaseModel], skip: Sequence[str] = (), require: bool = False) -> Callable[[F], F]:
    """One click option per field of ``models``: the flag, type, choices and help come from the field.

    Every option defaults to ``None`` (= not given), so a flag overrides a config file only
    when it is on the command line; the field's default is shown in the help. A boolean
    that defaults to true gets a ``--no-NAME`` twin. With ``require``, fields without a
    default are required options (commands without a config file).

    Example:
        >>> @click.command()
        ... @config_options(ReportConfig)
        ... def report(**given): ...
        >>> "--max-share-ratio" in [o.opts[0] for o in report.params]
        True
    """

    def decorate(command: F) -> F:
        # A field is named by its setting name (its alias where it has one: ModelConfig.path is --model).
        fields = [(field.alias or name, field) for model in models for name, field in model.model_fields.items() if (field.alias or name) not in skip]
        for name, field in reversed(fields):
            click_type, is_list = _click_type(field.annotation)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            help_text = field.description or ""
            default = field.default
            if default not in (None, PydanticUndefined) and not isinstance(default, bool):
                help_text += f" [default: {default}]"
            names = [flag(name), *([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])]
            if click_type is bool and default is True:
                option = click.option(f"{flag(name)}/--no-{name.replace('_', '-')}", name, default=None, help=help_text + " [default: on]")
            elif click_type is bool:
                option = click.option(*names, name, is_flag=True, default=None, help=help_text)
            elif require and field.is_required():
                option = click.option(*names, name, type=click_type, required=True, metavar=extra.get("metavar"), help=help_text)
            elif is_list and extra.get("multiple"):
                option = click.option(*names, name, multiple=True, metavar=extra.get("metavar"), help=help_text)
            else:
                metavar = extra.get("metavar") or ("A,B,..." if is_list else None)
                option = click.option(*names, name, type=click_type, default=None, metavar=metavar, help=help_text)
            command = option(command)
        return command

    return decorate


def given_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The options that were on the command line (``None`` and empty repeated options were not)."""
    return {key: value for key, value in flags.items() if value is not None and value != ()}


def build(model: type[BaseModel], given: dict[str, Any]) -> Any:
    """Validate the given flags into ``model``; a bad value is a usage error that names its flag."""
    try:
        return model.model_validate({key: list(value) if isinstance(value, tuple) else value for key, value in given.items()})
    except ValidationError as err:
        raise click.UsageError("; ".join(validation_problems(err, name=lambda loc: flag(str(loc[0])), plain_bounds=True))) from None


def silence_library_progress() -> None:
    """``--quiet`` means quiet: no progress bars or info logs from datasets and transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


@contextlib.contextmanager
def run_errors() -> Iterator[None]:
    """A run, column or folder that cannot be used: shown as an error (exit code 1)."""
    from srdata.curriculum.export import CurriculumError
    from srdata.run.io import FolderBusyError, IntegrityError, WriteError
    from srdata.run.storage import StorageError
    from srdata.steps.rank import RankingError

    try:
        yield
    except (CurriculumError, RankingError, FileNotFoundError, FolderBusyError, IntegrityError, WriteError, StorageError) as err:
        raise click.ClickException(str(err)) from None


def echo_shares(shares: Sequence[dict[str, Any]], tables: bool = True) -> None:
    """Per-group share tables on stdout; the warnings and what to do about them on stderr."""
    from srdata.curriculum.groups import SHOWN_WARNINGS, advice, format_share_table, small_groups_text

    for result in shares:
        if tables:
            click.echo(f"share of each {result['column']} (! = warned):")
            for line in format_share_table(result):
                click.echo(f"  {line}")
        elif small_groups_text(result):
            click.echo(small_groups_text(result))
        for message in result["warnings"][:SHOWN_WARNINGS]:
            click.echo(f"warning: {message}", err=True)
        if len(result["warnings"]) > SHOWN_WARNINGS:
            click.echo(f"warning: ... and {len(result['warnings']) - SHOWN_WARNINGS} more for {result['column']} (all are listed in the JSON/report)", err=True)
        if result["warnings"]:
            click.echo(advice(result), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="srdata")
def main() -> None:
    """srdata: curate distillation data with Selective Reflection Distillation (SRD).

    The student answers every training prompt; each pair gets ROUGE-L and the student's
    cross-entropy; the two rankings are fused and the data is split easy-to-hard.
    """


@main.command(epilog=EXAMPLE)
@click.argument("dataset")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/TOML/JSON file with the same settings; flags override it.")
@config_options(*SECTIONS.values(), skip=("dataset",))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def score(dataset: str, config_file: str | None, quiet: bool, **flags: Any) -> None:
    """Annotate DATASET with the student's output, ROUGE-L, cross-entropy and SRD ranks.

    DATASET is a .jsonl/.json/.parquet/.csv file (or several, comma-separated), a
    save_to_disk folder, or a Hugging Face hub id. Re-running the same command resumes:
    finished shards are kept.
    """
    from srdata.pipeline import score as run_score

    given = {**given_flags(flags), "dataset": dataset}
    if quiet:
        silence_library_progress()
    settings: dict[str, Any] = {}
    try:
        settings = merge(read_config_file(config_file), nest(given)) if config_file else nest(given)
        for section, key in (("model", "model"), ("run", "output")):
            if key not in settings.get(section, {}):
                raise click.UsageError(f"{flag(key)} is required (on the command line or in --config)")
        result = run_score(settings, progress=not quiet, echo=None if quiet else click.echo)
    except KeyboardInterrupt as stop:  # the library says what it kept (srdata.interrupt); before that, nothing was scored
        said = str(stop) if str(stop).startswith("interrupted") else (
            "interrupted before scoring started: this call scored no row; run the same command again to resume")
        click.echo(f"\n{said}", err=True)
        sys.exit(130)
    except click.UsageError:
        raise
    except (ValueError, FileNotFoundError, OSError) as err:
        raise click.ClickException(str(err)) from err
    counts = result.manifest["counts"]
    if not quiet:
        click.echo(
            f"scored {counts['rows_scored']} rows"
            + (f", {counts['rows_skipped']} skipped" if counts["rows_skipped"] else "")
            + (f", {counts['rows_flagged']} flagged" if counts["rows_flagged"] else "")
            + f"; next: srdata export {result.output}"
        )


@main.command("teach", epilog="Example:\n\n\b\n  srdata teach runs/dolly --teacher ./teacher\n  srdata teach runs/dolly --teacher ./teacher --top-k 64 --device cpu")
@click.argument("run_dir", type=REMOTE_RUN_DIR)
@config_options(*TEACH_SECTIONS.values(), skip=("model", "shard_size"))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def teach_cmd(run_dir: Path, quiet: bool, **flags: Any) -> None:
    """Run the teacher once over a scored run: teacher_ce_loss, excess_ce_loss, and optional top-K log-probs.

    The teacher scores the run's exact prompt + reference ids (same template, truncation and
    end-of-sequence), so it must share the student's tokenizer. Adds teacher_ce_loss and
    excess_ce_loss (= ce_loss - teacher_ce_loss) to RUN_DIR/annotated.parquet; with --top-k K,
    stores the teacher's top-K log-probs at every reference position under RUN_DIR/teacher/
    for `srd-distill train --teacher-logits RUN_DIR`. Re-running the same command resumes.
    """
    from srdata.teacher_pass import teach

    given = given_flags(flags)
    if "teacher" not in given:
        raise click.UsageError("--teacher is required")
    if quiet:
        silence_library_progress()
    try:
        with run_errors():
            result = teach(nest(given, TEACH_SECTIONS), run=run_dir, progress=not quiet, echo=None if quiet else click.echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished shards are saved in {run_dir}/teacher; run the same command again to resume", err=True)
        sys.exit(130)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    if not quiet:
        rows = result.manifest["counts"]["rows_taught"]
        click.echo(f"taught {rows} rows; next: srdata export {run_dir} --rank-by teachable")


@main.command("export", epilog="Example:\n\n\b\n  srdata export runs/dolly\n  srdata export runs/dolly --stages 4 --keep 4 --layout disjoint --format jsonl --out runs/dolly/pocl")
@click.argument("run_dir", type=REMOTE_RUN_DIR)
@config_options(ExportConfig)
def export_cmd(run_dir: Path, **flags: Any) -> None:
    """Cut a scored run into SRD curriculum stages (easiest first).

    Writes OUT/stage-K.parquet (annotated columns + `stage`) and OUT/curriculum.json
    (sizes, rank and score thresholds, settings, group shares, source run hash). Ranking
    options re-rank in memory; the run itself is not changed. With --by, groups whose share
    of a stage or of the dropped part is far from their overall share are warned about
    on stderr and listed in curriculum.json.
    """
    from srdata.curriculum.export import export_curriculum
    from srdata.curriculum.groups import GroupShareWarning
    from srdata.run.storage import shown

    config: ExportConfig = build(ExportConfig, given_flags(flags))  # stages, ranking and share check: ExportConfig's validator
    with run_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupShareWarning)  # echoed below from curriculum.json, formatted for the terminal
        folder = export_curriculum(run_dir, config, echo=lambda line: click.echo(line, err=True))
    summary = json.loads((folder / "curriculum.json").read_text())
    for stage in summary["stages"]:
        thresholds = stage["thresholds"]
        if "max_difficulty_rank" in thresholds:
            cut = f"difficulty_rank <= {thresholds['max_difficulty_rank']}, rrf_score >= {thresholds['min_rrf_score']:.6g}"
        else:
            cut = f"stratified_rank <= {thresholds['max_stratified_rank']}: the easiest {stage['rows'] / summary['source']['valid_rows']:.0%} of every {config.stratify}"
        click.echo(f"{stage['file']}: {stage['rows']} rows ({cut})")
    click.echo(f"dropped: {summary['dropped']['rows']} hardest rows; invalid: {summary['source']['invalid_rows']} rows")
    ranking = summary["rank_columns"]["stage_files"]
    click.echo(f"ranking: {ranking['name'] or 'custom'} ({ranking['rank_by']}, rrf_k {ranking['rrf_k']}, ties {ranking['ties']})"
               + ("; re-ranked in memory: the stage files' difficulty_rank and rrf_score are this ranking's, not annotated.parquet's"
                  if summary["ranking"]["recomputed"] else ""))
    echo_shares(summary["groups"])
    click.echo(f"wrote {shown(folder)}/curriculum.json")  # a remote --out by its URI


@main.command("rank", epilog="Example:\n\n\b\n  srdata rank runs/dolly --ties reference\n  srdata rank runs/dolly --rank-by rouge_l:desc,ce_loss:asc:2,output_tokens:asc")
@click.argument("run_dir", type=RUN_DIR)
@config_options(RankConfig)
def rank_cmd(run_dir: Path, **flags: Any) -> None:
    """Recompute the ranks of a finished run without re-scoring.

    Rewrites RUN_DIR/annotated.parquet in place (atomically) and records the ranking
    settings in manifest.json, so a later `srdata export` cuts from them.
    """
    from srdata.curriculum.ranking import rerank_run

    config: RankConfig = build(RankConfig, given_flags(flags))  # the ranking: RankConfig's validator
    with run_errors():
        path = rerank_run(run_dir, config)
    click.echo(f"re-ranked {path} (rank_by {config.rank_by or 'rouge_l:desc,ce_loss:asc'}, rrf_k {config.rrf_k}, ties {config.ties})")


@main.command("report", epilog="Example:\n\n\b\n  srdata report runs/dolly --by category\n  srdata report runs/dolly --curriculum runs/dolly/pocl --out reports/dolly")
@click.argument("run_dir", type=RUN_DIR)
@config_options(ReportConfig)
def report_cmd(run_dir: Path, **flags: Any) -> None:
    """Write report.md, report.html and PNG figures for a scored run.

    Histograms of rouge_l and ce_loss, a rouge_l vs ce_loss scatter by stage with the
    dropped part marked, stage sizes, agreement of the two rankings (Spearman rho,
    hardest-quarter overlap), the easiest and hardest rows, and --by summaries with each
    group's share of every stage and of the dropped part (far-off shares are warned about
    on stderr).
    """
    from srdata.curriculum.groups import GroupShareWarning
    from srdata.curriculum.report import build_report

    config: ReportConfig = build(ReportConfig, given_flags(flags))  # the share check: ReportConfig's validator
    with run_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupShareWarning)  # echoed below, formatted for the terminal
        folder = build_report(run_dir, config)
    figures = sorted(p.name for p in folder.glob("*.png"))
    click.echo(f"wrote {folder / 'report.md'} and {folder / 'report.html'}" + (f", figures in {folder}: {', '.join(figures)}" if figures else ""))
    echo_shares(json.loads((folder / "groups.json").read_text())["groups"], tables=False)


@main.command("inspect", epilog="Example:\n\n\b\n  srdata inspect runs/dolly")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True, help="Easiest and hardest rows shown.")
def inspect_cmd(run_dir: Path, examples: int) -> None:
    """Print a summary of a run: progress, scores, ranking agreement, stages, examples."""
    from srdata.curriculum.report import inspect_run

    with run_errors():
        click.echo(inspect_run(run_dir, examples=examples))


@main.command()
@click.option("--output", "-o", default="runs/demo", show_default=True, help="Run folder for the demo.")
@click.option("--rows", "--pairs", "rows", default=600, show_default=True, help="Training pairs of the testbed to score (10% noisy).")
@click.option("--warmup-steps", default=300, show_default=True, help="Warm-up steps of the tiny student before it scores.")
@click.option("--seed", default=0, show_default=True, help="Seed of the testbed and of the student.")
def demo(output: str, rows: int, warmup_steps: int, seed: int) -> None:
    """SRD on a controlled testbed: known task difficulty and known noisy pairs (offline, ~1 min, no GPU).

    A tiny character-level student scores synthetic instruction pairs (copy, reverse, shift,
    sort at 4 difficulty levels, 10% with wrong responses); the summary shows the
    difficulty ranks tracking the known level and the noisy pairs landing in the dropped
    quarter. Example: srdata demo --output runs/demo
    """
    from srdata.demo.walkthrough import run_demo

    try:
        run_demo(output, train_pairs=rows, warmup_steps=warmup_steps, seed=seed, echo=click.echo)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
