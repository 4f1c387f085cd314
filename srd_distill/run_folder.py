"""The run folder of ``srd-distill``: ``run.json``, ``metrics.jsonl``, checkpoints, resume, and what is guaranteed.

Layout::

    RUN/run.json                 settings, input fingerprints, schedule, encoding, dtypes, versions, finished stages, status
    RUN/metrics.jsonl            one JSON object per logged step and per evaluation
    RUN/stage-N/                 the student after stage N (appears by an atomic rename: always complete, sealed)
    RUN/.stage-N.partial/        stage N's checkpoint being written
    RUN/.stage-N.step-K/         the resumable state of stage N after K optimizer steps (only the latest is kept)
    RUN/.srdata.lock             the lock of the one writer (see below)

``run.json`` and each stage's ``srd_stage.json`` are typed records (:mod:`srd_distill.records`).

Guarantees:

* **One writer per folder.** ``srd-distill train`` holds ``FolderLock(RUN)`` from before it
  reads ``run.json`` until it ends; a second train on the same ``--output`` is refused at
  once, naming the holder (PID, host, since when). A killed process releases it.
* **Content identity of the inputs.** ``run.json`` records fingerprints of the teacher, the
  student, the curriculum's stage files (or the ``--data`` file), the eval file, a schedule
  file, the teacher's cached top-K (``--teacher-logits``) and the encoding (:mod:`srd_distill.inputs`); a rerun refuses to resume when one
  changed, naming it, as it refuses other settings.
* **Checksums.** Every checkpoint folder is sealed with the SHA-256 of each of its files,
  written last (:mod:`srd_distill.checkpoints`), and verified before it is used: a
  finished stage on resume or as the next stage's starting weights, a step checkpoint
  before it is resumed. A curriculum's stage files are checked against ``curriculum.json``
  when the run is planned and again before each stage reads its file.
* **Nothing half-written.** Files are written to temp names and renamed; checkpoints are
  written under hidden names and renamed when sealed. A full disk is a clear error naming
  the file; the checkpoints before it stay intact, and a rerun resumes.
* **Never deleted, unless provably ours.** Only ``run.json``, ``metrics.jsonl`` of a
  folder recognised as an srd-distill run, and checkpoint folders that carry
  srd-distill's marker file (written first into every folder it creates) are ever removed.
  An ``--output`` that is a file, or a non-empty folder holding no srd-distill run, is
  refused before anything is touched, ``--overwrite`` or not.
* **Resumable steps.** Every ``--checkpoint-interval`` optimizer steps, the model, the
  AdamW state, the RNG states, the data position (epoch, shuffled order, next batch), the
  best-epoch weights so far and the count of metrics lines are saved as a step
  checkpoint; a rerun continues from it with the same weights and metrics lines as a run
  that was never stopped.

``metrics.jsonl`` keys: ``event`` (``"train"`` per logged step, ``"eval"`` per evaluation),
``stage, epoch, step`` (optimizer steps done in the stage), ``global_step, loss, kd_loss``
(T^2 factor included), ``kd_unscaled`` (without it), ``t2_factor, ce_loss, lr,
temperature, kd_ratio, elapsed`` (seconds since the run began, across resumes); train rows
add ``grad_norm`` and ``tokens``, eval rows ``eval_rouge_l`` and ``best``. Train-row
losses are token-weighted means over the steps since the previous train row.

A rerun resumes after the last finished stage (from the step checkpoint of the next one,
if any); settings that change results must match (:data:`RESUMABLE_WITH_OTHER_VALUES` may
differ), by the one settings-diff rule of :func:`srdata.run.folder.diff_settings`.

Example:
    >>> stage_folder(Path("runs/kd"), 2)
    PosixPath('runs/kd/stage-2')
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from srd_distill.checkpoints import MARKER_FILE, is_our_checkpoint, publish_checkpoint, remove_checkpoint, verify_checkpoint
from srd_distill.errors import RunFolderError
from srd_distill.inputs import diff_inputs
from srd_distill.records import RunRecord, StageRecord, StepState
from srd_distill.remote_publish import publish_run_files, publish_stage
from srd_distill.schedules import PRESETS
from srd_distill.settings import TrainSettings
from srdata.config import resumable_settings
from srdata.run import folder as run_folder
from srdata.run.io import LOCK_FILE, FolderLock, atomic_path, is_tool_file, write_json_atomic
from srdata.run.storage import local_path, shown

__all__ = [
    "RUN_FILE", "METRICS_FILE", "STAGE_INFO_FILE", "RESUMABLE_WITH_OTHER_VALUES", "STEP_STATE_FILE", "stage_folder",
    "partial_folder", "step_folder", "step_folders", "is_finished", "ResumePoint", "check_output_folder",
    "prepare_run_folder", "MetricsLog", "recorded_settings", "finish_stage", "read_stage_record", "read_run_record",
    "write_run_record", "steps_done", "utc_now", "package_versions",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STAGE_INFO_FILE = "srd_stage.json"
STEP_STATE_FILE = "state.json"  # in a step checkpoint: position, counters, metrics lines so far
TOOL = "srd-distill"
FORMAT_VERSION = 2  # 2: checksummed checkpoints, input fingerprints, step checkpoints
# Settings that change speed, memory or logging but not the trained weights, so that a run may be
# resumed with other values of them: declared on TrainSettings' fields (srdata.config.RESUMABLE).
RESUMABLE_WITH_OTHER_VALUES = frozenset(path[-1] for path in resumable_settings(TrainSettings))  # run.json: flat names
STAGE_FOLDER_PATTERN = re.compile(r"stage-\d+")
STEP_FOLDER_PATTERN = re.compile(r"\.stage-(?P<stage>\d+)\.step-(?P<step>\d+)")
# Every checkpoint folder name this tool writes (finished, partial, step, step being written).
OUR_NAME_PATTERN = re.compile(r"stage-\d+|\.stage-\d+\.partial|\.stage-\d+\.step-\d+(\.partial)?")


def stage_folder(run_dir: Path, stage: int) -> Path:
    """Where stage ``stage``'s finished checkpoint lives (see the module docstring)."""
    return run_dir / f"stage-{stage}"


