"""The stages of an ``srd-distill`` run: which file each trains on, for how long, with which loss mix; what they produced.

A curriculum run has one stage per stage of its schedule (:mod:`srd_distill.schedules`),
on the curriculum's stage files; the full-data baseline has one stage on all the data.

Example:
    >>> plans, schedule = plan_stages("paper-gpt2", curriculum="runs/dolly/curriculum")   # doctest: +SKIP
    >>> [p.data_file.name for p in plans]                                                 # doctest: +SKIP
    ['stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from srd_distill.data import checked_curriculum
from srd_distill.errors import TrainingSetupError
from srd_distill.run_folder import read_stage_info, stage_folder
from srd_distill.schedules import (
    Schedule,
    ScheduleError,
    Stage,
    load_schedule,
    with_epochs,
)

__all__ = ["BASELINE_EPOCHS", "StagePlan", "plan_stages", "StageResult", "TrainResult"]

BASELINE_EPOCHS = 20  # the method's full-data KD baseline (SRD-METHOD.md, "Why it saves time")


@dataclass(frozen=True)
class StagePlan:
    """One stage to train: which rows, how long, with which loss mix."""

    index: int
    data_file: Path
    epochs: int
    kd_ratio: float
    temperature: float
    sha256: Optional[str] = None  # of data_file, as checked when the run was planned (verified again before it is read)


def plan_stages(
    schedule_name: str,
    *,
    curriculum: Optional[str] = None,
    epochs: Optional[str] = None,
    data: Optional[str] = None,
    kd_ratio: Optional[float] = None,
    temperature: Optional[float] = None,
) -> tuple[list[StagePlan], Schedule]:
    """The stages of a run: one per schedule stage on ``curriculum``'s files, or one on all of ``data`` (the baseline).

    Curriculum: ``epochs`` ("8" or "8,8,4") overrides the schedule's. Baseline: ``epochs``
    passes (:data:`BASELINE_EPOCHS` when not given), ``kd_ratio`` and ``temperature``
    defaulting to the schedule's first stage.

    Example:
        >>> plans, _ = plan_stages("paper-gpt2", data="d.jsonl", epochs="3")
        >>> [(p.index, p.epochs, p.kd_ratio, p.temperature) for p in plans]
        [(0, 3, 0.8, 1.0)]
    """
    try:
        schedule = load_schedule(schedule_name)
        if curriculum is not None:
            schedule = with_epochs(schedule, epochs)
    except ScheduleError as err:
        raise TrainingSetupError(str(err)) from None
    if data is not None:
        first = schedule.stages[0]
        stage = Stage(
            epochs=int(epochs) if epochs is not None else BASELINE_EPOCHS,
            kd_ratio=first.kd_ratio if kd_ratio is None else kd_ratio,
            temperature=first.temperature if temperature is None else temperature,
        )
        return [StagePlan(0, Path(data), stage.epochs, stage.kd_ratio, stage.temperature)], schedule
    if curriculum is None:
        raise TrainingSetupError("give either curriculum (SRD stages) or data (the full-data baseline)")
    files, digests = checked_curriculum(Path(curriculum), len(schedule.stages), schedule.name)
    plans = [StagePlan(i, f, s.epochs, s.kd_ratio, s.temperature, digest)
             for i, (f, s, digest) in enumerate(zip(files, schedule.stages, digests))]
    return plans, schedule


@dataclass
class StageResult:
    """What one stage produced."""

    stage: int
    checkpoint: Path
    rows: int
    steps: int
    best_epoch: Optional[int]  # the epoch whose weights were kept (0-based)
    best_eval_rouge_l: Optional[float]
    seconds: float
    skipped: bool = False  # finished by an earlier call (resume)

    @classmethod
    def of_finished(cls, run_dir: Path, stage: int) -> "StageResult":
        """The result of a stage an earlier call finished, read from its ``srd_stage.json``."""
        info = read_stage_info(run_dir, stage)
        return cls(stage, stage_folder(run_dir, stage), info["rows"], info["steps"], info.get("kept_epoch"),
                   info.get("best_eval_rouge_l"), info["seconds"], skipped=True)


@dataclass
class TrainResult:
    """Where a run's outputs are."""

    output: Path
    stages: list[StageResult]
    metrics_path: Path
    run_path: Path
    complete: bool  # False when stop_after_stage ended the run early
