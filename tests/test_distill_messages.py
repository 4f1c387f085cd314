"""What srd-distill tells the person watching: the step count --max-steps leaves, the true KL beside the
cross-entropy form of fkl / sfkl (0 when the student is its own teacher), and what a stage does before its first step.

Real tiny GPT-2 models and a real exported curriculum (the fixtures of tests/test_train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from srd_distill.cli import main
from srd_distill.train import train

from .conftest import corpus
from .test_train import FAST, curriculum, read_metrics, scored_run  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random tiny GPT-2 teacher and a smaller random student without dropout, sharing the teacher's tokenizer (no training: cheap)."""
    from srdata.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("message-models")
    teacher = build_tiny_model(root / "teacher", corpus(), arch="gpt2", hidden_size=32, num_layers=1, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=256, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return {"teacher": teacher, "student": root / "student"}


@pytest.mark.parametrize("loss, fused_head, temperature", [("fkl", True, 1.0), ("fkl", False, 2.0), ("sfkl", True, 1.5)])
def test_teacher_equal_to_student_logs_a_true_kl_of_zero(models, scored_run, tmp_path, loss, fused_head, temperature):
    student = str(models["student"])  # no dropout: the student in training mode computes what the teacher does
    out = tmp_path / "same"
    lines: list[str] = []
    train({**FAST, "teacher": student, "student": student, "data": str(scored_run / "annotated.parquet"), "output": str(out),
           "loss": loss, "kd_ratio": 1.0, "temperature": temperature, "max_steps": 1, "fused_head": fused_head},
          progress=False, echo=lines.append)
    (record,) = read_metrics(out)
    # The cross-entropy form is the teacher's entropy, far from 0; the true KL reads 0 (the weights were not yet updated).
    assert record["kd_unscaled"] > 1.0
    assert abs(record["kd_kl"]) < 1e-4, record
    assert record["kd_loss"] == pytest.approx(record["kd_unscaled"] * temperature**2)


def test_a_divergence_that_is_already_zero_at_agreement_logs_no_separate_kl(models, scored_run, tmp_path):
    out = tmp_path / "rkl"
    train({**FAST, "teacher": str(models["teacher"]), "student": str(models["student"]), "data": str(scored_run / "annotated.parquet"),
           "output": str(out), "loss": "rkl", "max_steps": 1}, progress=False)
    assert read_metrics(out)[0]["kd_kl"] is None


def test_true_kl_of_different_models_is_positive_and_below_the_cross_entropy_form(models, scored_run, tmp_path):
    out = tmp_path / "fkl"
    train({**FAST, "teacher": str(models["teacher"]), "student": str(models["student"]), "data": str(scored_run / "annotated.parquet"),
           "output": str(out), "loss": "fkl", "max_steps": 2}, progress=False)
    for record in read_metrics(out):
        assert 0.0 < record["kd_kl"] < record["kd_unscaled"]


def test_max_steps_banner_and_what_a_stage_does_before_its_first_step(models, curriculum, tmp_path):
    common = ["--teacher", str(models["teacher"]), "--student", str(models["student"]), "--device", "cpu", "--batch-size", "2"]
    result = CliRunner().invoke(main, ["train", *common, "--curriculum", str(curriculum), "--output", str(tmp_path / "run"),
                                       "--epochs", "1", "--max-steps", "2", "--loss", "fkl"])
    assert result.exit_code == 0, result.output
    # Stage 0 has 5 rows: 1 epoch at batch 2 is 3 steps, of which --max-steps runs 2; stage 2 (15 rows) would take 8.
    assert "=== stage 0 (1 of 3): 5 rows from stage-0.parquet" in result.output
    assert "2 steps (--max-steps 2 stops 1 epoch(s) of 3 steps early)" in result.output
    assert "2 steps (--max-steps 2 stops 1 epoch(s) of 8 steps early)" in result.output
    assert "1 epoch(s) = 2 steps" not in result.output
    assert f"loading the teacher from {models['teacher']} ..." in result.output
    assert f"stage 1 (2 of 3): encoding the rows of stage-1.parquet and loading the student from {tmp_path / 'run' / 'stage-0'} ..." in result.output
    assert "running step 1 (the first is the slowest)" in result.output  # the bar before its first step
    assert "(KL " in result.output  # the true KL beside fkl's cross-entropy form, on the bar
    assert all(record["kd_kl"] is not None for record in read_metrics(tmp_path / "run") if record["event"] == "train")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