def partial_folder(run_dir: Path, stage: int) -> Path:
    """Where stage ``stage``'s checkpoint is written before it is finished."""
    return run_dir / f".stage-{stage}.partial"


def step_folder(run_dir: Path, stage: int, step: int) -> Path:
    """Where the step checkpoint of stage ``stage`` after ``step`` optimizer steps lives.

    Example:
        >>> step_folder(Path("runs/kd"), 1, 500).name
        '.stage-1.step-500'
    """
    return run_dir / f".stage-{stage}.step-{step}"


def step_folders(run_dir: Path, stage: int | None = None) -> list[tuple[int, int, Path]]:
    """The published step checkpoints in ``run_dir`` (of one stage, or all) as (stage, step, folder), oldest first."""
    found = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        match = STEP_FOLDER_PATTERN.fullmatch(entry.name)
        if match and (stage is None or int(match["stage"]) == stage):
            found.append((int(match["stage"]), int(match["step"]), entry))
    return sorted(found)


def is_finished(run_dir: Path, stage: int) -> bool:
    """A stage is finished when its folder exists: it only appears by an atomic rename of a sealed checkpoint."""
    return stage_folder(run_dir, stage).is_dir()


def finish_stage(run_dir: Path, stage: int, record: StageRecord) -> Path:
    """Write ``srd_stage.json`` into the partial checkpoint, seal it and rename it to ``stage-N``; return that folder.

    The stage is finished the moment the rename lands; its step checkpoints are then removed.
    """
    write_json_atomic(partial_folder(run_dir, stage) / STAGE_INFO_FILE, record.to_json())
    done = stage_folder(run_dir, stage)
    publish_checkpoint(partial_folder(run_dir, stage), done)
    publish_stage(run_dir, done)  # --output s3://...: uploaded, its checksum file last (srd_distill.remote)
    for _, _, folder in step_folders(run_dir, stage):
        remove_checkpoint(folder)
    return done


def read_stage_record(run_dir: Path, stage: int) -> StageRecord:
    """The ``srd_stage.json`` of a finished stage (verified with its checkpoint before it is read)."""
    return StageRecord.read(stage_folder(run_dir, stage) / STAGE_INFO_FILE)


