"""Kills and failed starts lose no work and block nothing; files are readable by teammates."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

import srdata
from srdata.curriculum import output as output_module
from srdata.curriculum.reader import load_curriculum
from srdata.curriculum.export import export_curriculum
from srdata.run.io import FILE_MODE, HOST_TAG, remove_stale_temps
from tests._runs import make_run

from .conftest import write_jsonl

FAST = dict(device="cpu", dtype="float32", max_new_tokens=4, shard_size=2, progress=False)
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


def marked(pid: int, rest: str) -> str:
    """A temp-file name as srdata writes it: its marker, this host, the writer's PID."""
    return f".tmp-srdata-{HOST_TAG}-{pid}-{rest}"


def rows(n: int = 4) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(n)]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask_not_0600(tiny_gpt2, tmp_path):
    assert FILE_MODE == 0o666 & ~_umask()
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST)
    out = export_curriculum(run)
    files = [run / "annotated.parquet", run / "manifest.json", *sorted((run / "shards").glob("*.parquet")), *out.iterdir()]
    assert len(files) > 6
    assert {f.name: mode(f) for f in files} == {f.name: FILE_MODE for f in files}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temps_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / marked(DEAD_PID, "x1-manifest.json")
    live = tmp_path / marked(os.getppid(), "x2-shard-00000.parquet")  # the parent: a live process
    other_host = tmp_path / f".tmp-srdata-00000000-{DEAD_PID}-x3-manifest.json"  # a shared file system: not ours to judge
    # Not provably srdata's: no marker (a user's file, or another tool's named like an old srdata temp).
    unmarked = [tmp_path / f".tmp-{DEAD_PID}-x1-manifest.json", tmp_path / ".manifest.json.a1b2c3.tmp", tmp_path / ".notes.tmp"]
    for f in (dead, live, other_host, *unmarked):
        f.write_text("x")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [dead.name]
    assert live.exists() and other_host.exists() and all(f.exists() for f in unmarked)


def test_kill_during_the_first_manifest_write_does_not_block_the_same_command(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / marked(DEAD_PID, "k3j2-manifest.json")).write_text('{"half": ')  # what a kill mid-write leaves
    (run / "shards" / marked(DEAD_PID, "aaaa-shard-00000.parquet")).write_bytes(b"PAR1")
    result = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST)
    assert result.manifest["status"] == "complete"
    leftovers = [p.name for p in run.rglob(".tmp-*")]
    assert leftovers == []


def test_a_failed_start_is_resumed_by_the_same_command(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    model = tmp_path / "student"
    shutil.copytree(tiny_gpt2, model)
    weights = model / "model.safetensors"
    moved = tmp_path / "model.safetensors"
    weights.rename(moved)  # a model folder without its weights
    run = tmp_path / "run"
    with pytest.raises(Exception):
        srdata.score(dataset=str(data), model=str(model), output=str(run), **FAST)
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    moved.rename(weights)  # the user fixes the cause and runs the same command: no --overwrite needed
    result = srdata.score(dataset=str(data), model=str(model), output=str(run), **FAST)
    assert result.manifest["status"] == "complete" and not result.manifest["resumed"]


def test_a_run_with_finished_shards_is_still_protected(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST)
    with pytest.raises(ValueError, match="max_new_tokens: 4 -> 5"):
        srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **{**FAST, "max_new_tokens": 5})


def test_resume_accepts_the_same_file_by_another_path(tiny_gpt2, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST)
    monkeypatch.chdir(tmp_path)
    again = srdata.score(dataset="d.jsonl", model=str(tiny_gpt2), output=str(run), **FAST)
    assert again.manifest["resumed"]


def test_export_cleans_temps_of_a_killed_export(tmp_path):
    run = make_run(tmp_path / "run")
    out = run / "curriculum"
    out.mkdir()
    stale = out / marked(DEAD_PID, "stage-0.parquet")
    stale.write_bytes(b"x" * 1000)
    export_curriculum(run)
    assert not stale.exists() and not list(out.glob(".tmp-*"))


