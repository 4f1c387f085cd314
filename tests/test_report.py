"""Reports and the terminal summary: files, figures, agreement numbers, bad input, CLI."""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from srdata.cli import export_cmd, inspect_cmd, rank_cmd, report_cmd
from srdata.curriculum.export import CurriculumError, export_curriculum
from srdata.curriculum.report import build_report, inspect_run, ranking_agreement
from srdata.run.io import LOCK_FILE
from tests._runs import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "run", 60, invalid_ids=[2, 9])


def cli() -> click.Group:
    group = click.Group("srdata")
    for command in (export_cmd, rank_cmd, report_cmd, inspect_cmd):
        group.add_command(command)
    return group


def test_report_writes_markdown_html_and_figures(run: Path, tmp_path: Path):
    out = build_report(run, out=tmp_path / "report", by=["template"])
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == [
        "groups.json", "report.html", "report.md", "score_histograms.png", "scores_by_stage.png", "stage_sizes.png",
    ]
    sizes = {"score_histograms.png": (1000, 400), "scores_by_stage.png": (700, 600), "stage_sizes.png": (700, 400)}
    for name, size in sizes.items():
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == size
    text = (out / "report.md").read_text()
    for heading in ("## Scores", "## Agreement between the two rankings", "## Curriculum", "## 5 easiest rows", "## 5 hardest rows", "## Invalid rows (not ranked)", "## By template"):
        assert heading in text
    assert "Spearman rho" in text and "paper default" in text and "Student: tiny-student." in text
    assert "| empty prompt | 2 |" in text
    assert "![Rows per stage](stage_sizes.png)" in text
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and '<img src="scores_by_stage.png"' in html


def test_report_lists_the_easiest_and_hardest_rows(run: Path, tmp_path: Path):
    text = (build_report(run, out=tmp_path / "r", examples=2) / "report.md").read_text()
    annotated = pl.read_parquet(run / "annotated.parquet")
    easiest = annotated.filter(pl.col("difficulty_rank") == 1)["srd_id"].item()
    hardest = annotated.filter(pl.col("difficulty_rank") == 58)["srd_id"].item()
    assert f"| 1 | {easiest} |" in text and f"| 58 | {hardest} |" in text
    assert "## 2 easiest rows" in text and "| output |" in text  # the reference column from the config


def test_report_uses_the_exported_curriculum(run: Path, tmp_path: Path):
    export_curriculum(run, stages=4, keep=4, out=tmp_path / "pocl")
    text = (build_report(run, out=tmp_path / "r", curriculum=tmp_path / "pocl") / "report.md").read_text()
    assert "| stage 3 | 58 | 16 | 1-58 |" in text
    assert "| dropped | 0 | 0 | - |" in text


def test_default_report_folder_is_inside_the_run(run: Path):
    assert build_report(run) == run / "report"


def test_ranking_agreement_numbers():
    agree = pl.DataFrame({"rouge_l": [0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0],
                          "ce_loss": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]})
    agree = agree.with_columns(rank_rouge_l=pl.int_range(1, 9), rank_ce_loss=pl.int_range(1, 9))
    assert ranking_agreement(agree) == {"spearman_rho": 1.0, "hardest_quarter_rows": 2, "hardest_quarter_overlap": 1.0, "overlap_rows": 2}
    opposed = agree.with_columns(ce_loss=9.0 - pl.col("ce_loss"), rank_ce_loss=9 - pl.col("rank_ce_loss"))
    result = ranking_agreement(opposed)
    assert result["spearman_rho"] == pytest.approx(-1.0) and result["hardest_quarter_overlap"] == 0.0


def test_report_bad_input(run: Path, tmp_path: Path):
    with pytest.raises(CurriculumError, match="--by column 'nope' does not exist"):
        build_report(run, by=["nope"])
    with pytest.raises(CurriculumError, match="no curriculum.json"):
        build_report(run, curriculum=tmp_path / "nowhere")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CurriculumError, match="not writable"):
        build_report(run, out=blocker / "report")
    unfinished = make_run(tmp_path / "unfinished", 20, status="running", shards_done=[True, False])
    with pytest.raises(CurriculumError, match="shard-00001.parquet"):
        build_report(unfinished)


def test_inspect_summarises_a_run(run: Path):
    text = inspect_run(run, examples=3)
    assert text.startswith(f"run {run}: complete, 60 rows (58 ranked, 2 invalid), config hash cafe1234")
    assert "Spearman rho" in text and "dropped" in text
    assert text.count("srd_id") == 6


def test_inspect_shows_progress_of_an_unfinished_run(tmp_path: Path):
    unfinished = make_run(tmp_path / "run", 40, status="running", shards_done=[True, True, False, False])
    assert inspect_run(unfinished) == (
        f"run {unfinished}: running, 2 of 4 shards done (20 of 40 rows); rerun the same `srdata score` command to finish it"
    )


def test_cli_report_and_inspect(run: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli(), ["report", str(run), "--by", "template", "--by", "finish_reason", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "## By finish_reason" in (tmp_path / "r" / "report.md").read_text()
    result = runner.invoke(cli(), ["inspect", str(run)])
    assert result.exit_code == 0 and "easiest:" in result.output
    result = runner.invoke(cli(), ["report", str(run), "--by", "nope"])
    assert result.exit_code == 1 and "'nope' does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli(), ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output
