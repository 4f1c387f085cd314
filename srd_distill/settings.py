"""The settings of a training run: one pydantic tree, which the ``srd-distill train`` options,
the ``--config`` file, ``run.json`` and the resume check are all generated from.

Shaped like srdata's :class:`~srdata.config.ScoreConfig`: sections (``models``, ``inputs``,
``objective``, ``optimisation``, ``compute``, ``evaluation``, ``run``), each field one CLI
flag (:func:`srdata.cli.config_options`). Settings may be given in their sections or flat,
named like the flags (``lr: 3e-4``); each flat key is placed in the section that owns it
(:func:`srdata.config.nest`), and every setting reads by its flat name too
(``settings.lr`` is ``settings.optimisation.lr``). ``run.json`` records the flat names
(:meth:`TrainSettings.flat`), as it always has. Settings marked
:data:`~srdata.config.RESUMABLE` may change when a run is resumed.

Example:
    >>> build_settings(teacher="t", student="s", output="o", data="d.jsonl").batch_size
    16
    >>> build_settings({"models": {"teacher": "t", "student": "s"}, "run": {"output": "o"}, "data": "d.jsonl"}).inputs.data
    'd.jsonl'
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from srd_distill.divergences import LOSS_FORMULAS, LOSS_NAMES
from srd_distill.errors import TrainingSetupError
from srd_distill.losses import DEFAULT_T2_SCALING, KDLossName, T2Scaling
from srd_distill.schedules import BASELINE_EPOCHS, PRESETS, ScheduleError, parse_epochs
from srdata.config import RESUMABLE, merge, nest, validation_problems

__all__ = ["TrainSettings", "build_settings", "DtypeName", "TRAIN_SECTIONS", "setting_defaults"]

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
LOSS_HELP = "; ".join(f"{name}: {LOSS_FORMULAS[name]}" for name in LOSS_NAMES)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# Settings marked RESUMABLE change speed, memory or logging but not the trained weights: a run
# may be resumed with other values of them. (grad_accum only splits a step into micro-batches;
# the loss of a step is the same token mean either way; fused_head and gradient_checkpointing
# change the arithmetic's order, not the step.)


class ModelsSettings(_Section):
    """``models``: The teacher (or its cached top-K) and the student."""

    teacher: Optional[str] = Field(
        default=None, description="Teacher (frozen): a save_pretrained folder or hub id; or give --teacher-logits instead. Example: --teacher ./gpt2-xl-sft"
    )
    teacher_logits: Optional[str] = Field(
        default=None,
        description="Instead of --teacher: a scored run whose teach pass cached the teacher's top-K log-probs "
        "(`srdata teach RUN --teacher T --top-k K`); KD from them, no teacher loaded (the tail beyond the top-K is one "
        "bucket). The data must come from that run (its annotated.parquet or export). Example: --teacher-logits runs/dolly",
    )
    teacher_top_k: Optional[int] = Field(
        default=None, ge=1, description="With --teacher-logits: the K the cache must hold (default: the cache's). Example: --teacher-top-k 64",
        json_schema_extra=RESUMABLE,  # the cache must hold exactly the K asked; run.json's inputs record it
    )
    student: str = Field(description="Student to train, sharing the teacher's tokenizer. Example: --student ./gpt2")


class InputsSettings(_Section):
    """``inputs``: What the student is trained on: an SRD curriculum or the full data."""

    curriculum: Optional[str] = Field(
        default=None, description="Folder written by `srdata export` (stage-K.parquet + curriculum.json). Example: --curriculum runs/dolly/curriculum"
    )
    data: Optional[str] = Field(
        default=None,
        description="Full-data baseline instead of a curriculum: .parquet/.jsonl/.json with prompt_text/reference_text "
        "(e.g. srdata's annotated.parquet) or prompt/response columns. Example: --data runs/dolly/annotated.parquet",
    )
    max_length: int = Field(default=512, ge=2, description="Most tokens of prompt + reference. Example: --max-length 1024")


class ObjectiveSettings(_Section):
    """``objective``: The KD loss and the per-stage schedule (epochs, kd_ratio, temperature)."""

    loss: KDLossName = Field(default="fkl", description=f"KD divergence D_T with p = teacher, q = student ({LOSS_HELP}). Example: --loss rkl")
    schedule: str = Field(
        default="paper-gpt2", description=f"Per-stage epochs, kd_ratio, temperature: {' | '.join(PRESETS)} or a YAML/TOML/JSON file. Example: --schedule pocl"
    )
    epochs: Optional[str] = Field(
        default=None,
        description="Curriculum: epochs of every stage ('2') or of each ('8,8,4'), overriding the schedule; "
        f"baseline: epochs on the full data (default {BASELINE_EPOCHS}). Example: --epochs 2",
    )
    kd_ratio: Optional[float] = Field(
        default=None, ge=0.0, le=1.0, description="Baseline only: weight of the KD term (default: the schedule's first stage). Example: --kd-ratio 0.9"
    )
    temperature: Optional[float] = Field(
        default=None, gt=0.0, description="Baseline only: KD temperature (default: the schedule's first stage). Example: --temperature 1.0"
    )
    t2_scaling: T2Scaling = Field(
        default=DEFAULT_T2_SCALING,
        description="Multiply D_T by T^2: all losses, only fkl/jsd/srkl as the reference code (reference), or none. Example: --t2-scaling reference",
    )


class OptimisationSettings(_Section):
    """``optimisation``: AdamW, its schedule and the batches."""

    lr: float = Field(default=1e-4, gt=0.0, description="Peak learning rate (AdamW, cosine decay). Example: --lr 5e-5")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay (matrices only). Example: --weight-decay 0")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps per stage. Example: --warmup-steps 100")
    grad_clip: float = Field(default=1.0, ge=0.0, description="Max gradient norm; 0 turns clipping off. Example: --grad-clip 0.5")
    batch_size: int = Field(default=16, ge=1, description="Rows per optimizer step. Example: --batch-size 32")
    grad_accum: int = Field(
        default=1, ge=1, description="Split each step's batch into at least this many micro-batches (less memory, same step). Example: --grad-accum 4",
        json_schema_extra=RESUMABLE,
    )
    max_steps: Optional[int] = Field(default=None, ge=1, description="At most this many optimizer steps per stage (smoke tests). Example: --max-steps 10")
    seed: int = Field(default=10, description="Random seed (stage s uses seed + s). Example: --seed 1")


class ComputeSettings(_Section):
    """``compute``: Where and in which precision the step runs, and what bounds its memory (no trained value changes)."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N. Example: --device cuda:1", json_schema_extra=RESUMABLE)
    dtype: DtypeName = Field(
        default="auto",
        description="Compute precision (autocast; float32 master weights); auto = bfloat16 on a GPU and on a CPU with AMX or AVX512-BF16, else float32. Example: --dtype float32",
    )
    teacher_dtype: DtypeName = Field(
        default="auto",
        description="Teacher weights; auto = its saved dtype (float16 on a CPU, or bfloat16 on a CPU without native "
        "bfloat16, upcast to float32). Example: --teacher-dtype float32",
    )
    save_dtype: DtypeName = Field(
        default="auto", description="Checkpoint weights; auto = the student's saved dtype (bfloat16 in, bfloat16 out). Example: --save-dtype float32"
    )
    micro_batch_tokens: int = Field(
        default=2048,
        ge=0,
        description="Most padded tokens per forward pass: a step with more runs as several micro-batches whose gradients add "
        "up to the same step (bounded activation memory); 0 = no cap. Example: --micro-batch-tokens 8192",
        json_schema_extra=RESUMABLE,
    )
    fused_head: bool = Field(
        default=True,
        description="Compute the loss from the last hidden states, projecting a chunk of scored tokens at a time through both "
        "LM heads: no full-vocabulary logits (models whose logits cannot be reproduced so fall back, with the reason printed).",
        json_schema_extra=RESUMABLE,
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute the student's activations in the backward pass: much less memory for one more forward pass of the student per step.",
        json_schema_extra=RESUMABLE,
    )


