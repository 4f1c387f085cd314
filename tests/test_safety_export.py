"""Never wrong in silence, on the export side: one writer per folder, checksums, no file of the user's touched.

Real processes started together for the locks, real bit flips, real SIGKILLs, a real full
tmpfs for the disk-full cases, the CLI for every user-facing error (exit code, message, no
traceback).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest

from srdata.curriculum.export import CurriculumError, export_curriculum, rerank_run
from srdata.curriculum.reader import CurriculumIntegrityError, load_curriculum, verified_curriculum, verified_stage_files
from srdata.run.io import HOST_TAG, LOCK_FILE, file_sha256
from tests._cli import invoke
from tests._runs import make_run

# Imported before the start line, so that both processes of a pair start their command together.
STARTER = """
import os, sys, time
import srdata.cli, srdata.curriculum.export, srdata.curriculum.report
start_line = sys.argv[1]
while not os.path.exists(start_line):
    time.sleep(0.001)
sys.argv = ["srdata", *sys.argv[2:]]
srdata.cli.main()
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("safety") / "run", 42, invalid_ids=[0, 41])


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Enough rows that an export takes a while: two started together overlap."""
    return make_run(tmp_path_factory.mktemp("safety-big") / "run", 30_000, shard_size=30_000)


def assert_clean_error(result, *fragments: str) -> None:
    """Exit code 1, a message naming what is asked, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its bytes (the lock file aside: it holds the last holder's name)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# --- checksums ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_flipped_bit_in_a_stage_file_is_refused_naming_it(run: Path, tmp_path: Path, fmt: str):
    out = export_curriculum(run, fmt=fmt, out=tmp_path / "out")
    summary = json.loads((out / "curriculum.json").read_text())
    files = verified_stage_files(out)
    assert [s["sha256"] for s in summary["stages"]] == [file_sha256(f) for f in files]
    target = out / f"stage-1.{fmt}"
    size = target.stat().st_size
    flip_bit(target, size // 2)  # same size, same rows: only the checksum sees it
    with pytest.raises(CurriculumIntegrityError, match=rf"stage file {target} does not match the checksum.*export` again"):
        verified_stage_files(out)
    with pytest.raises(ValueError, match=f"stage-1.{fmt}"):
        load_curriculum(out, cache_dir=str(tmp_path / "cache"))
    # The report reads the export too: a clean message, no traceback.
    assert_clean_error(invoke("report", run, "--curriculum", out, "--out", tmp_path / "report"), f"stage-1.{fmt}", "checksum")


def test_stage_paths_outside_the_folder_are_never_followed(run: Path, tmp_path: Path):
    out = export_curriculum(run, out=tmp_path / "out")
    original = (out / "curriculum.json").read_text()
    outside = tmp_path / "outside.parquet"
    outside.write_bytes((out / "stage-0.parquet").read_bytes())  # a valid file: only its place is wrong
    for name in ["../outside.parquet", str(outside), "sub/../../outside.parquet"]:
        summary = json.loads(original)
        summary["stages"][0]["file"] = name
        (out / "curriculum.json").write_text(json.dumps(summary))
        with pytest.raises(CurriculumIntegrityError, match="not a file inside"):
            verified_curriculum(out)
    # A symbolic link inside the folder that leads out of it is refused as well.
    (out / "curriculum.json").write_text(original)
    (out / "stage-0.parquet").unlink()
    (out / "stage-0.parquet").symlink_to(outside)
    with pytest.raises(CurriculumIntegrityError, match="stage-0.parquet.*not a file inside"):
        verified_curriculum(out)


def test_an_export_without_checksums_is_checked_by_size_and_rows(run: Path, tmp_path: Path, caplog):
    out = export_curriculum(run, out=tmp_path / "out")
    summary = json.loads((out / "curriculum.json").read_text())
    for stage in summary["stages"]:
        del stage["sha256"]  # as srdata wrote it before checksums
    (out / "curriculum.json").write_text(json.dumps(summary))
    assert [p.name for p in verified_stage_files(out)] == ["stage-0.parquet", "stage-1.parquet", "stage-2.parquet"]
    assert "records no checksum" in caplog.text and "export again" in caplog.text
    summary["stages"][1]["rows"] += 1
    (out / "curriculum.json").write_text(json.dumps(summary))
    with pytest.raises(CurriculumIntegrityError, match="holds 20 rows, but curriculum.json lists 21"):
        verified_stage_files(out)


def test_a_run_replaced_while_export_reads_it_is_refused(run: Path, tmp_path: Path, monkeypatch):
    import srdata.curriculum.export as export

    copy = make_run(tmp_path / "run", 42, invalid_ids=[0, 41])
    encode = export.encode_stages

    def rank_meanwhile(*args, **kwargs):
        rerank_run(copy, ties="reference")  # replaces annotated.parquet, as a concurrent `srdata rank` does
        return encode(*args, **kwargs)

    monkeypatch.setattr(export, "encode_stages", rank_meanwhile)
    with pytest.raises(CurriculumError, match="was replaced while this export read it"):
        export_curriculum(copy, out=tmp_path / "out")
    assert contents(tmp_path / "out") == {}


# --- the user's files ----------------------------------------------------------------------


def test_a_folder_holding_other_files_is_refused_untouched(run: Path, tmp_path: Path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "stage-3.parquet").write_bytes(b"my own stage file")
    (folder / ".tmp-42-annotated.parquet").write_bytes(b"named like an old temp file")
    (folder / f".tmp-srdata-{HOST_TAG}-{dead_pid()}-x.parquet").write_bytes(b"even a marked temp")
    before = sorted(os.listdir(folder)), contents(folder)
    assert_clean_error(invoke("export", run, "--out", folder), str(folder), "no srdata export", "nothing in it was changed")
    assert (sorted(os.listdir(folder)), contents(folder)) == before  # not even a lock file was added
    # The default RUN/curriculum is no different.
    default = make_run(tmp_path / "run", 42)
    (default / "curriculum").mkdir()
    (default / "curriculum" / "stage-0.parquet").write_bytes(b"mine")
    assert_clean_error(invoke("export", default), str(default / "curriculum"), "no srdata export")
    assert contents(default / "curriculum") == {"stage-0.parquet": b"mine"}


def test_an_empty_existing_folder_is_used(run: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert invoke("export", run, "--out", tmp_path / "empty").exit_code == 0
    assert verified_curriculum(tmp_path / "empty").summary["settings"]["keep"] == 3


def test_reexport_replaces_only_the_files_its_export_wrote(run: Path, tmp_path: Path):
    out = export_curriculum(run, stages=4, keep=4, out=tmp_path / "out")
    mine = {"notes.txt": b"my notes", "stage-9.parquet": b"my stage 9", "stage-5.jsonl": b"my jsonl", "stage-1.json": b"x"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    export_curriculum(run, stages=4, keep=2, out=out, overwrite=True)  # stage-2, stage-3 are the earlier export's: they go
    assert sorted(contents(out)) == sorted(["curriculum.json", "stage-0.parquet", "stage-1.parquet", *mine])
    assert {name: (out / name).read_bytes() for name in mine} == mine
    export_curriculum(run, stages=4, keep=2, fmt="jsonl", out=out, overwrite=True)  # another format: the parquet files go
    assert sorted(contents(out)) == sorted(["curriculum.json", "stage-0.jsonl", "stage-1.jsonl", *mine])
    # An export whose stage-5.jsonl would replace the user's is refused before anything changes.
    before = contents(out)
    with pytest.raises(CurriculumError, match=r"holds stage-5.jsonl, which its earlier export did not write"):
        export_curriculum(run, stages=8, keep=8, fmt="jsonl", out=out)
    assert contents(out) == before
    assert len(verified_stage_files(out)) == 2


def test_a_crafted_curriculum_json_cannot_make_export_delete_other_files(run: Path, tmp_path: Path):
    out = export_curriculum(run, out=tmp_path / "out")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "notes.txt").write_text("keep me too")
    summary = json.loads((out / "curriculum.json").read_text())
    summary["stages"].append({**summary["stages"][0], "stage": 7, "file": "../victim.txt"})
    summary["stages"].append({**summary["stages"][0], "stage": 8, "file": "notes.txt"})
    (out / "curriculum.json").write_text(json.dumps(summary))
    export_curriculum(run, stages=2, keep=1, out=out, overwrite=True)
    assert victim.read_text() == "keep me" and (out / "notes.txt").read_text() == "keep me too"


def test_an_export_interrupted_while_publishing_is_refused_and_reruns_clean(run: Path, tmp_path: Path, monkeypatch):
    import srdata.curriculum.output as output

    out = export_curriculum(run, stages=4, keep=4, out=tmp_path / "out")
    real_publish, moved = output.publish, []

    def die_after_one(temp, final):
        if moved:
            raise KeyboardInterrupt  # as a kill between two renames
        moved.append(final)
        real_publish(temp, final)

    monkeypatch.setattr(output, "publish", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        export_curriculum(run, stages=4, keep=2, rrf_k=3, out=out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(CurriculumIntegrityError, match="interrupted while it replaced its files"):
        verified_curriculum(out)
    export_curriculum(run, stages=4, keep=2, out=out)
    assert sorted(contents(out)) == ["curriculum.json", "stage-0.parquet", "stage-1.parquet"]
    assert len(verified_stage_files(out)) == 2


# --- one writer per folder ------------------------------------------------------------------


def start_together(tmp_path: Path, *commands: list[str]) -> list[subprocess.Popen]:
    start_line = tmp_path / f"start-{time.monotonic_ns()}"
    processes = [
        subprocess.Popen([sys.executable, "-c", STARTER, str(start_line), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    time.sleep(2.5)  # both have imported srdata and wait on the start line
    start_line.touch()
    return processes


def assert_one_export(out: Path, stages: int, keep: int) -> None:
    """The folder holds exactly one export, whole: the given one's files and nothing else."""
    curriculum = verified_curriculum(out)
    assert (curriculum.summary["settings"]["stages"], curriculum.summary["settings"]["keep"]) == (stages, keep)
    assert sorted(contents(out)) == sorted(["curriculum.json", *(f"stage-{s}.parquet" for s in range(keep))])


SETTINGS = [(4, 3), (5, 4)]


def export_args(run: Path, out: Path, stages: int, keep: int) -> list[str]:
    return ["export", str(run), "--out", str(out), "--stages", str(stages), "--keep", str(keep)]


def test_two_exports_started_together_into_one_folder(big_run: Path, tmp_path: Path):
    refused = 0
    for attempt in range(3):  # the scheduler could still run them one after the other: then both succeed
        out = tmp_path / f"out-{attempt}"
        processes = start_together(tmp_path, *(export_args(big_run, out, *s) for s in SETTINGS))
        results = [(p.wait(timeout=120), *p.communicate()) for p in processes]
        codes = [code for code, _, _ in results]
        assert "Traceback" not in "".join(err for _, _, err in results)
        if sorted(codes) == [0, 1]:
            refused += 1
            winner = codes.index(0)
            message = results[1 - winner][2]
            assert f"{out} is in use by another process (" in message, message
            # The holder is named, unless the refusal came in the microseconds before the winner wrote its name.
            assert f"(srdata export, PID {processes[winner].pid} on " in message or "not readable yet" in message, message
            assert_one_export(out, *SETTINGS[winner])
            load_curriculum(out, cache_dir=str(tmp_path / "cache"))
            break
        assert codes == [0, 0], results
        curriculum = verified_curriculum(out)  # one after the other: the later one's export, whole
        assert_one_export(out, curriculum.summary["settings"]["stages"], curriculum.summary["settings"]["keep"])
    assert refused, "the two exports never overlapped"


@pytest.mark.parametrize("kill_after", [0.05, 0.25, 0.6])
def test_kill_one_of_two_exports_started_together(big_run: Path, tmp_path: Path, kill_after: float):
    out = tmp_path / "out"
    victim = int(kill_after * 100) % 2  # which of the two is killed changes with the timing
    processes = start_together(tmp_path, *(export_args(big_run, out, *s) for s in SETTINGS))
    time.sleep(kill_after)
    processes[victim].send_signal(signal.SIGKILL)
    for process in processes:
        process.wait(timeout=120)
        assert "Traceback" not in process.communicate()[1]
    survivor = processes[1 - victim]
    try:  # whatever the timing: one export, whole (every file checked against its checksum) ...
        curriculum = verified_curriculum(out)
        assert (curriculum.summary["settings"]["stages"], curriculum.summary["settings"]["keep"]) in SETTINGS
        if survivor.returncode == 0 and processes[victim].returncode != 0:
            # ... the survivor's, unless the victim only started once the survivor had finished
            assert curriculum.summary["settings"]["keep"] == SETTINGS[1 - victim][1] or processes[victim].returncode == -signal.SIGKILL
    except CurriculumIntegrityError as err:  # ... or one killed while it replaced its files, refused as such
        assert "interrupted while it replaced its files" in str(err)
    except FileNotFoundError:  # ... or none: killed before it published anything, and the other one refused
        assert survivor.returncode == 1
    # The survivor's command, run again, leaves its export and nothing else (the killed one's temp files are gone).
    # --overwrite: where the victim finished first, the folder holds a whole export cut otherwise (refused without it).
    assert invoke(*export_args(big_run, out, *SETTINGS[1 - victim]), "--overwrite").exit_code == 0
    assert_one_export(out, *SETTINGS[1 - victim])


@contextmanager
def held_by_another_process(folder: Path, command: str) -> Iterator[subprocess.Popen]:
    """A real second process holding ``folder``'s lock as ``command`` while the block runs; killed after it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from srdata.run.io import FolderLock\n"
         f"with FolderLock({str(folder)!r}, {command!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_rank_is_refused_while_score_holds_the_run(tmp_path: Path):
    run = make_run(tmp_path / "run", 42)
    with held_by_another_process(run, "srdata score") as holder:
        before = contents(run)
        assert_clean_error(invoke("rank", run, "--ties", "reference"), f"{run} is in use by another process (srdata score, PID {holder.pid}")
        assert contents(run) == before
    assert invoke("rank", run, "--ties", "reference").exit_code == 0  # the kernel dropped the killed holder's lock


def test_report_locks_its_folder(run: Path, tmp_path: Path):
    report = tmp_path / "report"
    with held_by_another_process(report, "srdata report"):
        assert_clean_error(invoke("report", run, "--out", report), f"{report} is in use by another process (srdata report")
        assert contents(report) == {}


def test_rank_removes_the_temp_file_of_a_killed_rank(tmp_path: Path):
    run = make_run(tmp_path / "run", 42)
    stale = run / f".tmp-srdata-{HOST_TAG}-{dead_pid()}-annotated.parquet"  # what a rank killed mid-write leaves
    stale.write_bytes(b"half a parquet file")
    foreign = run / ".tmp-42-annotated.parquet"  # not marked as srdata's: never removed
    foreign.write_bytes(b"someone else's")
    assert invoke("rank", run, "--ties", "reference").exit_code == 0
    assert not stale.exists() and foreign.read_bytes() == b"someone else's"


# --- full disk, read-only run ------------------------------------------------------------------


def fill(disk: Path, leave_kib: int) -> None:
    """Fill a small disk but for ``leave_kib``, with a file of the test's own (kept, like every other file)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave_kib * 1024, 0))


def test_export_on_a_full_disk(run: Path, small_disk):
    disk = small_disk(4096)
    out = disk / "curriculum"
    assert invoke("export", run, "--out", out).exit_code == 0
    fill(disk, 24)  # room for a little, not for a second export's stage files
    before = contents(out)
    result = invoke("export", run, "--out", out, "--format", "jsonl", "--stages", "2", "--keep", "2", "--overwrite")
    assert_clean_error(result, "could not write", str(out), "no space left on the device")
    assert contents(out) == before  # the earlier export whole, no temp file left
    assert len(verified_stage_files(out)) == 3


def test_rank_on_a_full_disk_and_on_a_read_only_run(tmp_path: Path, small_disk):
    disk = small_disk(4096)
    run = make_run(disk / "run", 2_000, shard_size=2_000)
    fill(disk, 16)  # the run is there; a second annotated.parquet does not fit
    before = contents(run)
    assert_clean_error(invoke("rank", run, "--ties", "reference"), f"{run / 'annotated.parquet'}", "no space left on the device")
    assert contents(run) == before
    (disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert_clean_error(invoke("rank", run, "--ties", "reference"), f"run folder {run} is not writable", "Copy the run folder")
    assert contents(run) == before


def test_report_on_a_full_disk_keeps_the_earlier_report_whole(run: Path, small_disk):
    from PIL import Image

    disk = small_disk(4096)
    out = disk / "report"
    assert invoke("report", run, "--out", out).exit_code == 0
    fill(disk, 48)  # a report's figures and pages need more than that
    before = contents(out)
    assert_clean_error(invoke("report", run, "--out", out, "--examples", "2"), "could not write", "no space left on the device")
    assert contents(out) == before  # no truncated PNG, no temp file
    for name in ("score_histograms.png", "scores_by_stage.png", "stage_sizes.png"):
        Image.open(out / name).verify()
