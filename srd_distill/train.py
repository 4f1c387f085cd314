"""The SRD stage-2 training loop: distil a teacher into a student, one curriculum stage at a time.

One file, read top to bottom (in the spirit of nanoGPT's ``train.py``): settings, data,
models, loss, evaluation, checkpoints, then :func:`train`, the loop itself. No trainer
framework and no callbacks: everything that happens in a step is written out in
:func:`train_stage`.

What a run does (``docs/SRD-METHOD.md``, Stage 2):

* **Curriculum** (``curriculum=OUT``): stage ``s`` of the schedule trains on
  ``OUT/stage-s.parquet`` (cumulative, easy to hard, as ``srdata export`` writes it) for
  the stage's epochs, with its ``kd_ratio`` and KD temperature. Stage 0 starts from the
  student; stage ``s > 0`` starts from the saved checkpoint of stage ``s - 1``, with a
  fresh AdamW and a fresh cosine learning-rate schedule.
* **Baseline** (``data=FILE``): one stage on the full data for ``epochs`` epochs (20 by
  default, the method's full-data KD baseline) with the same loss and optimizer;
  ``kd_ratio`` and ``temperature`` default to the first stage of the schedule.
* **Loss** per step: ``(1 - kd_ratio) * CE(student, reference) + kd_ratio * D_T(teacher ||
  student)``, both means over the response tokens of the batch (end-of-sequence
  included), computed by :func:`srd_distill.losses.kd_objective`.
* **Tokens**: prompt and reference are encoded by :func:`srdata.encode_pairs` (the rules
  ``srdata score`` used), with the prompt settings of the source run's ``manifest.json``
  (``max_prompt_tokens``, ``max_reference_tokens``, ``truncation_side``, chat template or
  not), falling back to srdata's defaults when no manifest is found. The sequence is then
  cut to ``max_length`` tokens (from the end of the reference).

Data files (``data=``, ``eval_file=``): ``.parquet``, ``.jsonl`` or ``.json`` with the
columns ``prompt_text``/``reference_text`` (an ``srdata`` ``annotated.parquet`` or a
curriculum stage file; rows flagged with an ``invalid_reason`` are left out and counted),
or else ``prompt``/``response`` or ``prompt``/``completion``. The prompt is used verbatim:
it must already be the rendered prompt string the model sees.

Outputs in the run folder ``RUN``:

* ``RUN/stage-N/``: the student after stage N (``from_pretrained``-loadable model and
  tokenizer, plus ``srd_stage.json``). With an eval file it is the epoch with the best
  eval ROUGE-L, otherwise the last epoch. It is written to ``RUN/.stage-N.partial`` and
  renamed when complete, so a ``stage-N`` folder is always a finished stage.
* ``RUN/metrics.jsonl``: one JSON object per logged training step (``"event": "train"``)
  and per evaluation (``"event": "eval"``, with ``eval_rouge_l`` and the held-out losses).
  Keys: ``event, stage, epoch, step`` (optimizer steps done in the stage), ``global_step,
  loss, kd_loss`` (T^2 factor included), ``kd_unscaled`` (without it), ``t2_factor, ce_loss,
  lr, temperature, kd_ratio, elapsed`` (seconds since the run began, across resumes); train
  rows add ``grad_norm`` and ``tokens``. Train-row losses are token-weighted means over the
  steps since the previous train row. Memory levers and the fused LM head: ``memory.py``,
  ``fused_head.py``; what the terminal shows: ``progress.py``.
* ``RUN/run.json``: the settings, the resolved schedule and encoding, data sizes, and a
  summary of every finished stage.

Resuming: rerunning the same command continues after the last finished stage; metrics
of an unfinished stage are dropped and that stage is redone from its start. Settings
that change results must match (``device``, ``grad_accum``, ``log_every`` and
``stop_after_stage`` may change); ``overwrite=True`` starts over.

Example:
    >>> from srd_distill.train import train
    >>> result = train(teacher="gpt2-xl-sft", student="gpt2", curriculum="runs/dolly/curriculum",
    ...                output="runs/kd-gpt2", loss="rkl", schedule="paper-gpt2")   # doctest: +SKIP
    >>> result.stages[-1].checkpoint                                            # doctest: +SKIP
    PosixPath('runs/kd-gpt2/stage-2')
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from srd_distill.errors import CurriculumFilesError, RunFolderError, TokenizerMismatchError, TrainingInterrupted, TrainingSetupError
from srd_distill.fused_head import HeadPlan, base_hidden_states, fused_kd_objective, head_weights, plan_lm_head
from srd_distill.losses import DEFAULT_T2_SCALING, KDLossName, T2Scaling, kd_objective, shift_for_next_token, t2_factor
from srd_distill.memory import (DTYPES, autocast_context, enable_gradient_checkpointing, load_model, micro_batch_count,
                                peak_memory_text, resolve_precision, resolve_teacher_dtype, save_checkpoint, saved_dtype)
from srd_distill.progress import StageProgress, interrupted_message, stage_banner, stage_done
from srd_distill.schedules import PRESETS, Schedule, ScheduleError, Stage, load_schedule, parse_epochs, with_epochs
from srdata.run import folder as run_folder

__all__ = [
    "TrainSettings",
    "TrainResult",
    "StageResult",
    "TrainingSetupError",
    "TokenizerMismatchError",
    "CurriculumFilesError",
    "RunFolderError",
    "EncodingSettings",
    "train",
    "read_pairs",
    "find_encoding_settings",
    "check_same_tokenizer",
    "learning_rate",
]

log = logging.getLogger(__name__)

BASELINE_EPOCHS = 20  # the method's full-data KD baseline (SRD-METHOD.md, "Why it saves time")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STAGE_INFO_FILE = "srd_stage.json"
CURRICULUM_FILE = "curriculum.json"
MANIFEST_FILE = "manifest.json"
# Settings that change speed, memory or logging but not the trained weights: a run may be
# resumed with other values of these. (grad_accum only splits a step into micro-batches;
# the loss of a step is the same token mean either way.)
# fused_head and gradient_checkpointing likewise change the arithmetic's order, not the step.
RESUMABLE_WITH_OTHER_VALUES = frozenset({"device", "grad_accum", "log_every", "stop_after_stage", "overwrite", "output",
                                         "fused_head", "gradient_checkpointing", "micro_batch_tokens"})
STAGE_FOLDER_PATTERN = re.compile(r"stage-\d+")
PARTIAL_FOLDER_PATTERN = re.compile(r"\.stage-\d+\.partial")
TEXT_COLUMN_PAIRS = (("prompt_text", "reference_text"), ("prompt", "response"), ("prompt", "completion"))


# ======================================================================================
# Settings
# ======================================================================================


class TrainSettings(BaseModel):
    """Every setting of a training run; the CLI flags map one to one onto these fields.

    Example:
        >>> TrainSettings(teacher="t", student="s", output="run", data="train.jsonl").baseline_epochs
        20
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    teacher: str = Field(description="teacher: a save_pretrained folder or hub id (frozen)")
    student: str = Field(description="student to train: a save_pretrained folder or hub id")
    output: str = Field(description="run folder")
    curriculum: Optional[str] = Field(default=None, description="folder written by `srdata export`")
    data: Optional[str] = Field(default=None, description="full-data baseline: one file of prompt/reference pairs")
    loss: KDLossName = "fkl"
    schedule: str = Field(default="paper-gpt2", description="preset name or YAML/TOML/JSON file")
    epochs: Optional[str] = Field(default=None, description="curriculum: '8' or '8,8,4' per stage; baseline: one number")
    kd_ratio: Optional[float] = Field(default=None, ge=0.0, le=1.0, description="baseline only")
    temperature: Optional[float] = Field(default=None, gt=0.0, description="baseline only")
    t2_scaling: T2Scaling = DEFAULT_T2_SCALING
    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0.0, description="max gradient norm; 0 turns clipping off")
    batch_size: int = Field(default=16, ge=1, description="rows per optimizer step")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step (at least)")
    micro_batch_tokens: int = Field(default=2048, ge=0, description="most padded tokens per forward pass; 0: no cap")
    max_length: int = Field(default=512, ge=2, description="most tokens of prompt + reference")
    seed: int = 10
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="auto: the student's saved dtype")
    fused_head: bool = Field(default=True, description="loss from hidden states, a chunk of tokens at a time (no full logits)")
    gradient_checkpointing: bool = False
    eval_file: Optional[str] = None
    eval_max_new_tokens: int = Field(default=256, ge=1)
    max_steps: Optional[int] = Field(default=None, ge=1, description="at most this many optimizer steps per stage")
    log_every: int = Field(default=10, ge=1)
    stop_after_stage: Optional[int] = Field(default=None, ge=0)
    overwrite: bool = False

    @model_validator(mode="before")
    @classmethod
    def _epochs_as_text(cls, values: Any) -> Any:
        # Accept 8, "8", "8,8,4" or [8, 8, 4]; store one normalised string.
        if isinstance(values, dict) and values.get("epochs") is not None:
            parsed = parse_epochs(values["epochs"])
            values = {**values, "epochs": ",".join(map(str, parsed)) if isinstance(parsed, tuple) else str(parsed)}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
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

    @property
    def baseline_epochs(self) -> int:
        return int(self.epochs) if self.epochs is not None else BASELINE_EPOCHS


