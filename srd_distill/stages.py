"""The stages of an ``srd-distill`` run: which file each trains on, for how long, with which loss mix; what they produced.

A curriculum run has one stage per stage of its schedule (:mod:`srd_distill.schedules`),
on the curriculum's stage files; the full-data baseline has one stage on all the data.

(``srdata export`` cuts the ranked rows into stages with :class:`srdata.curriculum.cut.StagePlan`;
this module plans the training that walks them: :class:`TrainingStage`, :func:`plan_training`.)

Example:
    >>> stages, schedule = plan_training("paper-gpt2", curriculum="runs/dolly/curriculum")   # doctest: +SKIP
    >>> [s.data_file.name for s in stages]                                                    # doctest: +SKIP
    ['stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from srd_distill.data import checked_curriculum
from srd_distill.errors import TrainingSetupError
from srd_distill.records import StageRecord
from srd_distill.run_folder import read_stage_record, stage_folder
from srd_distill.schedules import (  # BASELINE_EPOCHS: re-exported (the settings' help names it too)
    BASELINE_EPOCHS,
    Schedule,
    ScheduleError,
    Stage,
    load_schedule,
    with_epochs,
)
from srdata.deprecation import renamed_names

__all__ = ["BASELINE_EPOCHS", "TrainingStage", "plan_training", "StageResult", "TrainResult"]


@dataclass(frozen=True)
class TrainingStage:
    """One stage to train: which rows, how long, with which loss mix."""

    index: int
    data_file: Path
    epochs: int
    kd_ratio: float
    temperature: float
    sha256: Optional[str] = None  # of data_file, as checked when the run was planned (verified again before it is read)


def plan_training(
    schedule_name: str,
    *,
    curriculum: Optional[str] = None,
    epochs: Optional[str] = None,
    data: Optional[str] = None,
    kd_ratio: Optional[float] = None,
    temperature: Optional[float] = None,
) -> tuple[list[TrainingStage], Schedule]:
    """The stages of a run: one per schedule stage on ``curriculum``'s files, or one on all of ``data`` (the baseline).

    Curriculum: ``epochs`` ("8" or "8,8,4") overrides the schedule's. Baseline: ``epochs``
    passes (:data:`BASELINE_EPOCHS` when not given), ``kd_ratio`` and ``temperature``
    defaulting to the schedule's first stage.

    Example:
        >>> stages, _ = plan_training("paper-gpt2", data="d.jsonl", epochs="3")
        >>> [(s.index, s.epochs, s.kd_ratio, s.temperature) for s in stages]
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
        return [TrainingStage(0, Path(data), stage.epochs, stage.kd_ratio, stage.temperature)], schedule
    if curriculum is None:
        raise TrainingSetupError("give either curriculum (SRD stages) or data (the full-data baseline)")
    files, digests = checked_curriculum(Path(curriculum), len(schedule.stages), schedule.name)
    plans = [TrainingStage(i, f, s.epochs, s.kd_ratio, s.temperature, digest)
             for i, (f, s, digest) in enumerate(zip(files, schedule.stages, digests))]
    return plans, schedule


@dataclass
class StageResult:
    """What one stage produced: its record (``srd_stage.json``) and where its checkpoint is."""

    record: StageRecord
    checkpoint: Path
    skipped: bool = False  # finished by an earlier call (resume)

    @classmethod
    def of_finished(cls, run_dir: Path, stage: int) -> "StageResult":
        """The result of a stage an earlier call finished, read from its ``srd_stage.json``."""
        return cls(read_stage_record(run_dir, stage), stage_folder(run_dir, stage), skipped=True)

    @property
    def stage(self) -> int:
        return self.record.stage

    @property
    def rows(self) -> int:
        return self.record.rows

    @property
    def steps(self) -> int:
        return self.record.steps

    @property
    def kept_epoch(self) -> Optional[int]:
        """The epoch whose weights were kept (0-based)."""
        return self.record.kept_epoch

    @property
    def best_eval_rouge_l(self) -> Optional[float]:
        return self.record.best_eval_rouge_l

    @property
    def seconds(self) -> float:
        return self.record.seconds

    @property
    def best_epoch(self) -> Optional[int]:
        """Deprecated: :attr:`kept_epoch` (one name, as in ``srd_stage.json``)."""
        warnings.warn("StageResult.best_epoch is deprecated; use StageResult.kept_epoch", DeprecationWarning, stacklevel=2)
        return self.kept_epoch


@dataclass
class TrainResult:
    """Where a run's outputs are."""

    output: Path
    stages: list[StageResult]
    metrics_path: Path
    run_path: Path
    complete: bool  # False when stop_after_stage ended the run early


# Old names of TrainingStage and plan_training (srdata's export has its own stage plan).
_RENAMED = {"StagePlan": "TrainingStage", "plan_stages": "plan_training"}


__getattr__ = renamed_names(__name__, _RENAMED, globals())
