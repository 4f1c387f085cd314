"""Per-stage training schedules: how many epochs, which kd_ratio and which KD temperature.

A schedule is a list of stages; stage ``s`` trains on the curriculum file ``stage-s``.
The presets are the reference runs of the SRD paper (``docs/SRD-METHOD.md``, Stage 2):

================  ======  ============  =====================  ==========================
preset            stages  epochs/stage  kd_ratio               temperature
================  ======  ============  =====================  ==========================
paper-gpt2        3       8             0.8 / 0.9 / 1.0        1 / 1.5 / 2
paper-openllama   3       4             0.7 / 0.8 / 0.9        1 / 1.33 / 1.67
pocl              4       8             0.7 / 0.8 / 0.9 / 1.0  1 / 1.33 / 1.67 / 2
================  ======  ============  =====================  ==========================

(``pocl`` trains on all 4 parts: export the curriculum with ``--keep 4`` for it.)

Any other schedule is a YAML, TOML or JSON file with a ``stages`` list; a top-level
``epochs`` is the default for stages that do not set their own::

    # my-schedule.yaml
    epochs: 6
    stages:
      - {kd_ratio: 0.8, temperature: 1.0}
      - {kd_ratio: 0.9, temperature: 1.5, epochs: 4}

Example:
    >>> schedule = load_schedule("paper-gpt2")
    >>> [(s.epochs, s.kd_ratio, s.temperature) for s in schedule.stages]
    [(8, 0.8, 1.0), (8, 0.9, 1.5), (8, 1.0, 2.0)]
    >>> [s.epochs for s in with_epochs(schedule, "2,2,1").stages]
    [2, 2, 1]
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["Stage", "Schedule", "PRESETS", "ScheduleError", "load_schedule", "with_epochs", "parse_epochs", "BASELINE_EPOCHS"]

BASELINE_EPOCHS = 20  # the method's full-data KD baseline (SRD-METHOD.md, "Why it saves time")


class ScheduleError(ValueError):
    """A schedule name or file that cannot be used, with the reason spelled out."""


class Stage(BaseModel):
    """One curriculum stage: ``epochs`` passes over its data with this loss mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(ge=1, description="passes over the stage's data")
    kd_ratio: float = Field(ge=0.0, le=1.0, description="weight of the KD term; CE gets 1 - kd_ratio")
    temperature: float = Field(gt=0.0, description="KD temperature T; CE is always at T = 1")

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class Schedule(BaseModel):
    """A named list of stages, easiest data first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    stages: tuple[Stage, ...] = Field(min_length=1)

    def describe(self) -> list[dict[str, Any]]:
        """Plain dicts, for ``run.json`` and logs."""
        return [stage.model_dump() for stage in self.stages]


def _preset(name: str, epochs: int, kd_ratios: Sequence[float], temperatures: Sequence[float]) -> Schedule:
    stages = tuple(Stage(epochs=epochs, kd_ratio=k, temperature=t) for k, t in zip(kd_ratios, temperatures, strict=True))
    return Schedule(name=name, stages=stages)


PRESETS: dict[str, Schedule] = {
    "paper-gpt2": _preset("paper-gpt2", 8, (0.8, 0.9, 1.0), (1.0, 1.5, 2.0)),
    "paper-openllama": _preset("paper-openllama", 4, (0.7, 0.8, 0.9), (1.0, 1.33, 1.67)),
    "pocl": _preset("pocl", 8, (0.7, 0.8, 0.9, 1.0), (1.0, 1.33, 1.67, 2.0)),
}


class _ScheduleFile(BaseModel):
    """The layout of a schedule file (validated, so a typo is an error, not a default)."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    epochs: Optional[int] = Field(default=None, ge=1, description="default epochs for stages without their own")
    stages: list[dict[str, Any]] = Field(min_length=1)


