"""`srdata score` is never wrong in silence: one writer per folder, content identity, shard
checksums, no file of the user's touched, clear errors for a full disk, pickle weights and
output folders the run would read (issue 22)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

import srdata
from srdata.cli import main
from srdata.run.folder import RunDirError, RunStore, read_manifest
from srdata.run.identity import UnsafeWeightsError
from srdata.run.io import HOST_TAG, IntegrityError, file_sha256
from srdata.steps.dataset import load_split_with_identity

from .conftest import write_jsonl

FAST = dict(device="cpu", max_new_tokens=4, shard_size=4, progress=False)
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


def rows(n: int, word: str = "cat") -> list[dict]:
    return [{"instruction": f"Say {word} {i}.", "input": "", "output": f"{word} {i}"} for i in range(n)]


def cli(data: Path, model: Path, out: Path, *extra: str, shard_size: int = 4) -> list[str]:
    return [sys.executable, "-m", "srdata.cli", "score", str(data), "--model", str(model), "--output", str(out),
            "--device", "cpu", "--shard-size", str(shard_size), "-q", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def score_cli(*args: str):
    return CliRunner().invoke(main, ["score", *args])


def no_traceback(result) -> bool:
    """A ClickException (a message, exit 1) and not an exception escaping the CLI."""
    return isinstance(result.exception, SystemExit) and "Traceback" not in result.output


# ---------------------------------------------------------------------------- 1. one writer
@pytest.mark.parametrize("same_settings", [False, True], ids=["different", "identical"])
def test_two_scores_started_together_on_one_new_folder_leave_one_writers_results(tiny_gpt2, tmp_path, same_settings):
    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    run = tmp_path / "run"
    tokens = {"a": 6, "b": 6 if same_settings else 7}
    procs = {name: subprocess.Popen(cli(data, tiny_gpt2, run, "--max-new-tokens", str(n)), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, n in tokens.items()}
    outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
    winners = [name for name, proc in procs.items() if proc.returncode == 0]
    assert len(winners) == 1, outputs
    winner, loser = winners[0], next(name for name in procs if name != winners[0])
    message = outputs[loser][1]
    assert f"{run} is in use by another process (srdata score, PID {procs[winner].pid}" in message, message
    assert "Traceback" not in message
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["generation"]["max_new_tokens"] == tokens[winner]
    clean = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "clean"), **{**FAST, "max_new_tokens": tokens[winner]})
    assert pl.read_parquet(run / "annotated.parquet").equals(clean.to_polars())


def test_two_starts_and_a_kill_of_the_writer_then_the_rerun_equals_a_clean_run(tiny_gpt2, tmp_path):
    """The kill campaign with concurrent starts: the loser is refused, the writer is SIGKILLed mid-run."""
    data = write_jsonl(tmp_path / "d.jsonl", rows(16))
    run = tmp_path / "run"
    args = cli(data, tiny_gpt2, run, "--max-new-tokens", "4", shard_size=2)
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "shards").glob("shard-*.parquet"))) < 2:
        time.sleep(0.02)
    holder = json.loads((run / ".srdata.lock").read_text())["pid"]
    writer = next(p for p in procs if p.pid == holder)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    other = next(p for p in procs if p is not writer)
    _, err = other.communicate(timeout=300)
    # Refused at once while the writer ran; had it reached the lock only after the kill, it resumed.
    assert (other.returncode != 0 and "is in use by another process" in err) or other.returncode == 0, err
    assert "Traceback" not in err

    settings = dict(FAST, shard_size=2)
    rerun = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **settings)
    clean = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "clean"), **settings)
    resumed = rerun.to_polars()
    assert resumed.equals(clean.to_polars())
    assert resumed["srd_id"].to_list() == list(range(16))  # every row once: no duplicate, none lost


# ---------------------------------------------------------------------------- 2. content identity
def test_a_dataset_edited_with_its_mtime_kept_is_another_dataset(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(4, "cat"))
    first = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "a"), **FAST)
    kept = data.stat()
    data.write_text(data.read_text().replace("cat", "dog"))  # same size
    os.utime(data, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # as cp -p, rsync -t, tar x leave it
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)

    second = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "b"), **FAST)
    assert first.to_polars()["output"].to_list() == [f"cat {i}" for i in range(4)]
    assert second.to_polars()["output"].to_list() == [f"dog {i}" for i in range(4)]  # the new content, not datasets' cache
    assert first.manifest["identity"]["dataset"]["content"] != second.manifest["identity"]["dataset"]["content"]
    with pytest.raises(RunDirError, match=rf"the dataset {re.escape(str(data))} does not hold the content this run scored"):
        srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "a"), **FAST)


def test_folders_of_data_files_and_save_to_disk_folders_are_identified_by_content(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    part = write_jsonl(folder / "part-0.jsonl", rows(3, "cat"))
    before, identity = load_split_with_identity(str(folder))
    kept = part.stat()
    part.write_text(part.read_text().replace("cat", "dog"))
    os.utime(part, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    after, edited = load_split_with_identity(str(folder))
    assert before["output"][0] == "cat 0" and after["output"][0] == "dog 0"
    assert identity["content"] != edited["content"]

    saved = tmp_path / "saved"
    after.save_to_disk(str(saved))
    _, original = load_split_with_identity(str(saved))
    arrow = next(saved.glob("*.arrow"))
    flipped = bytearray(arrow.read_bytes())
    flipped[flipped.rindex(b"dog")] ^= 0x01  # "dog" -> "eog": same size; the mtime is put back
    kept = arrow.stat()
    arrow.write_bytes(bytes(flipped))
    os.utime(arrow, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert load_split_with_identity(str(saved))[1]["content"] != original["content"]


# ---------------------------------------------------------------------------- 3. shard checksums
def test_bit_flips_in_a_finished_shard_are_named_and_recomputed_never_read(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    run = tmp_path / "run"
    clean = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST).to_polars()
    shard = run / "shards" / "shard-00001.parquet"
    original = shard.read_bytes()
    rng = random.Random(22)
    for _ in range(4):
        flipped = bytearray(original)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError, match=r"shard-00001\.parquet does not match its checksum.*run the same command again"):
            RunStore(run).read_shards(read_manifest(run).shards)  # at assembly: refused, named
        said: list[str] = []
        again = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), echo=said.append, **FAST)
        assert f"{shard} does not match its checksum (the file was changed or damaged): recomputing it" in said
        assert again.to_polars().equals(clean)
        assert file_sha256(shard) == again.manifest["shards"][1]["sha256"]

    shard.write_bytes(b"not a parquet file at all")  # corrupted bytes: named and recomputed
    said = []
    assert srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), echo=said.append, **FAST).to_polars().equals(clean)
    assert any("shard-00001.parquet does not match its checksum" in line for line in said)


def test_a_shard_without_a_record_or_with_other_srd_ids_is_recomputed(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    run = tmp_path / "run"
    clean = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST).to_polars()
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    # a kill between writing shard 0 and recording it
    manifest["shards"][0].update(done=False, sha256=None)
    # shard 1 rewritten with one srd_id changed, and a record to match (a checksum cannot catch that)
    shard = run / "shards" / "shard-00001.parquet"
    pl.read_parquet(shard).with_columns(pl.Series("srd_id", [4, 5, 5, 7])).write_parquet(shard)
    manifest["shards"][1].update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"shard-00001\.parquet does not hold exactly rows 4\.\.7 in its srd_id column"):
        RunStore(run).read_shards(read_manifest(run).shards)
    said: list[str] = []
    again = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), echo=said.append, **FAST)
    assert f"{run / 'shards' / 'shard-00000.parquet'} has no checksum in the manifest (its run stopped before recording it): recomputing it" in said
    assert any("shard-00001.parquet does not hold exactly rows 4..7 in its srd_id column: recomputing it" in line for line in said)
    assert again.to_polars().equals(clean)


# ---------------------------------------------------------------------------- 4, 5. the user's files
def test_overwrite_never_reuses_or_removes_shards_whose_manifest_was_deleted(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), **FAST)
    (run / "manifest.json").unlink()
    before = snapshot(run)
    with pytest.raises(RunDirError, match=r"holds annotated.parquet, shards/shard-00000.parquet, shards/shard-00001.parquet but no "
                                          r"manifest.json: srdata cannot tell it wrote them"):
        srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(run), overwrite=True, **{**FAST, "max_new_tokens": 5})
    assert snapshot(run) == before


def test_a_folder_of_the_users_is_refused_untouched_and_overwrite_keeps_every_file_of_theirs(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    for name, text in {"notes.txt": "mine", ".tmp-123-notes.txt": "a draft", ".notes.tmp": "x", "shards/notes.txt": "kept"}.items():
        (mine / name).write_text(text)
    before = snapshot(mine)
    refused = score_cli(str(data), "--model", str(tiny_gpt2), "--output", str(mine), "--device", "cpu", "-q")
    assert refused.exit_code == 1 and no_traceback(refused)
    assert f"output folder {mine} is not empty and holds no srdata run" in refused.output
    assert snapshot(mine) == before and not (mine / ".srdata.lock").exists()  # nothing touched, nothing added

    # --overwrite scores beside them; a later --overwrite with other settings replaces srdata's files only
    stale = mine / f".tmp-srdata-{HOST_TAG}-{DEAD_PID}-x1-manifest.json"  # srdata's marked temp of a dead process
    for extra in ([], ["--max-new-tokens", "5"]):
        stale.write_text("{")
        done = score_cli(str(data), "--model", str(tiny_gpt2), "--output", str(mine), "--device", "cpu", "--shard-size", "4",
                         "--max-new-tokens", "4", "--overwrite", "-q", *extra)
        assert done.exit_code == 0, done.output
        assert {k: v for k, v in snapshot(mine).items() if k in before} == before and not stale.exists()
    assert json.loads((mine / "manifest.json").read_text())["config"]["generation"]["max_new_tokens"] == 5

    # a file of the user's where the new plan puts a shard: refused, never overwritten
    (mine / "shards" / "shard-00003.parquet").write_text("my own parquet")
    clash = score_cli(str(data), "--model", str(tiny_gpt2), "--output", str(mine), "--device", "cpu", "--shard-size", "2",
                      "--overwrite", "-q")
    assert clash.exit_code == 1 and no_traceback(clash)
    assert "shards/shard-00003.parquet, which no manifest of this folder records" in clash.output
    assert (mine / "shards" / "shard-00003.parquet").read_text() == "my own parquet"
    assert {k: v for k, v in snapshot(mine).items() if k in before} == before


def test_files_named_like_a_run_without_a_manifest_are_refused_even_with_overwrite(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "shard-00000.parquet").write_text("mine")
    (mine / "annotated.parquet").write_text("mine too")
    before = snapshot(mine)
    for flags in ([], ["--overwrite"]):
        result = score_cli(str(data), "--model", str(tiny_gpt2), "--output", str(mine), "--device", "cpu", "-q", *flags)
        assert result.exit_code == 1 and no_traceback(result)
        assert "holds annotated.parquet, shards/shard-00000.parquet but no manifest.json" in result.output
        assert snapshot(mine) == before


# ---------------------------------------------------------------------------- 6. output inside the data
def test_an_output_folder_the_loader_would_read_is_refused_before_any_work(tiny_gpt2, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(4))
    no_model = str(tmp_path / "no-such-model")  # refused before the model is even looked at
    with pytest.raises(RunDirError, match=rf"output folder {re.escape(str(folder / 'run'))} is inside the dataset folder {re.escape(str(folder))}"):
        srdata.score(dataset=str(folder), model=no_model, output=str(folder / "run"), **FAST)
    assert not (folder / "run").exists()

    run = tmp_path / "run"
    srdata.score(dataset=str(folder / "train.jsonl"), model=str(tiny_gpt2), output=str(run), **FAST)
    before = snapshot(run)
    for dataset in (run / "annotated.parquet", f"{run}/shards/*.parquet", f"{run}/*.parquet"):
        with pytest.raises(RunDirError, match=r"a file the run writes in the output folder"):
            srdata.score(dataset=str(dataset), model=no_model, output=str(run), **FAST)
    with pytest.raises(RunDirError, match="is inside the output folder"):
        srdata.score(dataset=str(run / "shards"), model=no_model, output=str(run), **FAST)
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- 7. full and read-only disks
def test_a_full_disk_is_a_clear_error_and_the_rerun_resumes(tiny_gpt2, tmp_path, small_disk):
    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    disk = small_disk(160)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (160 - 36) * 1024)  # room for the manifest and a few shards only
    run = disk / "run"
    args = [str(data), "--model", str(tiny_gpt2), "--output", str(run), "--device", "cpu", "--shard-size", "4", "--max-new-tokens", "4", "-q"]
    full = score_cli(*args)
    assert full.exit_code == 1 and no_traceback(full), full.output
    assert re.search(rf"could not write {re.escape(str(run))}/\S+: no space left on the device; free some space", full.output), full.output
    assert not list(run.rglob(".tmp-srdata-*"))  # nothing half-written
    manifest = read_manifest(run)
    done = [s for s in manifest.shards if s.done]
    assert done and len(done) < len(manifest.shards)
    for s in done:
        assert file_sha256(run / s.file) == s.sha256

    filler.unlink()  # the user frees space and runs the same command
    again = score_cli(*args)
    assert again.exit_code == 0, again.output
    resumed = json.loads((run / "manifest.json").read_text())
    assert resumed["resumed"] and resumed["status"] == "complete"
    clean = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "clean"), **FAST)
    assert pl.read_parquet(run / "annotated.parquet").equals(clean.to_polars())

    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        read_only = score_cli(*args, "--max-new-tokens", "5", "--overwrite")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert read_only.exit_code == 1 and no_traceback(read_only)
    assert "the file system is read-only; choose a writable folder" in read_only.output


# ---------------------------------------------------------------------------- 8. pickle weights
def test_pickle_only_weights_are_refused_before_any_work(tiny_gpt2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2, model)
    (model / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_gpt2).state_dict(), model / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    result = score_cli(str(data), "--model", str(model), "--output", str(tmp_path / "run"), "--device", "cpu")
    assert result.exit_code == 1 and no_traceback(result)
    assert f"model folder {model} holds weights only as pickle files (pytorch_model.bin); srdata loads only safetensors" in result.output
    assert "from_pretrained(path, use_safetensors=False).save_pretrained(out, safe_serialization=True)" in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(UnsafeWeightsError):
        srdata.score(dataset=str(data), model=str(model), output=str(tmp_path / "run"), **FAST)


# ---------------------------------------------------------------------------- 9. config files
@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("c.json", '{\n  "model": "m",\n  "max_new_tokens": 8,\n  "max_new_tokens": 9\n}\n', r"c\.json line 4: key 'max_new_tokens' appears twice"),
        ("c.yaml", "max_new_tokens: 8\ngeneration:\n  max_new_tokens: 16\n",
         r"c\.yaml: setting generation\.max_new_tokens is given twice \('max_new_tokens' at the top level and 'max_new_tokens' under 'generation'\)"),
        ("c.toml", "max_new_tokens = 8\n[generation]\nmax_new_tokens = 16\n", r"c\.toml: setting generation\.max_new_tokens is given twice"),
        ("c.yaml", "model: m\nmax_new_tokens: 8\nmax_new_tokens: 9\n", r"c\.yaml line 3 column 1: key 'max_new_tokens' appears twice"),
        ("c.yaml", "model: m\ngeneration:\n  max_new_tokens: [8\n", r"c\.yaml line 4 column 1: .* \(not valid YAML\)"),
        ("c.yaml", "model: m\n  bad: indent\n", r"c\.yaml line 2 column 6: .* \(not valid YAML\)"),
        ("c.json", '{"model": "m",\n "max_new_tokens": }\n', r"c\.json line 2 column 20: Expecting value \(not valid JSON\)"),
        ("c.toml", 'model = "m\n', r"c\.toml: .*\(at line 1, column \d+\) \(not valid TOML\)"),
    ],
)
def test_config_file_problems_name_the_file_the_key_and_the_line(tmp_path, name, text, expected):
    config = tmp_path / name
    config.write_text(text)
    result = score_cli("d.jsonl", "--config", str(config), "--model", "m", "--output", str(tmp_path / "run"))
    assert result.exit_code == 1 and no_traceback(result), result.output
    assert re.search(rf"config file {re.escape(str(tmp_path))}/{expected}", result.output), result.output
    assert not (tmp_path / "run").exists()