class EvaluationSettings(_Section):
    """``evaluation``: The held-out set scored every epoch."""

    eval_file: Optional[str] = Field(
        default=None,
        description="Held-out .parquet/.jsonl (same columns as --data): ROUGE-L of greedy answers every epoch; the best "
        "epoch of each stage is kept. Example: --eval-file dev.jsonl",
    )
    eval_max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per eval answer. Example: --eval-max-new-tokens 128")


class RunSettings(_Section):
    """``run``: The run folder: checkpoints, logging, stopping, starting over."""

    output: str = Field(description="Run folder: stage-N/ checkpoints, metrics.jsonl, run.json. Example: --output runs/kd", json_schema_extra=RESUMABLE)
    log_every: int = Field(default=10, ge=1, description="Write a metrics.jsonl line every N steps. Example: --log-every 1", json_schema_extra=RESUMABLE)
    # 500: a step checkpoint writes about 12 bytes per student parameter (float32 weights and
    # AdamW's two moments): ~1.6 GB for a 135M student, ~12 GB for 1B. At the ~0.2-1 s per
    # step of such runs on one GPU, that is every few minutes, a kill loses at most that, and
    # the write costs ~1-2% of the time. Lower it on slow steps, raise it on a slow disk.
    checkpoint_interval: int = Field(
        default=500,
        ge=0,
        description="Save a resumable step checkpoint (weights, optimizer, RNG, data position) every N optimizer steps; "
        "a rerun after a kill continues from it instead of from the stage's first step. Only the latest is kept; "
        "0 = none. Example: --checkpoint-interval 200",
        json_schema_extra=RESUMABLE,
    )
    stop_after_stage: Optional[int] = Field(
        default=None, ge=0, description="Stop once this stage is finished; rerun without it to continue. Example: --stop-after-stage 0",
        json_schema_extra=RESUMABLE,
    )
    overwrite: bool = Field(default=False, description="Start over in an output folder that holds a run with other settings.", json_schema_extra=RESUMABLE)