def load_schedule(name_or_path: str | Path) -> Schedule:
    """A preset by name, or a schedule read from a ``.yaml``/``.yml``/``.toml``/``.json`` file.

    Example:
        >>> load_schedule("pocl").stages[-1].temperature
        2.0
    """
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if not path.is_file():
        raise ScheduleError(
            f"unknown schedule {key!r}: use a preset ({', '.join(PRESETS)}) or the path of an existing "
            ".yaml/.toml/.json schedule file"
        )
    raw = _read_file(path)
    problems: list[str] = []
    try:
        layout = _ScheduleFile.model_validate(raw)
    except ValidationError as err:
        raise ScheduleError(f"invalid schedule file {path}:\n" + "\n".join(_explain(err, "")) + _layout_hint(raw)) from None
    stages = []
    for index, stage in enumerate(layout.stages):  # every stage is checked, so one run lists every problem
        values = {"epochs": layout.epochs, **stage} if layout.epochs is not None and "epochs" not in stage else stage
        try:
            stages.append(Stage.model_validate(values))
        except ValidationError as err:
            problems += _explain(err, f"stages[{index}].")
    if problems:
        raise ScheduleError(f"invalid schedule file {path}:\n" + "\n".join(problems))
    return Schedule(name=layout.name or path.stem, stages=tuple(stages))


def _read_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ScheduleError(f"schedule file {path} cannot be parsed: {err}") from None
    except Exception as err:  # yaml.YAMLError, without importing yaml for the other formats
        raise ScheduleError(f"schedule file {path} cannot be parsed: {err}") from None
    raise ScheduleError(f"schedule file {path} must end in .yaml, .yml, .toml or .json")


def _explain(err: ValidationError, prefix: str) -> list[str]:
    """One ``  where: problem (got value)`` line per error."""
    lines = []
    for e in err.errors():
        where = prefix + ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing" and e["loc"][-1:] == ("epochs",):
            lines.append(f"  {where}: missing (set epochs on the stage, or a top-level epochs for all stages)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown setting (a stage has epochs, kd_ratio, temperature)" if prefix else f"  {where}: unknown setting (a schedule file has name, epochs, stages)")
        else:
            got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
            lines.append(f"  {where or 'file'}: {e['msg']}{got}")
    return lines


def _layout_hint(raw: Any) -> str:
    if isinstance(raw, dict):
        return ""
    return "\n  the file must hold a mapping with a 'stages' list, e.g. stages: [{epochs: 8, kd_ratio: 0.8, temperature: 1.0}]"


def parse_epochs(value: str | int | Sequence[int]) -> int | tuple[int, ...]:
    """``"8"`` -> 8 (every stage); ``"8,8,4"`` -> (8, 8, 4) (one per stage).

    Example:
        >>> parse_epochs("3"), parse_epochs("2,1")
        (3, (2, 1))
    """
    if isinstance(value, int) and not isinstance(value, bool):
        parsed: int | tuple[int, ...] = value
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = tuple(int(p) for p in parts)
        except ValueError:
            raise ScheduleError(f"epochs must be a positive integer or a comma-separated list of them, got {value!r}") from None
        parsed = numbers[0] if len(numbers) == 1 else numbers
    else:
        parsed = tuple(int(v) for v in value)
    values = (parsed,) if isinstance(parsed, int) else parsed
    if not values or any(v < 1 for v in values):
        raise ScheduleError(f"epochs must be >= 1, got {value!r}")
    return parsed


def with_epochs(schedule: Schedule, epochs: str | int | Sequence[int] | None) -> Schedule:
    """The schedule with its epochs replaced: one number for every stage, or one per stage.

    Example:
        >>> [s.epochs for s in with_epochs(load_schedule("paper-gpt2"), 1).stages]
        [1, 1, 1]
    """
    if epochs is None:
        return schedule
    parsed = parse_epochs(epochs)
    per_stage = (parsed,) * len(schedule.stages) if isinstance(parsed, int) else parsed
    if len(per_stage) != len(schedule.stages):
        raise ScheduleError(
            f"--epochs lists {len(per_stage)} values but schedule {schedule.name!r} has {len(schedule.stages)} stages"
        )
    stages = tuple(stage.model_copy(update={"epochs": e}) for stage, e in zip(schedule.stages, per_stage))
    return schedule.model_copy(update={"stages": stages})