def build_settings(settings: TrainSettings | dict[str, Any] | None = None, **overrides: Any) -> TrainSettings:
    """Validate settings with readable errors (one line per problem).

    Example:
        >>> build_settings(teacher="t", student="s", output="o", data="d.jsonl", lr=3e-4).lr
        0.0003
    """
    values = settings.model_dump() if isinstance(settings, TrainSettings) else dict(settings or {})
    values.update({k: v for k, v in overrides.items()})
    try:
        return TrainSettings.model_validate(values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            if not e["loc"]:  # a rule about several settings together: the message says it all
                problems.append(f"  {e['msg'].removeprefix('Value error, ')}")
                continue
            got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
            problems.append(f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}{got}")
        raise TrainingSetupError("invalid training settings:\n" + "\n".join(problems)) from None
    except ScheduleError as err:
        raise TrainingSetupError(str(err)) from None


@dataclass(frozen=True)
class StagePlan:
    """One stage to train: which rows, how long, with which loss mix."""

    index: int
    data_file: Path
    epochs: int
    kd_ratio: float
    temperature: float


# ======================================================================================
# Data: files -> prompt/reference strings -> token ids -> padded batches
# ======================================================================================


def read_pairs(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, int]:
    """Read ``prompt_text``/``reference_text`` pairs from a parquet/jsonl/json file.

    Columns ``prompt``/``response`` or ``prompt``/``completion`` are accepted too. Rows
    that srdata flagged as invalid (``invalid_reason`` set) are left out; their count is
    returned alongside the pairs. Any other missing prompt or reference is an error.

    Example:
        >>> pairs, flagged = read_pairs("runs/dolly/annotated.parquet")   # doctest: +SKIP
        >>> pairs.columns                                                  # doctest: +SKIP
        ['prompt_text', 'reference_text']
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingSetupError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pl.read_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        frame = pl.read_ndjson(path)
    elif suffix == ".json":
        frame = _read_json_rows(path)
    else:
        raise TrainingSetupError(f"data file {path} must be .parquet, .jsonl or .json")
    columns = next(((p, r) for p, r in TEXT_COLUMN_PAIRS if p in frame.columns and r in frame.columns), None)
    if columns is None:
        wanted = ", ".join(f"{p}/{r}" for p, r in TEXT_COLUMN_PAIRS)
        raise TrainingSetupError(
            f"data file {path} has no prompt/reference columns (looked for {wanted}); it has: "
            f"{', '.join(frame.columns) or 'no columns'}. Score raw data with `srdata score` to get prompt_text/reference_text"
        )
    flagged = 0
    if "invalid_reason" in frame.columns:
        valid = frame["invalid_reason"].is_null()
        flagged = int((~valid).sum())
        frame = frame.filter(valid)
    pairs = frame.select(pl.col(columns[0]).alias("prompt_text"), pl.col(columns[1]).alias("reference_text"))
    missing = pairs.with_row_index("row").filter(pl.col("prompt_text").is_null() | pl.col("reference_text").is_null())
    if missing.height:
        rows = ", ".join(str(r) for r in missing["row"].head(10).to_list())
        raise TrainingSetupError(f"data file {path}: {missing.height} row(s) have no prompt or reference (rows {rows}); fix or drop them")
    if pairs.height == 0:
        raise TrainingSetupError(f"data file {path} holds no usable rows")
    return pairs, flagged


def _read_json_rows(path: Path) -> pl.DataFrame:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        return pl.read_ndjson(path)  # a .json file that is really JSON lines
    if not isinstance(rows, list):
        raise TrainingSetupError(f"{path} must hold a JSON list of objects (or JSON lines)")
    return pl.DataFrame(rows)


@dataclass(frozen=True)
class EncodingSettings:
    """The prompt/reference encoding of the source run (see :func:`srdata.encode_pairs`)."""

    max_prompt_tokens: int
    max_reference_tokens: Optional[int]
    truncation_side: str
    add_special_tokens: bool  # False for chat-template prompts, which carry their own
    rouge_tokenizer: str
    source: str  # the manifest it came from, or "srdata defaults"

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_encoding_settings(data_path: str | os.PathLike[str], echo: Callable[[str], None] = log.info) -> EncodingSettings:
    """The encoding the source ``srdata score`` run used, read from its ``manifest.json``.

    ``data_path`` is a curriculum folder (its ``curriculum.json`` names the source run;
    ``srdata export``'s default output sits inside the run folder, which is tried next) or
    a data file (an ``annotated.parquet`` has the manifest beside it). Without a manifest,
    srdata's defaults are used, and the fact is reported.

    Example:
        >>> find_encoding_settings("runs/dolly/curriculum").truncation_side   # doctest: +SKIP
        'left'
    """
    from srdata.config import MetricsConfig, PromptConfig

    path = Path(data_path)
    candidates: list[Path] = []
    if path.is_dir():
        summary_file = path / CURRICULUM_FILE
        if summary_file.is_file():
            run_dir = (json.loads(summary_file.read_text(encoding="utf-8")).get("source") or {}).get("run_dir")
            if run_dir:
                candidates.append(Path(run_dir) / MANIFEST_FILE)
        candidates.append(path.parent / MANIFEST_FILE)
    else:
        candidates.append(path.parent / MANIFEST_FILE)
    for manifest_path in candidates:
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        prompt = (manifest.get("config") or {}).get("prompt")
        if not isinstance(prompt, dict):
            continue  # not a manifest of `srdata score`
        defaults = PromptConfig()
        metrics = (manifest.get("config") or {}).get("metrics") or {}
        return EncodingSettings(
            max_prompt_tokens=int(prompt.get("max_prompt_tokens", defaults.max_prompt_tokens)),
            max_reference_tokens=prompt.get("max_reference_tokens", defaults.max_reference_tokens),
            truncation_side=prompt.get("truncation_side", defaults.truncation_side),
            add_special_tokens=manifest.get("template") != "chat",
            rouge_tokenizer=metrics.get("rouge_tokenizer", MetricsConfig().rouge_tokenizer),
            source=str(manifest_path),
        )
    defaults = PromptConfig()
    echo(f"no srdata manifest.json found for {path}; encoding with srdata's defaults "
         f"(max_prompt_tokens={defaults.max_prompt_tokens}, max_reference_tokens={defaults.max_reference_tokens}, "
         f"truncation_side={defaults.truncation_side})")
    return EncodingSettings(
        defaults.max_prompt_tokens, defaults.max_reference_tokens, defaults.truncation_side, True,
        MetricsConfig().rouge_tokenizer, "srdata defaults",
    )


@dataclass(frozen=True)
class Example:
    """One training sequence: ``prompt + reference`` ids, cut to ``max_length``."""

    input_ids: list[int]
    prompt_length: int

    @property
    def scored_tokens(self) -> int:
        # Targets are input_ids[1:]; a reference token at position 0 (empty prompt) has no prediction.
        return len(self.input_ids) - max(self.prompt_length, 1)


@dataclass
class EncodedData:
    examples: list[Example]
    prompt_ids: list[list[int]]  # the (truncated) prompts, for generation at evaluation
    references: list[str]
    dropped_rows: int  # prompt fills max_length: no reference token left to learn from
    cut_rows: int  # reference cut by max_length


def encode_data(pairs: pl.DataFrame, tokenizer: Any, encoding: EncodingSettings, max_length: int) -> EncodedData:
    """Token ids of every pair by srdata's rules (:func:`srdata.encode_pairs`), cut to ``max_length``."""
    from srdata.steps.prompts import chat_affixes
    from srdata.steps.tokenize import encode_pairs

    prompts, references = pairs["prompt_text"].to_list(), pairs["reference_text"].to_list()
    keep = ("", "") if encoding.add_special_tokens or not getattr(tokenizer, "chat_template", None) else chat_affixes(tokenizer)
    encoded = []
    for start in range(0, len(prompts), 4096):  # bounded tokenizer batches for large files
        encoded += encode_pairs(
            tokenizer,
            prompts[start : start + 4096],
            references[start : start + 4096],
            max_prompt_tokens=encoding.max_prompt_tokens,
            max_reference_tokens=encoding.max_reference_tokens,
            truncation_side=encoding.truncation_side,  # type: ignore[arg-type]
            add_special_tokens=encoding.add_special_tokens,
            keep=keep,
        )
    data = EncodedData([], [], [], 0, 0)
    for pair, reference in zip(encoded, references):
        ids = (pair.prompt_ids + pair.reference_ids)[:max_length]
        example = Example(ids, len(pair.prompt_ids))
        if example.scored_tokens < 1:
            data.dropped_rows += 1
            continue
        data.cut_rows += len(pair.prompt_ids) + len(pair.reference_ids) > max_length
        data.examples.append(example)
        data.prompt_ids.append(pair.prompt_ids)
        data.references.append(reference)
    return data


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, width), right-padded
    attention_mask: torch.Tensor  # 1 = real token
    response_mask: torch.Tensor  # 1 = reference token (end-of-sequence included)
    scored_tokens: int


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-pad a list of examples into tensors (positions equal those of unpadded runs)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        response_mask[row, example.prompt_length : n] = True
    return Batch(
        input_ids.to(device), attention_mask.to(device), response_mask.to(device), sum(e.scored_tokens for e in examples)
    )


def split_rows(rows: Sequence[int], parts: int) -> list[list[int]]:
    """Split one step's rows into ``parts`` near-equal micro-batches (none empty).

    Example:
        >>> split_rows([1, 2, 3, 4, 5], 2)
        [[1, 2, 3], [4, 5]]
    """
    parts = min(parts, len(rows))
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        out.append(list(rows[start:stop]))
        start = stop
    return out


# ======================================================================================
# Models: loading, the shared-tokenizer check, precision
# ======================================================================================


def load_tokenizer(name: str, role: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(
            f"could not load the {role}'s tokenizer from {name!r}: pass a folder saved with save_pretrained "
            f"(model and tokenizer) or a reachable hub id ({err})"
        ) from err


def output_vocab_size(name: str, role: str) -> int:
    """Rows of the model's output layer (``config.vocab_size``), read without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"could not load the {role}'s config from {name!r} ({err})") from err
    size = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if size is None:
        raise TrainingSetupError(f"the {role} config of {name!r} has no vocab_size")
    return int(size)


def check_same_tokenizer(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    probe_texts: Sequence[str] = (),
    teacher_vocab_rows: Optional[int] = None,
    student_vocab_rows: Optional[int] = None,
) -> int:
    """Refuse a teacher/student pair that does not share one tokenizer; return the shared vocabulary size.

    KD compares the two next-token distributions entry by entry, so token id ``i`` must
    mean the same string in both models. Checked: the vocabularies (token -> id), the
    end-of-sequence id, the ids of ``probe_texts`` (same merges and normalisation), and
    that each model's output layer covers the vocabulary. Output layers may be *larger*
    than the tokenizer (padded embedding matrices): logits are sliced to the shared size.

    Example:
        >>> check_same_tokenizer(tok, tok, ["hello"], 512, 512)   # doctest: +SKIP
        512
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
        only_student = sorted(set(student_vocab) - set(teacher_vocab))
        moved = sorted(t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t])
        details = []
        if only_teacher:
            details.append(f"{len(only_teacher)} token(s) only in the teacher's, e.g. {only_teacher[:3]!r}")
        if only_student:
            details.append(f"{len(only_student)} token(s) only in the student's, e.g. {only_student[:3]!r}")
        if moved:
            t = moved[0]
            details.append(f"{len(moved)} token(s) with other ids, e.g. {t!r}: teacher {teacher_vocab[t]}, student {student_vocab[t]}")
        raise TokenizerMismatchError(
            f"teacher and student vocabularies differ (teacher {len(teacher_vocab)} tokens, student "
            f"{len(student_vocab)}): {'; '.join(details)}. White-box KD compares the two next-token "
            "distributions token by token, so both models must use the same tokenizer (same family, e.g. "
            "GPT-2 1.5B -> GPT-2 120M, Qwen2.5-7B -> Qwen2.5-0.5B)"
        )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise TokenizerMismatchError(
            f"teacher and student end-of-sequence tokens differ (teacher {teacher_tokenizer.eos_token!r} = "
            f"{teacher_tokenizer.eos_token_id}, student {student_tokenizer.eos_token!r} = {student_tokenizer.eos_token_id}); "
            "the reference is scored with one end-of-sequence id, so they must agree"
        )
    for text in probe_texts:
        a = teacher_tokenizer(text, add_special_tokens=True)["input_ids"]
        b = student_tokenizer(text, add_special_tokens=True)["input_ids"]
        if a != b:
            raise TokenizerMismatchError(
                f"teacher and student tokenizers share a vocabulary but encode text differently (other merges, "
                f"normalisation or special tokens), e.g. {text[:60]!r}: teacher {a[:12]}..., student {b[:12]}...; "
                "use the same tokenizer for both models"
            )
    shared = len(student_tokenizer)
    for role, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows)):
        if rows is not None and rows < shared:
            raise TokenizerMismatchError(
                f"the {role} model's output layer has {rows} rows but the tokenizer has {shared} tokens; "
                "the model cannot predict every token id of the data"
            )
    return shared