#: The sections of :class:`TrainSettings`, by name: what ``--config`` files and flat keys are placed in.
TRAIN_SECTIONS: dict[str, type[BaseModel]] = {
    "models": ModelsSettings,
    "inputs": InputsSettings,
    "objective": ObjectiveSettings,
    "optimisation": OptimisationSettings,
    "compute": ComputeSettings,
    "evaluation": EvaluationSettings,
    "run": RunSettings,
}
_SECTION_OF = {name: section for section, model in TRAIN_SECTIONS.items() for name in model.model_fields}


class TrainSettings(_Section):
    """Every setting of a training run, in sections; the CLI flags map one to one onto their fields.

    Flat keys are accepted and placed in their sections; every setting also reads by its
    flat name (``settings.lr``).

    Example:
        >>> TrainSettings(teacher="t", student="s", output="run", data="train.jsonl").micro_batch_tokens
        2048
        >>> TrainSettings(teacher="t", student="s", output="run", data="train.jsonl").compute.micro_batch_tokens
        2048
    """

    models: ModelsSettings
    inputs: InputsSettings = InputsSettings()
    objective: ObjectiveSettings = ObjectiveSettings()
    optimisation: OptimisationSettings = OptimisationSettings()
    compute: ComputeSettings = ComputeSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    run: RunSettings

    @model_validator(mode="before")
    @classmethod
    def _in_sections(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = nest(values, TRAIN_SECTIONS)  # flat keys into their sections; a setting given twice is refused
        objective = values.get("objective", {})
        # Accept 8, "8", "8,8,4" or [8, 8, 4]; store one normalised string.
        if isinstance(objective, dict) and objective.get("epochs") is not None:
            parsed = parse_epochs(objective["epochs"])
            values["objective"] = {**objective, "epochs": ",".join(map(str, parsed)) if isinstance(parsed, tuple) else str(parsed)}
        return values

    def __getattr__(self, name: str) -> Any:
        """A setting by its flat name: ``settings.lr`` is ``settings.optimisation.lr``."""
        section = _SECTION_OF.get(name)
        if section is None:
            return super().__getattr__(name)  # type: ignore[misc]  # pydantic's: private attributes, else AttributeError
        return getattr(getattr(self, section), name)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name: what ``run.json`` records and the input fingerprints read.

        Example:
            >>> TrainSettings(teacher="t", student="s", output="o", data="d.jsonl").flat()["lr"]
            0.0001
        """
        return {name: value for section in self.model_dump().values() for name, value in section.items()}

    def replace(self, **flat: Any) -> "TrainSettings":
        """A validated copy with some settings changed (flat names), e.g. the local copy of a remote path.

        Example:
            >>> TrainSettings(teacher="t", student="s", output="o", data="d.jsonl").replace(output="p").run.output
            'p'
        """
        return build_settings(self, **flat)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        # Read through the flat names (self.teacher is self.models.teacher): the messages name them so.
        if (self.teacher is None) == (self.teacher_logits is None):
            raise ValueError(
                "give either teacher (a model, run at every step) or teacher_logits (a run with the teacher's cached top-K, "
                "`srdata teach RUN --teacher T --top-k K`), not both or neither"
            )
        if self.teacher_top_k is not None and self.teacher_logits is None:
            raise ValueError("teacher_top_k goes with teacher_logits (the K of the cached top-K); drop it with --teacher")
        if (self.curriculum is None) == (self.data is None):
            raise ValueError("give either curriculum (SRD stages) or data (the full-data baseline), not both or neither")
        if self.curriculum is not None and (self.kd_ratio is not None or self.temperature is not None):
            raise ValueError(
                "kd_ratio and temperature are set per stage by the schedule in a curriculum run; "
                "write a schedule file to change them (they are flags of the --data baseline)"
            )
        if self.data is not None and self.epochs is not None and "," in self.epochs:
            raise ValueError(f"the baseline has one stage: epochs must be one number, got {self.epochs!r}")
        if self.grad_accum > self.batch_size:
            raise ValueError(f"grad_accum {self.grad_accum} is larger than batch_size {self.batch_size}: a micro-batch needs a row")
        return self


def setting_defaults() -> dict[str, Any]:
    """Every setting's default by its flat name (required ones: pydantic's ``PydanticUndefined``).

    What a setting added after a run was recorded had there (:func:`srdata.run.folder.diff_settings`).

    Example:
        >>> setting_defaults()["batch_size"]
        16
    """
    return {name: field.default for model in TRAIN_SECTIONS.values() for name, field in model.model_fields.items()}


def build_settings(settings: TrainSettings | dict[str, Any] | None = None, **overrides: Any) -> TrainSettings:
    """Validate settings (a TrainSettings, a dict flat or in sections, keywords; keywords win) with readable errors.

    Example:
        >>> build_settings(teacher="t", student="s", output="o", data="d.jsonl", lr=3e-4).lr
        0.0003
    """
    values = settings.flat() if isinstance(settings, TrainSettings) else dict(settings or {})
    try:
        return TrainSettings.model_validate(merge(nest(values, TRAIN_SECTIONS), nest(overrides, TRAIN_SECTIONS)))
    except ValidationError as err:
        problems = validation_problems(err, name=lambda loc: str(loc[-1]))  # the flat name: the flag's, the key's
        raise TrainingSetupError("invalid training settings:\n" + "\n".join(f"  {line}" for line in problems)) from None
    except ScheduleError as err:
        raise TrainingSetupError(str(err)) from None
    except ValueError as err:  # a setting given twice, or unknown (srdata.config.nest)
        raise TrainingSetupError(f"invalid training settings:\n  {err}") from None
