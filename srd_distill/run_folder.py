"""The run folder of ``srd-distill``: ``run.json``, ``metrics.jsonl``, stage checkpoints, resume.

Layout::

    RUN/run.json            settings, schedule, encoding, dtypes, versions, finished stages, status
    RUN/metrics.jsonl       one JSON object per logged step and per evaluation
    RUN/stage-N/            the student after stage N (appears by an atomic rename: always complete)
    RUN/.stage-N.partial/   stage N being written; removed on resume

``metrics.jsonl`` keys: ``event`` (``"train"`` per logged step, ``"eval"`` per evaluation),
``stage, epoch, step`` (optimizer steps done in the stage), ``global_step, loss, kd_loss``
(T^2 factor included), ``kd_unscaled`` (without it), ``t2_factor, ce_loss, lr,
temperature, kd_ratio, elapsed`` (seconds since the run began, across resumes); train rows
add ``grad_norm`` and ``tokens``, eval rows ``eval_rouge_l`` and ``best``. Train-row
losses are token-weighted means over the steps since the previous train row.

A rerun resumes after the last finished stage; settings that change results must match
(:data:`RESUMABLE_WITH_OTHER_VALUES` may differ), by the one settings-diff rule of
:func:`srdata.run.folder.diff_settings`.

Example:
    >>> stage_folder(Path("runs/kd"), 2)
    PosixPath('runs/kd/stage-2')
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from srd_distill.errors import RunFolderError
from srd_distill.schedules import PRESETS
from srdata.run import folder as run_folder
from srdata.run.io import atomic_path, write_json_atomic

__all__ = [
    "RUN_FILE",
    "METRICS_FILE",
    "STAGE_INFO_FILE",
    "RESUMABLE_WITH_OTHER_VALUES",
    "stage_folder",
    "partial_folder",
    "is_finished",
    "prepare_run_folder",
    "MetricsLog",
    "recorded_settings",
    "finish_stage",
    "read_stage_info",
    "read_run_record",
    "write_run_record",
    "steps_done",
    "utc_now",
    "package_versions",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STAGE_INFO_FILE = "srd_stage.json"
# Settings that change speed, memory or logging but not the trained weights: a run may be
# resumed with other values of these. (grad_accum only splits a step into micro-batches;
# the loss of a step is the same token mean either way.)
# fused_head and gradient_checkpointing likewise change the arithmetic's order, not the step.
RESUMABLE_WITH_OTHER_VALUES = frozenset({"device", "grad_accum", "log_every", "stop_after_stage", "overwrite", "output",
                                         "fused_head", "gradient_checkpointing", "micro_batch_tokens"})
STAGE_FOLDER_PATTERN = re.compile(r"stage-\d+")
PARTIAL_FOLDER_PATTERN = re.compile(r"\.stage-\d+\.partial")


def stage_folder(run_dir: Path, stage: int) -> Path:
    """Where stage ``stage``'s finished checkpoint lives (see the module docstring)."""
    return run_dir / f"stage-{stage}"


def partial_folder(run_dir: Path, stage: int) -> Path:
    """Where stage ``stage``'s checkpoint is written before it is finished."""
    return run_dir / f".stage-{stage}.partial"


def is_finished(run_dir: Path, stage: int) -> bool:
    """A stage is finished when its folder exists: it only appears by an atomic rename."""
    return (stage_folder(run_dir, stage) / STAGE_INFO_FILE).is_file()


def finish_stage(run_dir: Path, stage: int, info: dict[str, Any]) -> Path:
    """Write ``srd_stage.json`` into the partial checkpoint and rename it to ``stage-N``; return that folder.

    The stage is finished the moment the rename lands.
    """
    write_json_atomic(partial_folder(run_dir, stage) / STAGE_INFO_FILE, info)
    done = stage_folder(run_dir, stage)
    partial_folder(run_dir, stage).replace(done)
    return done