# ======================================================================================
# Loss on one batch
# ======================================================================================


@dataclass(frozen=True)
class LossSpec:
    """Which divergence, at which temperature and mix, and how: everything the objective needs."""

    loss: str
    temperature: float
    kd_ratio: float
    t2_scaling: str
    vocab_size: int  # the shared tokenizer size; padded output rows are sliced off
    student_head: Optional[HeadPlan] = None  # both fused: the loss is computed from hidden states
    teacher_head: Optional[HeadPlan] = None

    @property
    def fused(self) -> bool:
        return bool(self.student_head and self.student_head.fused and self.teacher_head and self.teacher_head.fused)


def batch_objective(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch, spec: LossSpec, precision: contextlib.AbstractContextManager
) -> Any:
    """``(1 - kd_ratio) * CE + kd_ratio * D_T`` on one batch; returns ``kd_objective``'s output.

    Fused (the default where both models allow it, see :mod:`srd_distill.fused_head`): the
    models stop at their last hidden states and the LM heads are applied a chunk of scored
    positions at a time inside the loss. Otherwise: full logits, then the chunked loss.
    """
    ids, attention = batch.input_ids, batch.attention_mask
    args = (spec.loss, spec.temperature, spec.kd_ratio, spec.t2_scaling)
    if spec.fused:
        rows, cols = batch.response_mask[:, 1:].nonzero(as_tuple=True)  # hidden state t predicts token t + 1
        with torch.inference_mode(), precision:  # the teacher is a fixed target: no graph, no gradient
            teacher_hidden = base_hidden_states(teacher, ids, attention)[rows, cols]
        with precision:
            student_hidden = base_hidden_states(student, ids, attention)[rows, cols]
        return fused_kd_objective(student_hidden, head_weights(student, spec.student_head), teacher_hidden,
                                  head_weights(teacher, spec.teacher_head), ids[:, 1:][rows, cols], *args, vocab_size=spec.vocab_size)  # type: ignore[arg-type]
    with torch.inference_mode(), precision:
        teacher_logits = teacher(input_ids=ids, attention_mask=attention, use_cache=False).logits
    with precision:
        student_logits = student(input_ids=ids, attention_mask=attention, use_cache=False).logits
    vocab = spec.vocab_size
    s, t, targets, mask = shift_for_next_token(student_logits[..., :vocab], teacher_logits[..., :vocab], ids, batch.response_mask)
    return kd_objective(s, t, targets, mask, *args)  # type: ignore[arg-type]


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0.

    The cosine part is transformers' ``get_cosine_schedule_with_warmup``; warm-up starts
    at ``peak_lr / warmup_steps`` rather than 0, so no step is wasted at lr 0.

    Example:
        >>> [round(learning_rate(s, 4, 1.0), 3) for s in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and norm gains), as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


