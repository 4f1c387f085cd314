"""srd-distill train is never wrong in silence (issue 22): one writer per --output, inputs identified by content,
checkpoints verified by checksum, clear errors with nothing half-written, no file of the user's touched, and
resumable step checkpoints that give the weights and metrics of a run that was never stopped.

Real processes where it matters: the concurrency and kill tests start the real CLI
(``python -m srd_distill.cli train``) together and SIGKILL it; disk-full tests fill a real
tmpfs; corruption tests flip real bits in real files.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from srd_distill.checkpoints import MARKER_FILE, verify_checkpoint
from srd_distill.cli import main
from srd_distill.errors import RunFolderError
from srd_distill.train import train
from srdata.run.io import LOCK_FILE

from .conftest import corpus
from .test_train import curriculum, eval_file, scored_run  # noqa: F401  (module fixtures: a real export)
from ._threads import single_torch_thread

FAST = dict(device="cpu", dtype="float32", batch_size=1, lr=3e-3, log_every=1, eval_max_new_tokens=2)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in the processes these tests start: tiny models run several times faster so
    on a busy machine, and the in-process reference run computes exactly as the CLI processes do."""
    with single_torch_thread(monkeypatch):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random tiny teacher and a smaller student with its tokenizer; the student keeps GPT-2's dropout (0.1),
    so a resumed stage matches an uninterrupted one only if the RNG state is restored too."""
    from srdata.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("safety-models")
    teacher = build_tiny_model(root / "teacher", corpus(), hidden_size=32, num_layers=1, num_heads=2, max_positions=256, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=256, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(2)
    student = root / "student"
    AutoModelForCausalLM.from_config(config).save_pretrained(student)
    tokenizer.save_pretrained(student)
    return {"teacher": teacher, "student": student}


def settings(models, **kw) -> dict:
    return {"teacher": str(models["teacher"]), "student": str(models["student"]), **FAST, **kw}


def cli_args(models, curriculum, out, *extra: str, quiet: bool = True) -> list[str]:
    """The arguments of one `srd-distill train` on the curriculum (3 stages of 5/10/15 rows, batch 1)."""
    return ["train", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--curriculum", str(curriculum),
            "--output", str(out), "--device", "cpu", "--dtype", "float32", "--batch-size", "1", "--lr", "3e-3",
            "--log-every", "1", "--eval-max-new-tokens", "2", *["-q"] * quiet, *extra]


def invoke(args: list[str]):
    """The CLI in this process; a user error must come back as a message, never as an exception."""
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- item 2: inputs by content
def test_resume_is_refused_when_an_input_changed(models, scored_run, tmp_path):
    import srdata

    cur = srdata.export_curriculum(scored_run, out=tmp_path / "cur")
    teacher = tmp_path / "teacher"
    shutil.copytree(models["teacher"], teacher)
    out = tmp_path / "run"
    run = settings(models, teacher=str(teacher), curriculum=str(cur), output=str(out), epochs=1, max_steps=2)
    train({**run, "stop_after_stage": 0}, progress=False)
    inputs = json.loads((out / "run.json").read_text())["inputs"]
    assert {"teacher", "student", "curriculum", "encoding"} <= set(inputs) and inputs["teacher"]["fingerprint"]
    recorded = sorted(json.loads((cur / "curriculum.json").read_text())["stages"], key=lambda s: s["stage"])
    assert [f["sha256"] for f in inputs["curriculum"]["stage_files"]] == [s["sha256"] for s in recorded]

    # The curriculum exported again with another ranking: same names, other rows.
    before = tree(cur)
    srdata.export_curriculum(scored_run, out=cur, rank_by="ce_loss:asc", overwrite=True)
    assert tree(cur) != before
    with pytest.raises(RunFolderError, match=r"(?s)other inputs:\n  curriculum .* stage \d \(stage-\d\.parquet\): its content changed.*"
                                             r"restore the run's inputs to resume it, choose another --output, or pass --overwrite"):
        train(run, progress=False)
    srdata.export_curriculum(scored_run, out=cur, overwrite=True)  # the run's curriculum again: it resumes
    train({**run, "stop_after_stage": 0}, progress=False)

    # The teacher's weights replaced by others of the same size (same names, same shapes).
    weights = load_file(teacher / "model.safetensors")
    size = (teacher / "model.safetensors").stat().st_size
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, teacher / "model.safetensors",
              metadata={"format": "pt"})
    assert (teacher / "model.safetensors").stat().st_size == size
    with pytest.raises(RunFolderError, match=r"teacher .*teacher: its content changed \(fingerprint \w+ -> \w+\)"):
        train(run, progress=False)
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"  # refused before anything was written


def test_a_curriculum_whose_files_do_not_match_curriculum_json_is_refused(models, curriculum, tmp_path):
    bad = tmp_path / "cur"
    shutil.copytree(curriculum, bad)
    flip_bit(bad / "stage-1.parquet")  # same size, same row count in the footer: only the checksum can tell
    result = invoke(cli_args(models, bad, tmp_path / "run", "--epochs", "1", "--max-steps", "1"))
    assert result.exit_code == 1
    assert f"stage file {bad / 'stage-1.parquet'} does not match the checksum curriculum.json records" in result.output
    assert "srdata export" in result.output and not (tmp_path / "run").exists()

    swapped = tmp_path / "swapped"
    shutil.copytree(curriculum, swapped)
    shutil.copy(curriculum / "stage-2.parquet", swapped / "stage-1.parquet")  # files of another stage / export
    result = invoke(cli_args(models, swapped, tmp_path / "run2", "--epochs", "1"))
    assert result.exit_code == 1 and "stage-1.parquet is" in result.output and "curriculum.json lists" in result.output

    # curriculum.json pointing outside its folder is refused before the file is opened.
    escaped = tmp_path / "escaped"
    shutil.copytree(curriculum, escaped)
    summary = json.loads((escaped / "curriculum.json").read_text())
    summary["stages"][0]["file"] = "../cur/stage-0.parquet"
    (escaped / "curriculum.json").write_text(json.dumps(summary))
    result = invoke(cli_args(models, escaped, tmp_path / "run3", "--epochs", "1"))
    assert result.exit_code == 1 and "not a file inside" in result.output


# ----------------------------------------------------------------------------- item 3: checkpoint checksums
def test_damaged_checkpoints_and_records_are_refused_with_the_file_named(models, curriculum, tmp_path):
    out = tmp_path / "run"
    args = cli_args(models, curriculum, out, "--epochs", "1", "--max-steps", "2")
    assert invoke([*args, "--stop-after-stage", "1"]).exit_code == 0
    for stage in (0, 1):
        verify_checkpoint(out / f"stage-{stage}", fix="-")  # sealed, with the marker
    seal = json.loads((out / "stage-0" / "srd_checksums.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "srd_stage.json", MARKER_FILE} <= set(seal)

    # A flipped bit in a finished stage's weights: named, with the fix; nothing trains on it.
    weights = out / "stage-1" / "model.safetensors"
    pristine = weights.read_bytes()
    flip_bit(weights)
    result = invoke(args)
    assert result.exit_code == 1, result.output
    assert f"{weights} does not match the checksum recorded when it was written" in result.output
    assert "retrain stage 1" in result.output and not (out / "stage-2").exists()
    weights.write_bytes(pristine)

    # A truncated stage record and a truncated run.json.
    record = out / "stage-0" / "srd_stage.json"
    kept = record.read_bytes()
    record.write_bytes(kept[: len(kept) // 2])
    result = invoke(args)
    assert result.exit_code == 1 and f"{record} has {len(kept) // 2} bytes, {len(kept)} were written" in result.output
    record.write_bytes(kept)
    run_json = out / "run.json"
    run_json.write_bytes(run_json.read_bytes()[:100])
    result = invoke(args)
    assert result.exit_code == 1 and f"{run_json} is not readable (JSONDecodeError" in result.output
    assert "pass --overwrite to start over" in result.output
    assert invoke([*args, "--overwrite"]).exit_code == 0  # a damaged run.json of a run of ours: --overwrite starts over
    assert json.loads(run_json.read_text())["status"] == "complete"


def test_an_interrupted_stage_resumes_from_its_step_checkpoint_and_a_damaged_one_is_refused(models, curriculum, eval_file,
                                                                                            tmp_path, monkeypatch):
    import srd_distill.train as train_module
    from srd_distill.errors import TrainingInterrupted

    out = tmp_path / "run"
    # Stage 1: 10 rows in steps of 2, 2 epochs = 10 steps; stopped right after the step checkpoint of step 6,
    # in epoch 1, once epoch 0's evaluation has saved its best weights (the checkpoint keeps them too).
    run = settings(models, curriculum=str(curriculum), output=str(out), epochs=2, batch_size=2, checkpoint_interval=2,
                   eval_file=str(eval_file))
    real_save = train_module.save_step_checkpoint

    def ctrl_c_after_step_6_of_stage_1(run_dir, stage, position, **kwargs):
        folder = real_save(run_dir, stage, position, **kwargs)
        if (stage, position.step) == (1, 6):
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(train_module, "save_step_checkpoint", ctrl_c_after_step_6_of_stage_1)
    with pytest.raises(TrainingInterrupted, match="stage 1 continues from its step checkpoint after step 6"):
        train(run, progress=False)
    monkeypatch.setattr(train_module, "save_step_checkpoint", real_save)
    step = out / ".stage-1.step-6"
    assert sorted(p.name for p in out.glob(".stage-1.step-*")) == [step.name]  # only the latest is kept
    verify_checkpoint(step, fix="-")
    assert {"student.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= {p.name for p in step.iterdir()}
    assert (step / "best" / "model.safetensors").is_file()  # epoch 0's best weights

    # A flipped bit in the step checkpoint: refused, named, with the fix; then moved away as the message says.
    kept = step.parent / "kept"
    shutil.copytree(step, kept)
    flip_bit(step / "optimizer.safetensors")
    with pytest.raises(RunFolderError, match=rf"{step / 'optimizer.safetensors'} does not match the checksum .* move {step} away "
                                             r"to restart stage 1 from its beginning"):
        train(run, progress=False)
    shutil.rmtree(step)
    kept.rename(step)  # restored: "kept" was the user's copy, left alone by every run above

    messages: list[str] = []
    train(run, progress=False, echo=messages.append)
    assert any(f"resuming stage 1 from its step checkpoint {step}" in m for m in messages), messages
    assert any("=== stage 1 (2 of 3)" in m and "resumed after step 6" in m for m in messages), messages
    straight = tmp_path / "straight"
    train({**run, "output": str(straight), "checkpoint_interval": 0}, progress=False)
    got, want = state(out), state(straight)
    assert got["names"] == want["names"] and got["stages"] == want["stages"] and got["metrics"] == want["metrics"]
    for stage, tensors in want["weights"].items():
        assert all(torch.equal(tensors[k], got["weights"][stage][k]) for k in tensors), stage


# ----------------------------------------------------------------------------- item 4: clear errors
def test_clear_errors_for_a_file_output_and_pickle_only_models(models, curriculum, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = invoke(cli_args(models, curriculum, a_file))
    assert result.exit_code == 1 and f"--output {a_file} is a file, not a folder" in result.output
    assert a_file.read_text() == "mine"

    pickled = tmp_path / "pickled-teacher"
    shutil.copytree(models["teacher"], pickled)
    model = AutoModelForCausalLM.from_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    args = cli_args(models, curriculum, tmp_path / "run")
    args[args.index("--teacher") + 1] = str(pickled)
    result = invoke(args)
    assert result.exit_code == 1 and "pytorch_model.bin" in result.output
    assert "only safetensors" in result.output and "save_pretrained" in result.output
    assert not (tmp_path / "run").exists()


def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error_and_loses_nothing(models, curriculum, small_disk, tmp_path):
    disk = small_disk(2048)
    out = disk / "run"
    args = cli_args(models, curriculum, out, "--epochs", "1", "--max-steps", "2")
    assert invoke([*args, "--stop-after-stage", "0"]).exit_code == 0
    stage0 = tree(out / "stage-0")
    filler = disk / "filler.bin"  # the user's file: what is left of the disk is less than a checkpoint
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        f.write(b"\0" * (free - 64 * 1024))
    # The stage's checkpoint (no step checkpoints), then a step checkpoint (one after every step).
    for interval, written in (("0", ".stage-1.partial"), ("1", ".stage-1.step-1.partial")):
        result = invoke([*args, "--checkpoint-interval", interval])
        assert result.exit_code == 1, result.output
        assert f"into {out / written}" in result.output and "no space left on the device; free some space" in result.output
        assert "run the same command again to resume" in result.output
        assert tree(out / "stage-0") == stage0 and not (out / "stage-1").exists()  # the previous checkpoint intact, nothing published
        assert not list(out.glob(".stage-1*"))  # the half-written folder removed (it was ours)
    assert filler.stat().st_size == free - 64 * 1024
    filler.unlink()
    assert invoke(args).exit_code == 0 and (out / "stage-2").is_dir()


# ----------------------------------------------------------------------------- item 5: the user's files
def test_a_foreign_folder_is_refused_untouched_and_overwrite_removes_only_ours(models, curriculum, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "stage-0").mkdir()
    (foreign / "stage-0" / "weights.bin").write_bytes(b"precious")
    (foreign / "metrics.jsonl").write_text("{}\n")
    (foreign / ".stage-1.partial").mkdir()
    before = tree(foreign)
    for extra in ([], ["--overwrite"]):
        result = invoke(cli_args(models, curriculum, foreign, "--epochs", "1", "--max-steps", "1", *extra))
        assert result.exit_code == 1 and f"--output {foreign} is not empty and holds no srd-distill run" in result.output
        assert tree(foreign) == before and not (foreign / LOCK_FILE).exists()  # not even a lock file added

    # A run of ours with the user's files inside: --overwrite removes only what srd-distill wrote.
    out = tmp_path / "run"
    args = cli_args(models, curriculum, out, "--epochs", "1", "--max-steps", "1")
    assert invoke(args).exit_code == 0
    (out / "notes.md").write_text("my notes")
    (out / "stage-0" / "eval.txt").write_text("my eval")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"png")
    assert invoke([*args, "--overwrite", "--lr", "1e-3"]).exit_code == 0
    assert (out / "notes.md").read_text() == "my notes" and (out / "plots" / "loss.png").read_bytes() == b"png"
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 1e-3

    # A folder named like a checkpoint that srd-distill did not write is never removed: refused, named.
    shutil.rmtree(out / "stage-2")
    (out / "stage-2").mkdir()
    (out / "stage-2" / "mine.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = invoke([*args, "--lr", "1e-3", *extra])
        assert result.exit_code == 1 and f"{out / 'stage-2'} was not written by srd-distill" in result.output
        assert (out / "stage-2" / "mine.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- items 1, 6, 7: real processes
def start(args: list[str], log: Path) -> subprocess.Popen:
    """The real CLI in its own process; its messages go to ``log`` (a file: a pipe nobody reads could fill and block it)."""
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "srd_distill.cli", *args], stdout=f, stderr=subprocess.STDOUT)


BUSY = "is in use by another process"


def start_pair(args: list[str], logs: Path, n: int, started: list) -> tuple[subprocess.Popen, Path, subprocess.Popen, Path]:
    """Two trains started together; returns (writer, its log, refused, its log) as soon as one was refused.

    The refusal is seen in its log the moment it is printed (stderr is line-buffered), not when
    the refused process has exited, so the writer has barely started when this returns.
    """
    procs = [(start(args, logs / f"{n}{x}.log"), logs / f"{n}{x}.log") for x in "ab"]
    started += [proc for proc, _ in procs]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for i, (proc, log) in enumerate(procs):
            if BUSY in log.read_text() or proc.poll() is not None:
                return (*procs[1 - i], *procs[i])
        time.sleep(0.002)
    raise AssertionError("neither train was refused nor ended")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Poll ``condition`` every 2 ms until it holds (True) or ``proc`` ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {condition}")


def latest_step(out: Path) -> tuple[int, int] | None:
    """(stage, steps) of the newest published step checkpoint of a stage not finished yet, if any."""
    found = sorted((int(p.name.split("-")[1].split(".")[0]), int(p.name.rsplit("-", 1)[1]))
                   for p in out.glob(".stage-*.step-*") if not p.name.endswith(".partial"))
    found = [(stage, step) for stage, step in found if not (out / f"stage-{stage}").is_dir()]
    return found[-1] if found else None


def state(out: Path) -> dict:
    """What a finished run leaves, without times and paths: metrics lines, stage records, every weight."""
    metrics = [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    stages = [{k: v for k, v in s.items() if k not in ("seconds", "started_from")} for s in run["stages_finished"]]
    weights = {s: load_file(out / f"stage-{s}" / "model.safetensors") for s in range(3)}
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    return {"metrics": metrics, "stages": stages, "status": run["status"], "names": names, "weights": weights}


@pytest.mark.slow
def test_concurrent_trains_and_kills_end_as_a_clean_run(models, curriculum, eval_file, tmp_path):
    """Two `srd-distill train` started together on one --output, four times: each time exactly one is refused,
    naming the folder and the holder. The writer is SIGKILLed as its first step checkpoint appears (mostly
    while it is being written), mid-stage after a later step checkpoint, and just after a stage is published;
    the last pair's writer runs to the end. After a kill that left a step checkpoint, the next writer resumes
    from it (not from the stage's first step), and the run ends bit for bit as one never stopped (the student
    has dropout, so the RNG state must be restored too): weights, metrics lines (none twice), stage records."""
    clean = tmp_path / "clean"
    train(settings(models, curriculum=str(curriculum), output=str(clean), epochs=3, checkpoint_interval=0,
                   eval_file=str(eval_file)), progress=False)
    want = state(clean)

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    args = cli_args(models, curriculum, out, "--epochs", "3", "--checkpoint-interval", "2", "--eval-file", str(eval_file), quiet=False)
    finished = lambda: len(list(out.glob("stage-*")))  # noqa: E731
    kills = [  # each judged against the run's state when the pair starts
        lambda start: any(out.glob(".stage-*.step-*")),  # the first step checkpoint being written or just published
        lambda start: (latest_step(out) or (-1, 0)) > (start[0] or (-1, 0)),  # a later step checkpoint than it resumed from
        lambda start: finished() > start[1],  # just after a stage was published
        None,  # the last pair's writer runs to the end
    ]
    started: list[subprocess.Popen] = []
    resumed_from = None
    try:
        for n, moment in enumerate(kills):
            at_start = (latest_step(out), finished() if out.exists() else 0)
            writer, writer_log, refused, refused_log = start_pair(args, logs, n, started)
            if moment is None:
                assert writer.wait(timeout=300) == 0, writer_log.read_text()
            else:
                assert wait_for(lambda: moment(at_start), writer), f"pair {n}: the run ended before the kill"
                writer.send_signal(signal.SIGKILL)
                assert writer.wait() == -signal.SIGKILL
            assert refused.wait(timeout=120) == 1
            message = refused_log.read_text()
            assert "Traceback" not in message, message
            assert f"{out} {BUSY} (srd-distill train, PID {writer.pid} on" in message, message
            if resumed_from is not None:  # went on from the step checkpoint the previous kill left
                assert f"resuming stage {resumed_from[0]} from its step checkpoint" in writer_log.read_text(), writer_log.read_text()
                assert f"resumed after step {resumed_from[1]})" in writer_log.read_text()
            resumed_from = latest_step(out)
    finally:
        for proc in started:  # only the processes this test started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert resumed_from is None

    got = state(out)
    assert got["names"] == want["names"] == ["metrics.jsonl", "run.json", "stage-0", "stage-1", "stage-2"]  # nothing partial left
    assert got["status"] == want["status"] == "complete" and got["stages"] == want["stages"]
    assert got["metrics"] == want["metrics"]  # every line once, in order, with the same numbers
    for stage, tensors in want["weights"].items():
        assert tensors.keys() == got["weights"][stage].keys()
        assert all(torch.equal(tensors[k], got["weights"][stage][k]) for k in tensors), stage