def test_interrupted_reexport_never_pairs_old_summary_with_new_files(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", n=40)
    out = export_curriculum(run, stages=4, keep=3)
    old_summary = (out / "curriculum.json").read_text()

    # killed among the renames of a 5/4 export: the old summary is already gone
    # (the summary is marked "publishing" before the renames, so readers refuse the mix)
    real_publish = output_module.publish
    calls = []

    def killed_on_second(tmp, final):
        calls.append(final)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_publish(tmp, final)

    monkeypatch.setattr(output_module, "publish", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        export_curriculum(run, stages=5, keep=4, overwrite=True)
    with pytest.raises(ValueError, match="interrupted while it replaced its files"):
        load_curriculum(out)
    monkeypatch.undo()

    # files of a 5/4 export beside the summary of the 4/3 one (any other interleaving): refused
    export_curriculum(run, stages=5, keep=4)
    (out / "curriculum.json").write_text(old_summary)
    with pytest.raises(ValueError, match=r"stage file .*stage-0.parquet .* mixes files of two exports"):
        load_curriculum(out)
    export_curriculum(run, stages=4, keep=3)
    assert [len(s) for s in load_curriculum(out).values()] == [10, 20, 30]


def test_the_cli_removes_a_dead_writers_temps(tiny_gpt2, tmp_path):
    """Through the command line: temps a killed writer left in shards/ are gone after the next run."""
    data = write_jsonl(tmp_path / "d.jsonl", rows(12))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "srdata.cli", "score", str(data), "--model", str(tiny_gpt2), "--output", str(run),
            "--device", "cpu", "--max-new-tokens", "4", "--shard-size", "2", "-q"]
    # a dead writer's temp files, as a kill at the worst moment leaves them
    (run / "shards").mkdir(parents=True)
    (run / "shards" / marked(DEAD_PID, "zz-shard-00003.parquet")).write_bytes(b"partial")
    subprocess.run(args, check=True, timeout=300)
    assert not list(run.rglob(".tmp-*"))
    assert json.loads((run / "manifest.json").read_text())["counts"]["rows_scored"] == 12


def test_batch_settings_move_ce_only_in_the_last_digits_and_are_recorded_per_shard(tiny_llama, shared_data_dir, tmp_path):
    """What the README promises: batching is not bit-neutral, but within 1e-5 relative, and recorded."""
    import polars as pl

    data = tmp_path / "t0.parquet"
    pl.read_parquet(shared_data_dir / "t0-train.parquet").filter(pl.col("response").str.len_chars() > 0).head(24).write_parquet(data)
    kw = dict(dataset=str(data), model=str(tiny_llama), device="cpu", dtype="float32", max_new_tokens=3,
              max_prompt_tokens=96, shard_size=12, progress=False)
    a = srdata.score(output=str(tmp_path / "a"), **kw).to_polars().sort("srd_id")
    b = srdata.score(output=str(tmp_path / "b"), batch_size=5, token_budget=700, **kw)
    b_frame = b.to_polars().sort("srd_id")
    rel = ((a["ce_loss"] - b_frame["ce_loss"]).abs() / a["ce_loss"].abs()).max()
    assert rel < 1e-5
    assert [(s["batch_size"], s["token_budget"]) for s in b.manifest["shards"]] == [(5, 700), (5, 700)]
    # a resumed run with another batch size is accepted, and each shard says how it was scored
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][1]["done"] = False
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "a" / "shards" / "shard-00001.parquet").unlink()
    resumed = srdata.score(output=str(tmp_path / "a"), batch_size=3, **kw)
    assert [s["batch_size"] for s in resumed.manifest["shards"]] == [64, 3]
    c = resumed.to_polars().sort("srd_id")
    assert ((a["ce_loss"] - c["ce_loss"]).abs() / a["ce_loss"].abs()).max() < 1e-5


def test_distill_checkpoints_follow_the_umask(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srd_distill.memory import save_checkpoint

    folder = tmp_path / "stage-0"
    save_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2), folder)
    files = [f for f in folder.iterdir() if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: mode(f) for f in files} == {f.name: FILE_MODE for f in files}