# ======================================================================================
# Evaluation
# ======================================================================================


def evaluate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    data: EncodedData,
    spec: LossSpec,
    *,
    batch_size: int,
    max_new_tokens: int,
    rouge_tokenizer: str,
    pad_id: int,
    device: torch.device,
    precision: contextlib.AbstractContextManager,
) -> dict[str, float]:
    """Held-out objective (token-weighted means) and mean ROUGE-L of greedy answers.

    Generation goes through srdata's HF backend (greedy, stops at end-of-sequence), the
    code that produced the student outputs of ``srdata score``; ROUGE-L is
    :func:`srdata.rouge_l`, identical to ``rouge-score`` with stemming.
    """
    from srdata.backends.base import GenerationParams
    from srdata.backends.hf import HFBackend
    from srdata.steps.rouge import rouge_l
    from srdata.steps.tokenize import resolve_eos_id

    student.eval()
    sums = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(data.examples), batch_size):
            batch = collate(data.examples[start : start + batch_size], pad_id, device)
            out = batch_objective(student, teacher, batch, spec, precision)
            for key, value in zip(("loss", "ce_loss", "kd_loss"), out):
                sums[key] += float(value) * batch.scored_tokens
            tokens += batch.scored_tokens
        backend = HFBackend(student, tokenizer, batch_size=batch_size)
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=(resolve_eos_id(tokenizer),))
        with precision:
            answers = backend.generate(data.prompt_ids, params)
    scores = rouge_l([a.text for a in answers], data.references, tokenizer=rouge_tokenizer)  # type: ignore[arg-type]
    student.train()
    result = {key: value / max(tokens, 1) for key, value in sums.items()}
    result["eval_rouge_l"] = sum(scores) / len(scores)
    return result