def read_stage_info(run_dir: Path, stage: int) -> dict[str, Any]:
    """The ``srd_stage.json`` of a finished stage."""
    return json.loads((stage_folder(run_dir, stage) / STAGE_INFO_FILE).read_text(encoding="utf-8"))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json`` as a dict; empty when there is none yet."""
    path = run_dir / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_run_record(run_dir: Path, record: dict[str, Any], status: str) -> None:
    """Write ``run.json`` atomically with ``status`` (running, stopped, interrupted, complete) and the time."""
    record.update(status=status, updated_at=utc_now())
    write_json_atomic(run_dir / RUN_FILE, record)


def prepare_run_folder(
    run_dir: Path,
    settings: dict[str, Any],
    n_stages: int,
    *,
    overwrite: bool,
    defaults: dict[str, Any],
    echo: Callable[[str], None],
) -> tuple[set[int], float]:
    """Check or create the run folder; return the finished stages and the elapsed time so far.

    Refuses a folder holding a run with other (result-changing) ``settings`` unless
    ``overwrite``; ``defaults`` stand in for settings an older ``run.json`` lacks. Cleans
    what an interrupted stage left: its partial checkpoint folder and its metrics lines.

    Example:
        >>> finished, elapsed = prepare_run_folder(Path("runs/kd"), settings, 3, overwrite=False,
        ...                                        defaults={}, echo=print)   # doctest: +SKIP
    """
    # Only names this module writes: an --overwrite never touches anything else in the folder.
    ours = [run_dir / RUN_FILE, run_dir / METRICS_FILE]
    if run_dir.is_dir():
        ours += [p for p in run_dir.iterdir() if p.is_dir() and (STAGE_FOLDER_PATTERN.fullmatch(p.name) or PARTIAL_FOLDER_PATTERN.fullmatch(p.name))]
    previous_path = run_dir / RUN_FILE
    if overwrite:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif previous_path.is_file():
        previous = json.loads(previous_path.read_text(encoding="utf-8"))
        differences = run_folder.diff_settings(previous.get("settings", {}), settings, ignore=RESUMABLE_WITH_OTHER_VALUES,
                                               defaults=defaults)
        if differences:
            raise RunFolderError(
                f"{run_dir} holds a run with other settings:\n  " + "\n  ".join(differences)
                + "\nrerun with the same settings to resume it, choose another --output, or pass --overwrite to start over"
            )
    elif any(p.exists() for p in ours):
        raise RunFolderError(
            f"{run_dir} holds stage folders or metrics but no {RUN_FILE}, so it cannot be resumed safely; "
            "choose another --output or pass --overwrite"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    finished = {s for s in range(n_stages) if is_finished(run_dir, s)}
    # Resume continues after the last finished stage; a later stage folder without its
    # predecessors (copied in by hand) would break the chain of weights.
    first_unfinished = next((s for s in range(n_stages) if s not in finished), n_stages)
    finished = {s for s in finished if s < first_unfinished}
    for s in range(n_stages):
        leftover = partial_folder(run_dir, s)
        if leftover.exists():
            shutil.rmtree(leftover)
        # A stage folder after the first unfinished stage grew from weights that are about
        # to be retrained: it is stale, and it would block the rename of the new one.
        if s >= first_unfinished and stage_folder(run_dir, s).exists():
            echo(f"removing {stage_folder(run_dir, s)}: stage {first_unfinished} before it is not finished")
            shutil.rmtree(stage_folder(run_dir, s))
    elapsed = keep_metrics_of(run_dir / METRICS_FILE, finished)
    if finished:
        echo(f"resuming {run_dir}: stage(s) {', '.join(map(str, sorted(finished)))} already finished")
    return finished, elapsed


def keep_metrics_of(metrics_path: Path, finished: set[int]) -> float:
    """Drop metrics lines of unfinished stages (they will be redone); return the last elapsed time."""
    if not metrics_path.is_file():
        return 0.0
    kept = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("stage") in finished:
            kept.append(record)
    with atomic_path(metrics_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return max((float(r.get("elapsed", 0.0)) for r in kept), default=0.0)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once, with the run's ``elapsed`` seconds.

    Example:
        >>> log = MetricsLog(Path("runs/kd/metrics.jsonl"), elapsed_before=0.0)   # doctest: +SKIP
        >>> log.write({"event": "train", "step": 1, "loss": 2.5})                 # doctest: +SKIP
    """

    def __init__(self, path: Path, elapsed_before: float) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.started = time.perf_counter() - elapsed_before

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "elapsed": round(self.elapsed(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def recorded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as recorded in run.json: local paths made absolute, so a resume from another cwd matches.

    Example:
        >>> recorded_settings({"output": "/runs/kd", "schedule": "paper-gpt2", "teacher": "hub/teacher"})
        {'output': '/runs/kd', 'schedule': 'paper-gpt2', 'teacher': 'hub/teacher'}
    """
    values = dict(settings)
    values["output"] = str(Path(values["output"]).resolve())
    for key in ("teacher", "student", "curriculum", "data", "eval_file"):
        if values.get(key) is not None and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    if values["schedule"] not in PRESETS and Path(values["schedule"]).exists():
        values["schedule"] = str(Path(values["schedule"]).resolve())
    return values


def steps_done(records: Sequence[dict[str, Any]]) -> int:
    """Optimizer steps of the finished stages (``run.json``'s ``stages_finished``)."""
    return sum(int(r.get("steps", 0)) for r in records)


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
