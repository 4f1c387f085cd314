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