# ======================================================================================
# The run folder: run.json, metrics.jsonl, stage checkpoints
# ======================================================================================


def write_json_atomic(path: Path, payload: Any) -> None:
    from srdata.run.io import write_json_atomic as write

    write(path, payload)


def stage_folder(run_dir: Path, stage: int) -> Path:
    return run_dir / f"stage-{stage}"


def partial_folder(run_dir: Path, stage: int) -> Path:
    return run_dir / f".stage-{stage}.partial"


def is_finished(run_dir: Path, stage: int) -> bool:
    """A stage is finished when its folder exists: it only appears by an atomic rename."""
    return (stage_folder(run_dir, stage) / STAGE_INFO_FILE).is_file()


def prepare_run_folder(
    run_dir: Path, settings: TrainSettings, run_record: dict[str, Any], n_stages: int, echo: Callable[[str], None]
) -> tuple[set[int], float]:
    """Check or create the run folder; return the finished stages and the elapsed time so far.

    Refuses a folder holding a run with other (result-changing) settings unless
    ``overwrite``. Cleans what an interrupted stage left: its partial checkpoint folder and
    its metrics lines.
    """
    # Only names this module writes: an --overwrite never touches anything else in the folder.
    ours = [run_dir / RUN_FILE, run_dir / METRICS_FILE]
    if run_dir.is_dir():
        ours += [p for p in run_dir.iterdir() if p.is_dir() and (STAGE_FOLDER_PATTERN.fullmatch(p.name) or PARTIAL_FOLDER_PATTERN.fullmatch(p.name))]
    previous_path = run_dir / RUN_FILE
    if settings.overwrite:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif previous_path.is_file():
        previous = json.loads(previous_path.read_text(encoding="utf-8"))
        differences = diff_settings(previous.get("settings", {}), run_record["settings"])
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
    elapsed = _keep_metrics_of(run_dir / METRICS_FILE, finished)
    if finished:
        echo(f"resuming {run_dir}: stage(s) {', '.join(map(str, sorted(finished)))} already finished")
    return finished, elapsed


