"""What an ``srd-distill`` run records, typed like srdata's :class:`~srdata.run.folder.Manifest`.

* :class:`RunRecord`: ``RUN/run.json`` (settings, input fingerprints, schedule, encoding,
  dtypes, versions, finished stages, status);
* :class:`StageRecord`: ``RUN/stage-N/srd_stage.json``, copied into ``run.json``'s
  ``stages_finished``; what :func:`srd_distill.train.train_stage` returns;
* :class:`StagePosition` and :class:`StepState`: where a stage is, and the ``state.json`` of
  its step checkpoint (:mod:`srd_distill.resume`).

Unknown keys are kept (a newer srd-distill may add some) and a field added later reads as
its default, so a record written by another version still reads. The epoch whose weights a
stage kept is ``kept_epoch`` everywhere; records written when the step state called it
``best_epoch`` read the same.

Example:
    >>> StageRecord.model_validate({"stage": 0, "rows": 5, "steps": 2, "seconds": 1.5, "best_epoch": 1}).kept_epoch
    1
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["RunRecord", "ScheduleRecord", "PlannedStage", "StageRecord", "StagePosition", "StepState", "OLD_NAMES"]

#: Keys older records used for what is now one name.
OLD_NAMES = {"best_epoch": "kept_epoch"}


def _new_names(values: Any) -> Any:
    """A record's keys under today's names (``best_epoch`` -> ``kept_epoch``); today's name wins when both are there."""
    if not isinstance(values, dict) or not any(old in values for old in OLD_NAMES):
        return values
    renamed = {}
    for key, value in values.items():
        new = OLD_NAMES.get(key)
        if new is None:
            renamed[key] = value
        elif new not in values:
            renamed[new] = value
    return renamed


class Record(BaseModel):
    """A JSON record of the run: unknown keys kept, old names read, written without fields never set."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, values: Any) -> Any:
        return _new_names(values)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (fields never set are left out, as ``Manifest.to_json``)."""
        return self.model_dump(mode="json", exclude_unset=True)


class StageRecord(Record):
    """``srd_stage.json``: what one finished stage trained on and produced.

    Example:
        >>> StageRecord(stage=0, rows=5, steps=2, seconds=1.0, kept_epoch=None).to_json()
        {'stage': 0, 'rows': 5, 'steps': 2, 'kept_epoch': None, 'seconds': 1.0}
    """

    stage: int
    data_file: Optional[str] = None
    rows: int
    flagged_rows_left_out: int = 0
    rows_without_reference_room: int = 0
    rows_cut_to_max_length: int = 0
    epochs: Optional[int] = None
    steps: int
    kd_ratio: Optional[float] = None
    temperature: Optional[float] = None
    loss: Optional[str] = None
    t2_scaling: Optional[str] = None
    started_from: Optional[str] = None
    kept_epoch: Optional[int] = None  # the epoch whose weights were kept (0-based): best eval ROUGE-L, else the last
    best_eval_rouge_l: Optional[float] = None
    seconds: float
    fused_head: Optional[bool] = None

    @classmethod
    def read(cls, path: Path) -> "StageRecord":
        """The record in ``path`` (an ``srd_stage.json``, verified with its checkpoint before it is read)."""
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


class PlannedStage(Record):
    """One stage of ``run.json``'s schedule: its file and loss mix."""

    stage: int
    file: str
    epochs: int
    kd_ratio: float
    temperature: float


class ScheduleRecord(Record):
    """``run.json``'s schedule: its name and the planned stages."""

    name: Optional[str] = None
    stages: list[PlannedStage] = []


class RunRecord(Record):
    """``run.json``. Every field optional: a record of an older srd-distill still reads (and is judged by its fields).

    Example:
        >>> RunRecord.model_validate({"settings": {"lr": 0.0001}, "schedule": {"name": "paper-gpt2"}}).format_version
        1
    """

    mode: Optional[str] = None
    settings: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    schedule: Optional[ScheduleRecord] = None
    encoding: dict[str, Any] = {}
    tokenizer: dict[str, Any] = {}
    device: Optional[str] = None
    dtype: Optional[str] = None
    teacher_dtype: Optional[str] = None
    save_dtype: Optional[str] = None
    dtype_reason: Optional[str] = None
    versions: dict[str, str] = {}
    created_at: Optional[str] = None
    stages_finished: list[StageRecord] = []
    tool: Optional[str] = None
    format_version: int = 1  # 1: written before srd-distill recorded it (no checksums, no fingerprints)
    status: Optional[str] = None
    updated_at: Optional[str] = None


class StagePosition(Record):
    """Where a stage is: what a step checkpoint records besides tensors (its ``state.json``, :class:`StepState`).

    Example:
        >>> StagePosition().next_batch
        0
    """

    epoch: int = 0
    next_batch: int = 0  # index into ``order`` of the next batch's first row
    step: int = 0  # optimizer steps done in the stage
    global_step: int = 0
    # This epoch's shuffled rows: saved in rng.safetensors beside the state, not in state.json.
    order: list[int] = Field(default_factory=list, exclude=True)
    window: dict[str, int | float] = Field(default_factory=lambda: {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "tokens": 0})
    best_rouge: Optional[float] = None
    kept_epoch: Optional[int] = None  # the epoch whose weights are kept so far (best eval ROUGE-L; the last without eval)
    last_epoch: int = 0  # the last epoch that trained at least one step
    lr: float = 0.0  # of the last step (an eval row reports it)
    seconds: float = 0.0  # of the stage's training before this process
    total_steps: int = 0
    rows: int = 0


class StepState(StagePosition):
    """A step checkpoint's ``state.json``: the stage's position plus the counters and optimizer settings beside it."""

    stage: int
    metrics_lines: int = 0  # lines of the stage in metrics.jsonl that the checkpoint covers
    param_groups: list[dict[str, Any]] = []  # AdamW's, JSON-able (its tensors are in optimizer.safetensors)
    scaler: Optional[dict[str, Any]] = None  # the float16 loss scaler's state, when one is on

    @classmethod
    def read(cls, path: Path) -> "StepState":
        """The state in ``path`` (a verified step checkpoint's ``state.json``)."""
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def position(self) -> StagePosition:
        """The stage's position alone (``order`` is restored from the checkpoint's RNG file)."""
        return StagePosition.model_validate(self.model_dump(include=set(StagePosition.model_fields)))
