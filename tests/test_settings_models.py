"""Every command takes its settings model; one declaration of what may change on resume (issue 26, items 4-5).

export/rank/report run from ExportConfig/RankConfig/ReportConfig (a model, a dict or keywords);
the checks the CLI made before calling the library are the models' validators, with the same
messages; ``srd-distill train --config FILE`` reads the same settings as its flags (flat or in
sections); the resumable settings of both packages come from marks on the fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field, ValidationError

from srdata.cli import export_cmd, rank_cmd, report_cmd
from srdata.config import PERFORMANCE_ONLY, RESUMABLE, ExportConfig, RankConfig, ReportConfig, resumable_settings
from srdata.curriculum.cut import CurriculumError
from srdata.curriculum.export import export_curriculum
from srdata.curriculum.ranking import rerank_run
from srdata.curriculum.report import build_report
from srdata.steps.rank import RankingError, RankKey
from tests._runs import make_run

ROOT = Path(__file__).resolve().parents[1]


def srdata_cli(*args: object) -> click.testing.Result:
    group = click.Group("srdata")
    for command in (export_cmd, rank_cmd, report_cmd):
        group.add_command(command)
    return CliRunner().invoke(group, [str(a) for a in args])


# --- one declaration of the settings that may change on resume ---------------------------


def test_resumable_settings_are_read_from_the_fields():
    class Inner(BaseModel):
        fast: int = Field(default=1, json_schema_extra=RESUMABLE)
        exact: int = 2

    class Outer(BaseModel):
        inner: Inner = Inner()
        where: str = Field(default="x", json_schema_extra=RESUMABLE)

    assert resumable_settings(Outer) == {("inner", "fast"), ("where",)}
    # srdata's list as it was written out by hand before it was declared on the fields
    assert PERFORMANCE_ONLY == {
        ("batching", "batch_size"), ("batching", "token_budget"), ("model", "gpu_memory_utilization"),
        ("model", "max_num_batched_tokens"), ("run", "overwrite"), ("run", "output"), ("engine", "engine"),
        ("engine", "ray_address"), ("engine", "num_replicas"), ("engine", "gpus_per_replica"),
        ("engine", "cpus_per_replica"), ("engine", "wait_for_resources"),
    }


def test_srd_distill_resumable_settings_come_from_the_same_marks():
    from srd_distill.run_folder import RESUMABLE_WITH_OTHER_VALUES
    from srd_distill.settings import TrainSettings

    assert RESUMABLE_WITH_OTHER_VALUES == {path[-1] for path in resumable_settings(TrainSettings)} == {
        "device", "grad_accum", "log_every", "stop_after_stage", "overwrite", "output", "fused_head",
        "gradient_checkpointing", "micro_batch_tokens", "checkpoint_interval", "teacher_top_k",
    }


# --- export, rank and report take their models -------------------------------------------


def stage_rows(folder: Path) -> list[list[int]]:
    summary = json.loads((folder / "curriculum.json").read_text())
    return [sorted(pl.read_parquet(folder / stage["file"])["srd_id"].to_list()) for stage in summary["stages"]]


def test_export_takes_its_model_a_dict_or_keywords(tmp_path: Path):
    run = make_run(tmp_path / "run", 40)
    by_keywords = export_curriculum(run, stages=3, keep=2, layout="disjoint", fmt="parquet", out=tmp_path / "kw")
    by_model = export_curriculum(run, ExportConfig(stages=3, keep=2, layout="disjoint", out=str(tmp_path / "model")))
    by_dict = export_curriculum(run, {"stages": 3, "keep": 2, "layout": "disjoint", "out": tmp_path / "dict"})
    assert by_model == tmp_path / "model" and by_dict == tmp_path / "dict"
    assert stage_rows(by_keywords) == stage_rows(by_model) == stage_rows(by_dict) and len(stage_rows(by_model)) == 2
    # a keyword overrides the model's value
    overridden = export_curriculum(run, ExportConfig(stages=3, keep=2, out=str(tmp_path / "a")), keep=3, out=tmp_path / "b")
    assert overridden == tmp_path / "b" and len(stage_rows(overridden)) == 3 and not (tmp_path / "a").exists()
    # rank keys as well as their text
    keys = (RankKey("ce_loss", descending=False),)
    assert stage_rows(export_curriculum(run, rank_by=keys, out=tmp_path / "keys")) == stage_rows(
        export_curriculum(run, rank_by="ce_loss:asc", out=tmp_path / "text"))


def test_rank_and_report_take_their_models(tmp_path: Path):
    run = make_run(tmp_path / "run", 40)
    rerank_run(run, RankConfig(ties="reference", rrf_k=10))
    ranking = json.loads((run / "manifest.json").read_text())["ranking"]
    assert (ranking["ties"], ranking["rrf_k"]) == ("reference", 10)
    rerank_run(run, RankConfig(ties="reference"), rrf_k=7)  # keyword wins
    assert json.loads((run / "manifest.json").read_text())["ranking"]["rrf_k"] == 7
    folder = build_report(run, ReportConfig(out=tmp_path / "report", examples=1, by=["template"]))
    assert folder == tmp_path / "report" and (folder / "report.md").is_file()
    assert json.loads((folder / "groups.json").read_text())["groups"][0]["column"] == "template"


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"stages": 4, "keep": 5}, CurriculumError, "--keep 5 is larger than --stages 4: at most 4 stages can be kept"),
        ({"fractions": "0.5,0.25"}, CurriculumError, "--fractions must be strictly increasing, got 0.5, 0.25"),
        ({"rank_by": "rouge_l:up"}, RankingError, "bad direction 'up' for column 'rouge_l' in --rank-by: use 'asc' or 'desc'"),
        ({"max_share_ratio": 0.5}, CurriculumError, "--max-share-ratio must be a number above 1"),
    ],
)
def test_the_models_check_what_the_cli_checked_with_the_same_message(tmp_path: Path, settings: dict, error: type, message: str):
    run = make_run(tmp_path / "run", 12)
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):  # the model itself
        ExportConfig(**settings)
    with pytest.raises(error, match=message):  # the library, before the run is read
        export_curriculum(tmp_path / "no-run-here", **settings)
    flags = [a for key, value in settings.items() for a in (f"--{key.replace('_', '-')}", value)]
    result = srdata_cli("export", run, *flags)  # the CLI: a usage error, as before
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (run / "curriculum").exists()


def test_rank_and_report_refuse_bad_settings_before_reading_the_run(tmp_path: Path):
    with pytest.raises(RankingError, match="more than once"):
        rerank_run(tmp_path / "nowhere", rank_by="rouge_l:desc,rouge_l:asc")
    with pytest.raises(RankingError, match="unknown ties mode 'random'"):
        rerank_run(tmp_path / "nowhere", ties="random")
    with pytest.raises(CurriculumError, match="--min-group-rows must be a positive integer, got 0"):
        build_report(tmp_path / "nowhere", ReportConfig.model_construct(), min_group_rows=0)
    with pytest.raises(CurriculumError, match="invalid settings: nope: Extra inputs"):
        build_report(tmp_path / "nowhere", nope=1)
    run = make_run(tmp_path / "run", 12)
    result = srdata_cli("report", run, "--min-group-rows", "0")
    assert result.exit_code == 2 and "--min-group-rows must be a positive integer, got 0" in result.output


# --- srd-distill train --config ----------------------------------------------------------


def distill(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srd_distill.cli", "train", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)


def test_srd_distill_reads_a_config_file_and_flags_override_it(tmp_path: Path):
    (tmp_path / "kd.yaml").write_text(  # sections and flat keys mixed, as srdata score's files
        "models:\n  teacher: t\n  student: s\nrun:\n  output: out\ndata: missing.jsonl\nepochs: '1,2'\n")
    result = distill(tmp_path, "--config", "kd.yaml")
    assert result.returncode == 1 and "the baseline has one stage: epochs must be one number, got '1,2'" in result.stderr
    result = distill(tmp_path, "--config", "kd.yaml", "--epochs", "1")  # the flag wins: the run gets as far as the data
    assert result.returncode == 1 and "data file missing.jsonl does not exist" in result.stderr, result.stderr
    (tmp_path / "kd.toml").write_text('lr = 0.1\nstudent = "s"\n[optimisation]\nlr = 0.2\n')
    result = distill(tmp_path, "--config", "kd.toml")
    assert result.returncode == 1 and "config file kd.toml: setting optimisation.lr is given twice" in result.stderr
    (tmp_path / "no-student.json").write_text('{"models": {"teacher": "t"}, "output": "o", "data": "d.jsonl"}')
    result = distill(tmp_path, "--config", "no-student.json")
    assert result.returncode == 2 and "--student is required (on the command line or in --config)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd.toml", "kd.yaml", "no-student.json"]  # nothing written


def test_train_settings_have_sections_and_keep_their_flat_names():
    from srd_distill.settings import TRAIN_SECTIONS, build_settings

    nested = build_settings({"models": {"teacher": "t", "student": "s"}, "run": {"output": "o"}, "inputs": {"data": "d.jsonl"},
                             "optimisation": {"lr": 3e-4}})
    flat = build_settings(teacher="t", student="s", output="o", data="d.jsonl", lr=3e-4)
    assert nested == flat and flat.optimisation.lr == flat.lr == 3e-4
    # run.json records the flat names, as before the sections: old runs compare key by key
    assert set(flat.flat()) == {name for section in TRAIN_SECTIONS.values() for name in section.model_fields}
    assert flat.replace(output="elsewhere").run.output == "elsewhere" and flat.run.output == "o"