def _keep_metrics_of(metrics_path: Path, finished: set[int]) -> float:
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
    from srdata.run.io import atomic_path

    with atomic_path(metrics_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return max((float(r.get("elapsed", 0.0)) for r in kept), default=0.0)


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every result-changing setting that differs (the rule shared with ``srdata score``)."""
    defaults = {k: f.default for k, f in TrainSettings.model_fields.items()}
    return run_folder.diff_settings(old, new, ignore=RESUMABLE_WITH_OTHER_VALUES, defaults=defaults)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at once."""

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


# ======================================================================================
# Planning: stages and their files
# ======================================================================================


def curriculum_stage_files(curriculum_dir: Path, n_stages: int, schedule_name: str) -> list[Path]:
    """The stage files a schedule of ``n_stages`` stages trains on, checked to exist.

    The names come from ``curriculum.json`` (as ``srdata export`` writes it); without it,
    ``stage-K.parquet`` / ``stage-K.jsonl`` files are looked up directly.
    """
    if not curriculum_dir.is_dir():
        raise CurriculumFilesError(
            f"curriculum folder {curriculum_dir} does not exist; create it with `srdata export RUN_DIR --out {curriculum_dir}`"
        )
    summary_path = curriculum_dir / CURRICULUM_FILE
    if not summary_path.is_file() and (curriculum_dir / "manifest.json").is_file():
        exported = curriculum_dir / "curriculum"
        hint = (f"its export is {exported}: pass --curriculum {exported}" if (exported / CURRICULUM_FILE).is_file()
                else f"export it first with `srdata export {curriculum_dir}`, then pass --curriculum {exported}")
        raise CurriculumFilesError(f"{curriculum_dir} is a scoring run, not a curriculum; {hint}")
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        listed = [curriculum_dir / s["file"] for s in sorted(summary.get("stages", []), key=lambda s: s["stage"])]
        source = f"listed in {summary_path}"
    else:
        listed = []
        for s in range(max(n_stages, _highest_stage_file(curriculum_dir) + 1)):
            found = [p for p in (curriculum_dir / f"stage-{s}.parquet", curriculum_dir / f"stage-{s}.jsonl") if p.is_file()]
            listed.append(found[0] if found else curriculum_dir / f"stage-{s}.parquet")
        source = f"expected in {curriculum_dir} ({CURRICULUM_FILE} is absent)"
    missing = [p.name for p in listed[:n_stages] if not p.is_file()]
    if len(listed) < n_stages:
        missing += [f"stage-{s}.parquet" for s in range(len(listed), n_stages)]
    if missing:
        raise CurriculumFilesError(
            f"curriculum {curriculum_dir} is missing {', '.join(missing)} ({source}); schedule {schedule_name!r} "
            f"trains {n_stages} stages on stage-0 ... stage-{n_stages - 1}. Re-export with `srdata export RUN_DIR "
            f"--keep {n_stages} --out {curriculum_dir}`, or choose a schedule with as many stages as the curriculum"
        )
    if len(listed) > n_stages:
        raise CurriculumFilesError(
            f"curriculum {curriculum_dir} has {len(listed)} stages but schedule {schedule_name!r} has {n_stages}; "
            f"use a schedule with {len(listed)} stages (e.g. pocl for 4) or export with --keep {n_stages}"
        )
    return listed


def _highest_stage_file(folder: Path) -> int:
    numbers = [int(p.stem.split("-", 1)[1]) for p in folder.glob("stage-*.*") if p.stem.split("-", 1)[1].isdigit()]
    return max(numbers, default=-1)


def plan_stages(settings: TrainSettings) -> tuple[list[StagePlan], Schedule]:
    """The stages of this run: one per schedule stage (curriculum) or one on all data (baseline)."""
    try:
        schedule = load_schedule(settings.schedule)
        if settings.curriculum is not None:
            schedule = with_epochs(schedule, settings.epochs)
    except ScheduleError as err:
        raise TrainingSetupError(str(err)) from None
    if settings.data is not None:
        first = schedule.stages[0]
        stage = Stage(
            epochs=settings.baseline_epochs,
            kd_ratio=first.kd_ratio if settings.kd_ratio is None else settings.kd_ratio,
            temperature=first.temperature if settings.temperature is None else settings.temperature,
        )
        return [StagePlan(0, Path(settings.data), stage.epochs, stage.kd_ratio, stage.temperature)], schedule
    files = curriculum_stage_files(Path(settings.curriculum), len(schedule.stages), schedule.name)  # type: ignore[arg-type]
    plans = [StagePlan(i, f, s.epochs, s.kd_ratio, s.temperature) for i, (f, s) in enumerate(zip(files, schedule.stages))]
    return plans, schedule


# ======================================================================================
# One stage
# ======================================================================================


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


@dataclass
class RunContext:
    """What every stage shares: settings, models' common pieces, files, logging."""

    settings: TrainSettings
    run_dir: Path
    teacher: Optional[torch.nn.Module]  # None only when no stage is left to train
    tokenizer: Any
    vocab_size: int
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    encoding: EncodingSettings
    eval_data: Optional[EncodedData]
    metrics: MetricsLog
    progress: bool
    echo: Callable[[str], None]
    n_stages: int = 1
    teacher_head: Optional[HeadPlan] = None  # None: the fused head is off (--no-fused-head)
    save_dtype: Optional[torch.dtype] = None  # checkpoints are written in it (the student's saved dtype)
    global_step: int = 0
    stage_records: list[dict[str, Any]] = field(default_factory=list)


def train_stage(ctx: RunContext, plan: StagePlan, start_from: str | Path) -> StageResult:
    """Train one stage from ``start_from`` and save ``RUN/stage-N`` atomically."""
    s = ctx.settings
    teacher = ctx.teacher
    assert teacher is not None, "train() loads the teacher whenever a stage is left to train"
    started = time.perf_counter()
    torch.manual_seed(s.seed + plan.index)  # stage s uses seed + s: a resumed stage repeats exactly
    shuffle = torch.Generator().manual_seed(s.seed + plan.index)

    pairs, flagged = read_pairs(plan.data_file)
    data = encode_data(pairs, ctx.tokenizer, ctx.encoding, s.max_length)
    if not data.examples:
        raise TrainingSetupError(f"{plan.data_file}: no row has a reference token within max_length={s.max_length}")
    student = load_model(start_from, ctx.device, torch.float32, "student")  # float32 master weights
    check_context(student, teacher, max(len(e.input_ids) for e in data.examples))
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    student_head = plan_lm_head(student, ctx.vocab_size, "student") if ctx.teacher_head is not None else None
    optimizer = make_optimizer(student, s.lr, s.weight_decay, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
    precision = autocast_context(ctx.device, ctx.dtype)
    spec = LossSpec(s.loss, plan.temperature, plan.kd_ratio, s.t2_scaling, ctx.vocab_size, student_head, ctx.teacher_head)
    factor = t2_factor(s.loss, plan.temperature, s.t2_scaling)
    params = [p for p in student.parameters() if p.requires_grad]

    n_rows = len(data.examples)
    steps_per_epoch = math.ceil(n_rows / s.batch_size)
    total_steps = plan.epochs * steps_per_epoch if s.max_steps is None else min(plan.epochs * steps_per_epoch, s.max_steps)
    notes = [f"{flagged} flagged rows left out"] * bool(flagged) + [
        f"{data.dropped_rows} rows without room for a reference token left out"] * bool(data.dropped_rows)
    notes += ["loss from hidden states (fused LM head)" if spec.fused else "loss from full logits" + (
        f": {next(h.reason for h in (ctx.teacher_head, student_head) if h is not None and not h.fused)}" if ctx.teacher_head else " (--no-fused-head)")]
    notes += ["gradient checkpointing"] * s.gradient_checkpointing
    ctx.echo(stage_banner(plan.index, ctx.n_stages, rows=n_rows, file_name=plan.data_file.name, epochs=plan.epochs, steps=total_steps,
                          kd_ratio=plan.kd_ratio, temperature=plan.temperature, t2_factor=factor, notes=notes))
    partial = partial_folder(ctx.run_dir, plan.index)
    best_rouge: Optional[float] = None
    best_epoch: Optional[int] = None
    last_epoch = 0  # the last epoch that trained at least one step
    step = 0
    window = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "tokens": 0}
    stage_keys = {"stage": plan.index, "temperature": plan.temperature, "kd_ratio": plan.kd_ratio, "t2_factor": factor}
    bar = StageProgress(plan.index, ctx.n_stages, total_steps=total_steps, t2_factor=factor, enabled=ctx.progress)

    for epoch in range(plan.epochs):
        if step >= total_steps:
            break
        order = torch.randperm(n_rows, generator=shuffle).tolist()  # shuffled within the stage
        for batch_start in range(0, n_rows, s.batch_size):
            if step >= total_steps:
                break
            lr = learning_rate(step, total_steps, s.lr, s.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # One optimizer step over batch_size rows, in grad_accum micro-batches or more
            # (each at most micro_batch_tokens padded tokens). Each micro-batch's token-mean
            # loss is weighted by its share of the step's scored tokens, so the gradient is
            # that of the token mean over the whole step.
            rows = order[batch_start : batch_start + s.batch_size]
            step_tokens = sum(data.examples[i].scored_tokens for i in rows)
            means = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}  # this step's token means
            width = max(len(data.examples[i].input_ids) for i in rows)
            for micro_rows in split_rows(rows, max(s.grad_accum, micro_batch_count(len(rows), width, s.micro_batch_tokens))):
                batch = collate([data.examples[i] for i in micro_rows], ctx.pad_id, ctx.device)
                out = batch_objective(student, teacher, batch, spec, precision)
                share = batch.scored_tokens / step_tokens
                scaler.scale(out.loss * share).backward()
                for key, value in zip(("loss", "ce_loss", "kd_loss"), out):
                    means[key] += float(value.detach()) * share
            scaler.unscale_(optimizer)
            if s.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ctx.global_step += 1
            for key, value in means.items():
                window[key] += value * step_tokens
            window["tokens"] += step_tokens
            bar.step(**means, kd_unscaled=means["kd_loss"] / factor, tokens=sum(len(data.examples[i].input_ids) for i in rows))

            if step % s.log_every == 0 or step == total_steps:
                n = max(window["tokens"], 1)
                record = {
                    "event": "train", **stage_keys, "epoch": epoch, "step": step, "global_step": ctx.global_step,
                    "loss": window["loss"] / n, "kd_loss": window["kd_loss"] / n, "ce_loss": window["ce_loss"] / n,
                    "kd_unscaled": window["kd_loss"] / n / factor, "lr": lr, "grad_norm": grad_norm, "tokens": window["tokens"],
                }
                ctx.metrics.write(record)
                window = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "tokens": 0}

        last_epoch = epoch
        # End of an epoch (or of the step budget): evaluate and keep the best weights.
        if ctx.eval_data is not None:
            scores = evaluate(
                student, teacher, ctx.tokenizer, ctx.eval_data, spec,
                batch_size=s.batch_size, max_new_tokens=s.eval_max_new_tokens,
                rouge_tokenizer=ctx.encoding.rouge_tokenizer, pad_id=ctx.pad_id, device=ctx.device, precision=precision,
            )
            improved = best_rouge is None or scores["eval_rouge_l"] > best_rouge
            ctx.metrics.write({
                "event": "eval", **stage_keys, "epoch": epoch, "step": step, "global_step": ctx.global_step,
                **scores, "kd_unscaled": scores["kd_loss"] / factor, "lr": lr, "best": improved,
            })
            bar.write(f"stage {plan.index} epoch {epoch}: eval ROUGE-L {scores['eval_rouge_l']:.4f}, "
                      f"eval loss {scores['loss']:.4f}" + (" (best so far)" if improved else ""), ctx.echo)
            if improved:
                best_rouge, best_epoch = scores["eval_rouge_l"], epoch
                save_checkpoint(student, ctx.tokenizer, partial, dtype=ctx.save_dtype)
    bar.close()

    if ctx.eval_data is None:  # no eval file: keep the last weights
        best_epoch = last_epoch
        save_checkpoint(student, ctx.tokenizer, partial, dtype=ctx.save_dtype)
    result = StageResult(plan.index, stage_folder(ctx.run_dir, plan.index), n_rows, step, best_epoch, best_rouge,
                         round(time.perf_counter() - started, 3))
    info = {
        "stage": plan.index, "data_file": str(plan.data_file), "rows": n_rows, "flagged_rows_left_out": flagged,
        "rows_without_reference_room": data.dropped_rows, "rows_cut_to_max_length": data.cut_rows,
        "epochs": plan.epochs, "steps": step, "kd_ratio": plan.kd_ratio, "temperature": plan.temperature,
        "loss": s.loss, "t2_scaling": s.t2_scaling, "started_from": str(start_from), "kept_epoch": best_epoch,
        "best_eval_rouge_l": best_rouge, "seconds": result.seconds, "fused_head": spec.fused,
    }
    write_json_atomic(partial / STAGE_INFO_FILE, info)
    os.replace(partial, result.checkpoint)  # the stage is finished the moment this rename lands
    ctx.echo(stage_done(plan.index, step, result.seconds, result.checkpoint, peak_memory_text(ctx.device)))
    ctx.stage_records.append(info)
    del student, optimizer
    return result