def read_run_record(run_dir: Path) -> Optional[RunRecord]:
    """The run's ``run.json``; None when there is none yet; a damaged one is refused, named.

    Example:
        >>> read_run_record(Path("no/such/run")) is None
        True
    """
    raw = read_run_json(run_dir)
    try:
        return RunRecord.model_validate(raw) if raw else None
    except ValueError as err:  # pydantic's ValidationError: a field of another type than srd-distill writes
        raise _damaged(run_dir / RUN_FILE, err) from None


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """``run.json`` as a plain dict (empty when there is none), before it is judged to be srd-distill's."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not an object")
    except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, err) from None
    return record


def _damaged(path: Path, err: Exception) -> RunFolderError:
    return RunFolderError(
        f"{path} is not readable ({type(err).__name__}: {err}): it was cut short or damaged, so the run cannot be "
        f"resumed safely; pass --overwrite to start over (it removes only what srd-distill wrote there) or choose "
        "another --output"
    )


def write_run_record(run_dir: Path, record: RunRecord, status: str) -> None:
    """Write ``run.json`` atomically with ``status`` (running, stopped, interrupted, complete) and the time."""
    record.tool, record.format_version, record.status, record.updated_at = TOOL, FORMAT_VERSION, status, utc_now()
    write_json_atomic(run_dir / RUN_FILE, record.to_json())
    publish_run_files(run_dir, [METRICS_FILE, RUN_FILE])  # --output s3://...: run.json last, the commit


@dataclass
class ResumePoint:
    """Where a run continues: its finished stages, the step checkpoint of the next stage (if any), the time so far."""

    finished: set[int]
    elapsed: float
    step_checkpoint: Optional[Path] = None  # verified; of the first unfinished stage
    metrics_lines: int = 0  # lines of that stage in metrics.jsonl that its step checkpoint covers


def check_output_folder(run_dir: Path, *, overwrite: bool, locked: bool = False) -> None:
    """Refuse an ``--output`` that cannot hold this run; before the lock (``locked=False``) nothing is written.

    Refused at once: a file; a non-empty folder that holds no srd-distill run (whatever
    ``overwrite`` says: nothing in it was written by this tool); a folder another train
    holds. Refused under the lock (``locked=True``), when no other writer can be changing
    the folder: a run whose ``run.json`` is damaged, lacks checksums (an older srd-distill)
    or is missing while checkpoints remain, unless ``overwrite``; a checkpoint-like name
    srd-distill did not write, ``overwrite`` or not.

    Example:
        >>> check_output_folder(Path("runs/new-run"), overwrite=False)
    """
    run_dir = local_path(run_dir, "--output")  # a URI that lost a slash (Path("s3://b") is "s3:/b"): refused, named
    if run_dir.is_symlink() and not run_dir.is_dir() or run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--output {run_dir} is a file, not a folder; choose a new folder (or an srd-distill run folder)")
    if not run_dir.is_dir():
        return
    if not locked and (run_dir / LOCK_FILE).is_file():
        # Another train may be changing the folder right now: ask its lock first (it adds no file).
        FolderLock(run_dir, f"{TOOL} train").acquire().release()
    try:
        record: Optional[dict[str, Any]] = read_run_json(run_dir)
        damaged = None
    except RunFolderError as err:
        record, damaged = None, err
    ours = our_checkpoints(run_dir)
    # A readable run.json decides (another tool's is foreign, whatever else is there); without
    # one, srd-distill's marked checkpoints show the folder is a run of ours.
    is_run = is_run_record(record) if record else bool(ours)
    if not is_run:
        foreign = sorted(e.name for e in run_dir.iterdir() if not is_tool_file(e.name))
        if damaged is not None:
            raise damaged if not overwrite else RunFolderError(
                f"{run_dir / RUN_FILE} is damaged and {run_dir} holds no checkpoint of srd-distill, so nothing shows the "
                "folder is an srd-distill run: nothing was removed. Move the folder's files away or choose another --output")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise RunFolderError(
                f"--output {run_dir} is not empty and holds no srd-distill run ({shown}); nothing was touched. "
                "Choose a new or empty folder"
            )
        return
    if not locked:
        return
    for entry in run_dir.iterdir():
        if OUR_NAME_PATTERN.fullmatch(entry.name) and entry not in ours:
            raise RunFolderError(
                f"{entry} was not written by srd-distill (it holds no {MARKER_FILE}) but has the name of a checkpoint "
                f"of this run; move it out of {run_dir} or choose another --output"
            )
    if overwrite:
        return
    if damaged is not None:
        raise damaged
    if not record:
        raise RunFolderError(
            f"{run_dir} holds checkpoints of srd-distill but no {RUN_FILE}, so it cannot be resumed safely; "
            "choose another --output or pass --overwrite to start over"
        )
    if int(record.get("format_version", 1)) < FORMAT_VERSION:
        raise RunFolderError(
            f"{run_dir} holds a run written by an older srd-distill, which recorded no checksums of its checkpoints and no "
            "fingerprints of its inputs, so it cannot be resumed safely; pass --overwrite to start over or choose another --output"
        )


def remove_empty_leftovers(run_dir: Path) -> None:
    """Remove empty folders named like a partial or step checkpoint: a kill between creating one and writing its
    marker leaves them (``rmdir`` removes only an empty folder, so nothing of anyone's is lost)."""
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        if OUR_NAME_PATTERN.fullmatch(entry.name) and entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
            try:
                entry.rmdir()
            except OSError:
                pass  # not empty: it is judged as any other folder


def is_run_record(record: dict[str, Any]) -> bool:
    """Whether a parsed ``run.json`` is srd-distill's (an older one carries no ``tool`` key but its settings and schedule)."""
    return record.get("tool") == TOOL or isinstance(record.get("settings"), dict) and "schedule" in record


def our_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders in ``run_dir`` that srd-distill provably wrote (named as ours and marked)."""
    return [e for e in run_dir.iterdir() if OUR_NAME_PATTERN.fullmatch(e.name) and is_our_checkpoint(e)]


def prepare_run_folder(
    run_dir: Path,
    settings: dict[str, Any],
    inputs: dict[str, Any],
    n_stages: int,
    *,
    overwrite: bool,
    defaults: dict[str, Any],
    echo: Callable[[str], None],
) -> ResumePoint:
    """Check or create the run folder (its lock held); return where the run continues.

    Refuses a folder holding a run with other (result-changing) ``settings`` or other
    ``inputs`` (by content) unless ``overwrite``; ``defaults`` stand in for settings an
    older ``run.json`` lacks. Finished stages and the step checkpoint to resume from are
    verified against their checksums. Cleans what an interrupted stage left (its partial
    and older step checkpoints, its metrics lines after the step checkpoint), removing only
    folders srd-distill marked as its own: an ``--overwrite`` never touches anything else.

    Example:
        >>> point = prepare_run_folder(Path("runs/kd"), settings, inputs, 3, overwrite=False,
        ...                            defaults={}, echo=print)   # doctest: +SKIP
    """
    remove_empty_leftovers(run_dir)
    check_output_folder(run_dir, overwrite=overwrite, locked=True)
    if overwrite and run_dir.is_dir():
        # check_output_folder refused any folder that is not a run of ours: its run.json (read
        # as srd-distill's, or damaged beside marked checkpoints) and metrics are ours to remove.
        for folder in our_checkpoints(run_dir):
            remove_checkpoint(folder)
        for name in (RUN_FILE, METRICS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    previous = read_run_record(run_dir)
    if previous is not None:
        differences = run_folder.diff_settings(previous.settings, settings, ignore=RESUMABLE_WITH_OTHER_VALUES,
                                               defaults=defaults)
        if differences:
            raise RunFolderError(
                f"{run_dir} holds a run with other settings:\n  " + "\n  ".join(differences)
                + "\nrerun with the same settings to resume it, choose another --output, or pass --overwrite to start over"
            )
        changed = diff_inputs(previous.inputs, inputs)
        if changed:
            raise RunFolderError(
                f"{run_dir} holds a run trained on other inputs:\n  " + "\n  ".join(changed)
                + "\nrestore the run's inputs to resume it, choose another --output, or pass --overwrite to start over"
            )
    run_dir.mkdir(parents=True, exist_ok=True)

    finished = {s for s in range(n_stages) if is_finished(run_dir, s)}
    # Resume continues after the last finished stage; a later stage folder without its
    # predecessors (copied in by hand) would break the chain of weights.
    first_unfinished = next((s for s in range(n_stages) if s not in finished), n_stages)
    finished = {s for s in finished if s < first_unfinished}
    for s in sorted(finished):
        verify_checkpoint(stage_folder(run_dir, s), fix=f"move {stage_folder(run_dir, s)} away and run the same command "
                          f"again to retrain stage {s} (and the stages after it), or pass --overwrite to start over")
    resume_from = latest_step_checkpoint(run_dir, first_unfinished)
    for folder in our_checkpoints(run_dir):
        keep = folder == resume_from or folder.name in {stage_folder(run_dir, s).name for s in finished}
        if not keep:
            # A partial checkpoint, an older step checkpoint, or a stage folder after the first
            # unfinished stage: that one grew from weights about to be retrained.
            if STAGE_FOLDER_PATTERN.fullmatch(folder.name):
                echo(f"removing {folder}: stage {first_unfinished} before it is not finished")
            remove_checkpoint(folder)
    lines = 0
    if resume_from is not None:
        lines = StepState.read(resume_from / STEP_STATE_FILE).metrics_lines
    elapsed = keep_metrics_of(run_dir / METRICS_FILE, finished, first_unfinished, lines)
    if finished:
        echo(f"resuming {run_dir}: stage(s) {', '.join(map(str, sorted(finished)))} already finished")
    if resume_from is not None:
        echo(f"resuming stage {first_unfinished} from its step checkpoint {resume_from}")
    return ResumePoint(finished, elapsed, resume_from, lines)


def latest_step_checkpoint(run_dir: Path, stage: int) -> Optional[Path]:
    """The newest step checkpoint of ``stage``, verified against its checksums; None when there is none."""
    found = step_folders(run_dir, stage)
    if not found:
        return None
    folder = found[-1][2]
    verify_checkpoint(folder, fix=f"move {folder} away to restart stage {stage} from its beginning, or pass --overwrite to start over")
    return folder


def keep_metrics_of(metrics_path: Path, finished: set[int], resumed: Optional[int] = None, resumed_lines: int = 0) -> float:
    """Drop metrics lines that will be redone; return the last elapsed time kept.

    Kept: every line of the ``finished`` stages, and the first ``resumed_lines`` lines of
    stage ``resumed`` (those written before its step checkpoint).
    """
    if not metrics_path.is_file():
        return 0.0
    kept = []
    seen = 0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("stage") in finished:
            kept.append(record)
        elif record.get("stage") == resumed and seen < resumed_lines:
            kept.append(record)
            seen += 1
    with atomic_path(metrics_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return max((float(r.get("elapsed", 0.0)) for r in kept), default=0.0)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once, with the run's ``elapsed`` seconds.

    Example:
        >>> log = MetricsLog(Path("runs/kd/metrics.jsonl"), elapsed_before=0.0)   # doctest: +SKIP
        >>> log.write({"event": "train", "step": 1, "loss": 2.5})                 # doctest: +SKIP
    """

    def __init__(self, path: Path, elapsed_before: float, lines: Optional[dict[int, int]] = None) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.started = time.perf_counter() - elapsed_before
        self.lines: dict[int, int] = dict(lines or {})  # lines written per stage (a step checkpoint records them)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "elapsed": round(self.elapsed(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines[record.get("stage", -1)] = self.lines.get(record.get("stage", -1), 0) + 1

    def close(self) -> None:
        self.file.close()


def recorded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as recorded in run.json: local paths made absolute, so a resume from another cwd matches.

    Example:
        >>> recorded_settings({"output": "/runs/kd", "schedule": "paper-gpt2", "teacher": "hub/teacher"})
        {'output': '/runs/kd', 'schedule': 'paper-gpt2', 'teacher': 'hub/teacher'}
    """
    values = dict(settings)
    values["output"] = shown(Path(values["output"]).resolve())  # a staging folder of s3://...: its URI
    for key in ("teacher", "teacher_logits", "student", "curriculum", "data", "eval_file"):
        if values.get(key) is not None and Path(values[key]).exists():
            values[key] = shown(Path(values[key]).resolve())
    if values["schedule"] not in PRESETS and Path(values["schedule"]).exists():
        values["schedule"] = str(Path(values["schedule"]).resolve())
    return values


def steps_done(records: Sequence[StageRecord]) -> int:
    """Optimizer steps of the finished stages (``run.json``'s ``stages_finished``)."""
    return sum(r.steps for r in records)


def utc_now() -> str:
    """The time now, as run.json records it (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, for run.json."""
    versions = {}
    for name in ("srdata", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def __getattr__(name: str) -> Any:
    if name == "read_stage_info":  # the old reader, returning the record as a dict
        warnings.warn("srd_distill.run_folder.read_stage_info is deprecated; use read_stage_record (a StageRecord)",
                      DeprecationWarning, stacklevel=2)
        return lambda run_dir, stage: read_stage_record(run_dir, stage).to_json()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
