"""The CLI is generated from the settings tree: every field is a flag, with its type, choices and default."""

from __future__ import annotations

from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner
from pydantic_core import PydanticUndefined

import srdata.pipeline
from srdata.cli import config_options, main
from srdata.config import SECTIONS, ExportConfig, RankConfig, ReportConfig, build_config


def options_of(command: click.Command) -> dict[str, click.Option]:
    return {opt.name: opt for opt in command.params if isinstance(opt, click.Option)}


@pytest.mark.parametrize(
    "command, models, skip",
    [("score", tuple(SECTIONS.values()), {"dataset"}), ("export", (ExportConfig,), set()), ("rank", (RankConfig,), set()), ("report", (ReportConfig,), set())],
)
def test_every_setting_is_a_flag_with_its_help_and_default(command, models, skip):
    options = options_of(main.commands[command])
    for model in models:
        for name, field in model.model_fields.items():
            name = field.alias or name  # the setting's name: ModelConfig.path is --model
            if name in skip:
                continue
            option = options[name]
            assert option.opts[0] == "--" + name.replace("_", "-")
            assert field.description and option.help.startswith(field.description)
            default = field.default
            if default not in (None, PydanticUndefined) and not isinstance(default, bool):
                assert f"[default: {default}]" in option.help, (name, option.help)


def test_literal_settings_become_choices_and_bools_flags():
    options = options_of(main.commands["score"])
    assert list(options["backend"].type.choices) == ["auto", "hf", "vllm"]
    assert options["overwrite"].is_flag
    result = CliRunner().invoke(main, ["score", "d.jsonl", "--model", "m", "--output", "o", "--backend", "tpu"])
    assert result.exit_code == 2 and "tpu" in result.output


def test_flags_override_the_config_file_and_reach_the_settings(tmp_path, monkeypatch):
    seen = {}

    def fake_score(settings, progress, echo):
        seen["config"] = build_config(settings)
        return SimpleNamespace(manifest={"counts": {"rows_scored": 0, "rows_skipped": 0, "rows_flagged": 0}}, output="o")

    monkeypatch.setattr(srdata.pipeline, "score", fake_score)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: ./student\noutput: runs/a\nmax_new_tokens: 99\nbatch_size: 8\n")
    args = ["score", "d.jsonl", "--config", str(config_file), "--max-new-tokens", "7", "--cpus-per-replica", "2.5", "--overwrite", "--signals", "ifd"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.generation.max_new_tokens == 7 and config.batching.batch_size == 8  # flag wins; file kept
    assert config.engine.cpus_per_replica == 2.5 and config.run.overwrite is True and config.metrics.signals == ["ifd"]
    assert config.model.backend == "auto"  # not given anywhere: the field's default


def test_a_bad_value_names_its_flag():
    result = CliRunner().invoke(main, ["export", "runs/x", "--fractions", "0.2,half"])
    assert result.exit_code == 2 and "--fractions" in result.output and "comma-separated numbers" in result.output
    result = CliRunner().invoke(main, ["rank", "runs/x", "--rrf-k", "-1"])
    assert result.exit_code == 2 and "--rrf-k must be >= 0" in result.output


def test_config_options_serves_any_settings_model():
    @click.command()
    @config_options(ReportConfig)
    def report(**given):
        click.echo(sorted(k for k, v in given.items() if v not in (None, ())))

    result = CliRunner().invoke(report, ["--by", "task", "--by", "source", "--examples", "3"])
    assert result.exit_code == 0 and result.output.strip() == "['by', 'examples']"


def test_srd_distill_options_come_from_train_settings():
    from srd_distill.cli import main as distill_main
    from srd_distill.settings import TRAIN_SECTIONS

    options = options_of(distill_main.commands["train"])
    for section in TRAIN_SECTIONS.values():
        for name, field in section.model_fields.items():
            assert options[name].help.startswith(field.description), name
            assert not options[name].required, name  # a required setting may come from --config instead ...
    given = {"--student": "s", "--output": "o"}
    for missing in given:  # ... and is refused, naming its flag, when neither gives it
        args = [a for key, value in given.items() if key != missing for a in (key, value)]
        result = CliRunner().invoke(distill_main, ["train", "--teacher", "t", "--data", "d.jsonl", *args])
        assert result.exit_code == 2 and f"{missing} is required (on the command line or in --config)" in result.output
    assert options["fused_head"].secondary_opts == ["--no-fused-head"]
    result = CliRunner().invoke(distill_main, ["train", "--student", "s", "--output", "o", "--data", "d.jsonl"])
    assert result.exit_code == 2 and "--teacher" in result.output
