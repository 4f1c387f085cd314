"""End to end: the quick reproduction (benchmarks/repro/run.py --quick) and `srdata demo` on the testbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "repro" / "run.py"


def test_srdata_demo_shows_difficulty_and_noise(tmp_path):
    from srdata.cli import main

    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo"), "--rows", "200", "--warmup-steps", "100"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "training pairs (20 noisy)" in out
    assert "Known difficulty level vs SRD difficulty rank" in out
    assert "Spearman(rank, level)" in out
    assert "Noisy pairs in the dropped part" in out
    for name in ("fused (SRD)", "ROUGE-L alone", "cross-entropy alone"):
        assert name in out
    assert "Rank agreement of ROUGE-L and cross-entropy" in out
    curriculum = tmp_path / "demo" / "run" / "curriculum"
    assert sorted(p.name for p in curriculum.glob("stage-*.parquet")) == ["stage-0.parquet", "stage-1.parquet", "stage-2.parquet"]
    # Each task's share of the stages, as recorded by the export, and what it means for how much to drop.
    shares = json.loads((curriculum / "curriculum.json").read_text())["groups"][0]
    assert shares["column"] == "task" and "Share of each task in every stage file and in the dropped part" in out
    for entry in shares["table"]:
        assert f"'{entry['value']}'" in out
    assert out.count("warning: ") == len(shares["warnings"])
    assert "How much to drop: the dropped 50 pairs hold" in out and "--stratify task" in out
    stratified = json.loads((tmp_path / "demo" / "run" / "curriculum-stratified" / "curriculum.json").read_text())
    assert stratified["settings"]["stratify"] == "task" and stratified["warnings"] == []


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    if not RUN.is_file():
        pytest.skip(f"{RUN} is absent")
    out = tmp_path / "repro"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out)], capture_output=True, text=True, env=env,
                               cwd=REPO, timeout=1800)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "quick"
    assert (out / "quality_vs_time.png").stat().st_size > 0
    assert "| fkl | SRD |" in (out / "table.md").read_text()
    settings = results["settings"]
    assert settings["sample_pass_ratio"] == pytest.approx(0.6)
    arms = results["summary"]["arms"]["fkl"]
    n_train = settings["testbed"]["train_pairs"]
    # SRD trains on 25% / 50% / 75% of the data for E epochs each, the baseline on 100% for 2.5 E epochs.
    assert arms["baseline"]["sample_passes"]["mean"] == n_train * settings["baseline_epochs"]
    assert arms["srd"]["sample_passes"]["mean"] == settings["srd_epochs_per_stage"] * 6 * (n_train // 4)
    for arm in ("srd", "baseline", "srd_stratified"):
        assert 0.0 <= arms[arm]["exact_match"]["mean"] <= 1.0
        assert set(arms[arm]["exact_match_by_difficulty"]) == {"1", "2", "3", "4"}
        assert arms[arm]["train_seconds"]["mean"] > 0
    # The stratified arm (added after the first comparison): the same budget, every task at its share of every stage.
    assert arms["srd_stratified"]["sample_passes"]["mean"] == arms["srd"]["sample_passes"]["mean"]
    assert "| fkl | SRD stratified by task (added) |" in (out / "table.md").read_text()
    shares = results["summary"]["task_shares"]
    for task, share in shares["srd_stratified"]["stage 0"].items():
        counts = [json.loads(line)["task"] for line in (out / "testbed" / "train.jsonl").read_text().splitlines()].count(task)
        assert abs(share["mean"] * (n_train // 4) - counts / 4) < 1
    assert set(shares["srd"]) == {"stage 0", "stage 1", "stage 2", "dropped"}
    ranking = results["summary"]["ranking"]
    for column in ("difficulty_rank", "rank_rouge_l", "rank_ce_loss"):
        assert 0.0 <= ranking["noisy_recall"][column]["mean"] <= 1.0
    assert -1.0 <= ranking["rank_agreement"]["mean"] <= 1.0
    seed = results["seeds"]["0"]
    assert seed["ranking"]["noisy_rows"] == n_train // 10
    # Both arms ran through the real CLIs into their own run folders.
    for arm in ("srd", "baseline", "srd-stratified"):
        run = json.loads((out / "seed-0" / f"fkl-{arm}" / "run.json").read_text())
        assert run["mode"] == ("baseline" if arm == "baseline" else "curriculum")
        assert run["settings"]["loss"] == "fkl" and run["settings"]["seed"] == 0
    # A rerun reuses every finished step.
    again = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out)], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout
    assert json.loads((out / "results.json").read_text())["summary"]["arms"] == results["summary"]["arms"]


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["teachable", "paper"])
def test_quick_two_regime_comparison(tmp_path, regime):
    """`run.py --quick --regime R`: the four arms of the pre-registered comparison (PLAN.md) through the real CLIs."""
    pytest.importorskip("matplotlib")
    if not RUN.is_file():
        pytest.skip(f"{RUN} is absent")
    from srdata.curriculum.regime import regime_of_cut
    from srdata.demo.regimes import REGIMES

    out = tmp_path / f"repro-{regime}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, str(RUN), "--quick", "--regime", regime, "--out", str(out)], capture_output=True, text=True,
                               env=env, cwd=REPO, timeout=1800)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["regime"] == regime and settings["arms"] == ["srd", "srd_teachable", "baseline", "baseline_offline"]
    assert settings["testbed"]["tasks"] == list(REGIMES[regime]["tasks"])
    assert settings["testbed"]["noise_fraction"] == REGIMES[regime]["noise_fraction"]
    train = [json.loads(line) for line in (out / "testbed" / "train.jsonl").read_text().splitlines()]
    assert sum(r["is_noisy"] for r in train) == round(REGIMES[regime]["noise_fraction"] * len(train))
    assert {r["task"] for r in train} == set(REGIMES[regime]["tasks"])
    arms = results["summary"]["arms"]["fkl"]
    n_train = settings["testbed"]["train_pairs"]
    assert arms["baseline"]["sample_passes"]["mean"] == arms["baseline_offline"]["sample_passes"]["mean"] == n_train * settings["baseline_epochs"]
    assert arms["srd"]["sample_passes"]["mean"] == arms["srd_teachable"]["sample_passes"]["mean"] == settings["srd_epochs_per_stage"] * 6 * (n_train // 4)
    for arm in ("srd", "srd_teachable", "baseline", "baseline_offline"):
        assert set(arms[arm]["exact_match_by_task"]) == set(REGIMES[regime]["tasks"])
        # time including the passes each arm needs: SRD score + export, teachable + teach, offline score + teach, online nothing
        assert (arms[arm]["train_plus_scoring_seconds"]["mean"] > arms[arm]["train_seconds"]["mean"]) is (arm != "baseline")
    seed = results["seeds"]["0"]
    assert arms["srd_teachable"]["scoring_seconds"]["mean"] > arms["srd"]["scoring_seconds"]["mean"]  # + the teach pass
    pairs = results["summary"]["paired_differences"]["fkl"]
    assert set(pairs) == {"srd_minus_baseline", "srd_teachable_minus_baseline", "baseline_offline_minus_baseline", "srd_teachable_minus_srd"}
    assert pairs["srd_minus_baseline"]["exact_match"]["values"] == [
        seed["arms"]["fkl"]["srd"]["test"]["overall"]["exact_match"] - seed["arms"]["fkl"]["baseline"]["test"]["overall"]["exact_match"]]
    # Each arm ran through the real CLIs: the offline arm loaded no teacher, the teachable arm's stages were ranked by teachable.
    offline = json.loads((out / "seed-0" / "fkl-baseline-offline" / "run.json").read_text())
    assert offline["mode"] == "baseline" and offline["settings"]["teacher"] is None
    assert offline["settings"]["teacher_logits"] == str(out / "seed-0" / "score")
    teachable = json.loads((out / "seed-0" / "curriculum-teachable" / "curriculum.json").read_text())
    assert teachable["rank_columns"]["stage_files"]["name"] == "teachable"
    for name in ("results.json", "table.md", "quality_vs_time.png"):
        assert (out / name).stat().st_size > 0
    # What `srdata report`/`export` tell a user of this run (the paper ranking's cut of the scored and taught run).
    import polars as pl

    annotated = out / "seed-0" / "score" / "annotated.parquet"
    ranks = pl.read_parquet(annotated, columns=["difficulty_rank"])["difficulty_rank"]
    statement = regime_of_cut(annotated, ranks, 3 * (ranks.count() // 4))
    assert statement is not None and 0.0 <= statement["teachable_share"] <= 1.0
    if regime == "teachable":  # today's testbed: the teacher does what the student finds hardest
        assert statement["mostly_teachable"], statement