def check_context(student: torch.nn.Module, teacher: torch.nn.Module, longest: int) -> None:
    """Refuse sequences longer than a model's position table (they would fail deep inside the forward pass)."""
    for role, model in (("student", student), ("teacher", teacher)):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(context, int) and longest > context:
            raise TrainingSetupError(f"the longest training sequence has {longest} tokens but the {role} takes at most "
                                     f"{context} positions; pass --max-length {context} (or less)")


# ======================================================================================
# The run
# ======================================================================================


@dataclass
class TrainResult:
    """Where a run's outputs are."""

    output: Path
    stages: list[StageResult]
    metrics_path: Path
    run_path: Path
    complete: bool  # False when stop_after_stage ended the run early


def train(
    settings: TrainSettings | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` over the curriculum stages (or the full data).

    Settings are a :class:`TrainSettings`, a dict, keyword arguments named like its
    fields, or a mix (keywords win). See the module docstring for what is written where.

    Example:
        >>> train(teacher="./teacher", student="./student", curriculum="runs/a/curriculum",
        ...       output="runs/kd", schedule="paper-gpt2", epochs=2, eval_file="dev.jsonl")  # doctest: +SKIP
    """
    say = echo or log.info
    s = build_settings(settings, **overrides)
    run_dir = Path(s.output)

    # 1. Plan: stages, files, encoding. Everything that can fail without a model fails here.
    plans, schedule = plan_stages(s)
    encoding = find_encoding_settings(s.curriculum if s.curriculum is not None else s.data, echo=say)  # type: ignore[arg-type]
    if s.eval_file is not None and not Path(s.eval_file).is_file():
        raise TrainingSetupError(f"eval file {s.eval_file} does not exist")
    device, dtype = resolve_precision(s.device, s.dtype)

    # 2. One tokenizer for both models, checked.
    tokenizer = load_tokenizer(s.student, "student")
    teacher_tokenizer = load_tokenizer(s.teacher, "teacher")
    probe = read_pairs(plans[0].data_file)[0].head(16)
    vocab_size = check_same_tokenizer(
        teacher_tokenizer, tokenizer, probe["prompt_text"].to_list() + probe["reference_text"].to_list(),
        output_vocab_size(s.teacher, "teacher"), output_vocab_size(s.student, "student"),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked anyway
    teacher_dtype, teacher_dtype_reason = resolve_teacher_dtype(s.teacher_dtype, saved_dtype(s.teacher), device, dtype)
    save_dtype = DTYPES[s.save_dtype] if s.save_dtype != "auto" else saved_dtype(s.student)
    eval_data = None
    if s.eval_file is not None:
        eval_data = encode_data(read_pairs(s.eval_file)[0], tokenizer, encoding, s.max_length)
        if not eval_data.examples:
            raise TrainingSetupError(f"eval file {s.eval_file}: no row has a reference token within max_length={s.max_length}")

    # 3. The run folder: resume what is finished, refuse what does not match.
    run_record: dict[str, Any] = {
        "format_version": 1,
        "mode": "curriculum" if s.curriculum is not None else "baseline",
        "settings": _recorded_settings(s),
        "schedule": {"name": schedule.name, "stages": [
            {"stage": p.index, "file": str(p.data_file), "epochs": p.epochs, "kd_ratio": p.kd_ratio, "temperature": p.temperature}
            for p in plans
        ]},
        "encoding": encoding.describe(),
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": vocab_size, "eos_token": tokenizer.eos_token},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "versions": _versions(),
    }
    finished, elapsed_before = prepare_run_folder(run_dir, s, run_record, len(plans), say)
    previous = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")) if (run_dir / RUN_FILE).is_file() else {}
    run_record["created_at"] = previous.get("created_at") or _now()
    run_record["stages_finished"] = [r for r in previous.get("stages_finished", []) if r.get("stage") in finished]
    run_record["status"] = "running"
    write_json_atomic(run_dir / RUN_FILE, run_record)

    # 4. Models: the teacher once, frozen (not at all when every stage is done); the
    # student is loaded per stage, from the previous stage's checkpoint.
    teacher, teacher_head = None, None
    if len(finished) < len(plans):
        teacher = load_model(s.teacher, device, teacher_dtype, "teacher")
        teacher.eval()
        teacher.requires_grad_(False)
        say(f"teacher in {str(teacher_dtype).removeprefix('torch.')} ({teacher_dtype_reason}); student weights in float32, "
            f"compute in {str(dtype).removeprefix('torch.')}, checkpoints in {str(save_dtype).removeprefix('torch.')}")
        teacher_head = plan_lm_head(teacher, vocab_size, "teacher") if s.fused_head else None
    metrics = MetricsLog(run_dir / METRICS_FILE, elapsed_before)
    ctx = RunContext(s, run_dir, teacher, tokenizer, vocab_size, pad_id, device, dtype, encoding, eval_data, metrics, progress, say,
                     len(plans), teacher_head, save_dtype)
    ctx.global_step = _steps_done(run_record["stages_finished"])

    # 5. The stages, in order.
    results: list[StageResult] = []
    complete = True
    current: Optional[int] = None  # the stage being trained
    try:
        for plan in plans:
            if plan.index in finished:
                info = json.loads((stage_folder(run_dir, plan.index) / STAGE_INFO_FILE).read_text(encoding="utf-8"))
                results.append(StageResult(plan.index, stage_folder(run_dir, plan.index), info["rows"], info["steps"],
                                           info.get("kept_epoch"), info.get("best_eval_rouge_l"), info["seconds"], skipped=True))
                continue
            if s.stop_after_stage is not None and plan.index > s.stop_after_stage:
                complete = False
                say(f"stopping before stage {plan.index} as asked (stop_after_stage={s.stop_after_stage}); rerun without it to continue")
                break
            start_from = s.student if plan.index == 0 else stage_folder(run_dir, plan.index - 1)
            current = plan.index
            results.append(train_stage(ctx, plan, start_from))
            current = None
            run_record["stages_finished"] += ctx.stage_records
            ctx.stage_records = []
            run_record["updated_at"] = _now()
            write_json_atomic(run_dir / RUN_FILE, run_record)
    except KeyboardInterrupt as interrupt:
        run_record.update(status="interrupted", updated_at=_now())
        write_json_atomic(run_dir / RUN_FILE, run_record)
        raise TrainingInterrupted(interrupted_message(run_dir, [r.stage for r in results], current)) from interrupt
    finally:
        metrics.close()
    run_record["status"] = "complete" if complete else "stopped"
    run_record["updated_at"] = _now()
    write_json_atomic(run_dir / RUN_FILE, run_record)
    return TrainResult(run_dir, results, run_dir / METRICS_FILE, run_dir / RUN_FILE, complete)


def _recorded_settings(s: TrainSettings) -> dict[str, Any]:
    """Settings as recorded in run.json: local paths made absolute, so a resume from another cwd matches."""
    values = s.model_dump()
    values["output"] = str(Path(values["output"]).resolve())
    for key in ("teacher", "student", "curriculum", "data", "eval_file"):
        if values.get(key) is not None and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    if values["schedule"] not in PRESETS and Path(values["schedule"]).exists():
        values["schedule"] = str(Path(values["schedule"]).resolve())
    return values


def _steps_done(records: Sequence[dict[str, Any]]) -> int:
    return sum(int(r.get("steps", 0)) for r in records)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("srdata", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
