"""One pydantic config tree describes a scoring run.

It is what ``--config FILE`` holds (YAML, TOML or JSON), what the CLI flags fill in, and
what ``manifest.json`` records. A config file may use the nested sections below or flat
keys named like the CLI flags (``max_new_tokens: 128``); each flat key is placed in the
section that owns it.

Example:
    >>> cfg = ScoreConfig.model_validate({"data": {"dataset": "d.jsonl"},
    ...                                   "model": {"model": "gpt2"}, "run": {"output": "out"}})
    >>> cfg.generation.max_new_tokens
    256
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from srdata.backends.registry import BackendName  # the registered backends' names (imports no backend)
from srdata.engines import EngineName  # the registered engines' names (imports no engine)
from srdata.curriculum.groups import DEFAULT_MAX_SHARE_RATIO, DEFAULT_MIN_GROUP_ROWS, GroupError, ShareCheck
from srdata.curriculum.cut import FORMATS, LAYOUTS, CurriculumError, Format, Layout, plan_stages
from srdata.steps.rank import DEFAULT_RRF_K, TIE_MODES, RankingError, RankKey, TieMode, parse_rank_by
from srdata.run.storage import STORAGE_OPTIONS_HELP  # remote storage (s3://...): options never recorded (secrets)
# Re-exported: settings files, readable validation errors and a command's settings are srdata.config_io's.
from srdata.config_io import (  # noqa: F401
    BOUNDS, ConfigFileError, command_settings, parse_config_file, setting_names, validation_problems,
)
from srdata.deprecation import renamed_property  # old attribute names (ModelConfig.model) keep working


class _Section(BaseModel):
    # A field with an alias (ModelConfig.path, EngineConfig.name) is read under either name and written under its
    # alias, so flags, config files, manifest.json and settings hashes keep the alias (``--model``, ``"model"``).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


#: ``json_schema_extra`` of a setting that changes speed, memory or logging but no output value:
#: a run may be resumed with another value of it (a smaller batch after running out of memory).
#: :func:`resumable_settings` lists them, for srdata's ScoreConfig and srd-distill's TrainSettings alike.
RESUMABLE: dict[str, Any] = {"resumable": True}


class DataConfig(_Section):
    dataset: str = Field(description="hub id, save_to_disk folder, or .jsonl/.json/.parquet/.csv file(s)")
    split: str = Field(default="train", description="Dataset split (hub datasets and save_to_disk folders).")
    prompt_column: Optional[str] = Field(default=None, description="Column with the instruction/prompt (auto-detected when omitted).")
    response_column: Optional[str] = Field(default=None, description="Column with the reference response (auto-detected when omitted).")
    input_column: Optional[str] = Field(default=None, description="Optional context/input column (alpaca's ### Input block).")
    messages_column: Optional[str] = Field(
        default=None, description="Column with chat messages (role/content turns; the last assistant turn is the reference). Auto-detected when omitted."
    )
    limit: Optional[int] = Field(default=None, ge=1, description="Score only the first N rows.")


class PromptConfig(_Section):
    template: Optional[str] = Field(
        default="auto",
        description="auto | alpaca | raw | chat | a format string with {column} fields; auto = chat when the tokenizer "
        "has a chat template (or the data holds chat messages), else alpaca.",
    )
    max_prompt_tokens: int = Field(default=256, ge=1, description="Longer prompts are truncated and flagged.")
    max_reference_tokens: Optional[int] = Field(default=256, ge=1, description="Longer references are cut and flagged.")
    truncation_side: Literal["left", "right"] = Field(
        default="left", description="left keeps the prompt's end (next to the answer); right keeps its start, as the SRD reference."
    )
    eos_token: Optional[str] = Field(default=None, description="End-of-sequence token to use when the tokenizer has none.")


class ModelConfig(_Section):
    path: str = Field(alias="model", description="The student: a folder saved with save_pretrained, or a hub id.")
    backend: BackendName = Field(default="auto", description="auto = vllm when importable and a GPU is visible, else hf.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="auto = bfloat16 on a GPU and on a CPU with AMX or AVX512-BF16, else float32 (srdata.backends.dtype).")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM: share of GPU memory for the engine (on a CPU build: of host RAM).",
        json_schema_extra=RESUMABLE,
    )
    max_model_len: Optional[int] = Field(default=None, ge=1, description="vLLM: context length of the engine.")
    max_num_batched_tokens: Optional[int] = Field(
        default=None, ge=1, description="vLLM: tokens per engine step (lower it if prompt log-probs run out of memory).",
        json_schema_extra=RESUMABLE,
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM: GPUs per model replica.")
    model = renamed_property("model", "path")  # the attribute's old name (its setting keeps it: --model)


class GenerationConfig(_Section):
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens the student generates.")
    no_repeat_ngram_size: Optional[int] = Field(default=None, ge=1, description="Ban repeated n-grams while generating (the SRD reference used 6).")


class BatchingConfig(_Section):
    batch_size: int = Field(default=64, ge=1, description="Most rows decoded together (prompts are prefilled in chunks).", json_schema_extra=RESUMABLE)
    token_budget: int = Field(default=16384, ge=1, description="Most padded tokens per forward pass.", json_schema_extra=RESUMABLE)
    shard_size: int = Field(default=1000, ge=1, description="Rows per resumable shard.")


#: Optional per-row signals (``--signals``) and the columns each one fills.
SIGNALS: dict[str, tuple[str, ...]] = {"ifd": ("ce_loss_uncond", "ifd", "pmi")}


class MetricsConfig(_Section):
    rouge_tokenizer: Literal["default", "unicode"] = Field(
        default="default", description="default = exactly rouge-score; unicode also scores non-Latin text (deviates from rouge-score)."
    )
    rrf_k: int = Field(default=DEFAULT_RRF_K, ge=0, description="Reciprocal rank fusion constant.")
    signals: list[str] = Field(
        default_factory=list,
        description="Extra per-row signals, comma-separated: ifd adds ce_loss_uncond (the reference's cross-entropy after "
        "the template's empty prompt), ifd (ce_loss / ce_loss_uncond) and pmi (nats the prompt saves on the reference), "
        "for `--rank-by noisy`; one more forward pass over the reference tokens. Off by default.",
        json_schema_extra={"metavar": "NAME,..."},
    )

    @field_validator("signals", mode="before")
    @classmethod
    def _known_signals(cls, value: Any) -> list[str]:
        """Accept ``"ifd"``, ``"ifd,..."`` or a list; refuse unknown names, naming the known ones."""
        if value is None:
            return []
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            raise ValueError(f"expected a comma-separated list of signal names, got {type(value).__name__}")
        cleaned = []
        for name in names:
            name = str(name).strip().lower()
            if not name or name == "none":
                continue
            if name not in SIGNALS:
                known = "; ".join(f"{key} (adds {', '.join(columns)})" for key, columns in SIGNALS.items())
                raise ValueError(f"unknown signal {name!r} in --signals; known signals: {known}")
            cleaned.append(name)
        return sorted(set(cleaned))  # a set of signals: order and repeats do not change the output


class RunConfig(_Section):
    output: str = Field(description="Run folder for annotated.parquet, manifest.json and shards/.", json_schema_extra=RESUMABLE)
    on_invalid: Literal["error", "skip", "flag"] = Field(
        default="error", description="What to do with rows that cannot be scored (null or empty prompt, ...)."
    )
    overwrite: bool = Field(default=False, description="Start over in an output folder that holds a run with other settings.", json_schema_extra=RESUMABLE)
    seed: int = Field(default=0, description="Random seed.")
    storage_options: Optional[str] = Field(default=None, exclude=True, description=STORAGE_OPTIONS_HELP, json_schema_extra={"metavar": "JSON"})


class EngineConfig(_Section):
    """Where the shards are scored: in this process, or by a pool of Ray actors (``srdata[ray]``)."""

    name: EngineName = Field(
        default="local", alias="engine", description="local = this process; ray = a pool of Ray actors (pip install 'srdata[ray]'). Same output either way.",
        json_schema_extra=RESUMABLE,
    )
    ray_address: Optional[str] = Field(
        default=None,
        description="Ray: cluster to join (auto, HOST:6379, ray://HOST:10001). Default: RAY_ADDRESS, else a Ray already "
        "running on this machine, else a new local one.",
        json_schema_extra=RESUMABLE,
    )
    num_replicas: Optional[int] = Field(default=None, ge=1, description="Ray: scoring actors, each holding one model. Default: as many as the cluster fits.", json_schema_extra=RESUMABLE)
    gpus_per_replica: float = Field(default=0, ge=0, description="Ray: GPUs per actor (vLLM: the tensor-parallel size).", json_schema_extra=RESUMABLE)
    cpus_per_replica: float = Field(default=1, gt=0, description="Ray: CPUs reserved per actor.", json_schema_extra=RESUMABLE)
    wait_for_resources: Optional[float] = Field(
        default=None, ge=0,
        description="Ray: seconds to wait for a node able to host a replica (an autoscaler adding one, a lost node "
        "coming back) before failing. Default: 300 on a cluster srdata joins, 0 on a Ray it starts itself.",
        json_schema_extra=RESUMABLE,
    )
    engine = renamed_property("engine", "name")  # the attribute's old name (its setting keeps it: --engine)


class ScoreConfig(_Section):
    data: DataConfig
    model: ModelConfig
    run: RunConfig
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    batching: BatchingConfig = BatchingConfig()
    metrics: MetricsConfig = MetricsConfig()
    engine: EngineConfig = EngineConfig()


RANK_BY_HELP = (
    "Columns fused by reciprocal rank fusion, each with a direction and optional weight, or a preset: paper "
    "(rouge_l:desc,ce_loss:asc), noisy (ifd:asc:2,ce_loss:asc,pmi:desc; needs `srdata score --signals ifd`) or "
    "teachable (teacher_ce_loss:asc:3,rouge_l:desc,ce_loss:asc; needs `srdata teach`)."
)
TIES_HELP = "input: ties by srd_id; reference: the authors' tools/rank.py order."


#: Each choice setting: its choices, what the message calls it, and the error it raises.
CHOICE_SETTINGS = {"layout": (LAYOUTS, "layout", CurriculumError), "format": (FORMATS, "format", CurriculumError),
                   "ties": (TIE_MODES, "ties mode", RankingError)}


def _known(value: Any, info: ValidationInfo) -> Any:
    """The library's own message for a value outside a ``Literal`` (the CLI's choices refuse it first)."""
    choices, what, error = CHOICE_SETTINGS[info.field_name]
    if isinstance(value, str) and value not in choices:
        raise error(f"unknown {what} {value!r}: use one of {', '.join(choices)}")
    return value


def _columns(value: Any) -> Any:
    """``by="template"`` is one column (a list of them stays as it is)."""
    return [value] if isinstance(value, str) else value


class ShareCheckConfig(_Section):
    """When a group's share of a stage or of the dropped part is warned about (``--by``, ``--stratify``)."""

    max_share_ratio: float = Field(
        default=DEFAULT_MAX_SHARE_RATIO,
        description="Warn when a group's share of a stage or of the dropped part is more than this many times, or "
        "less than 1/this of, its share of all ranked rows.",
    )
    min_group_rows: int = Field(
        default=DEFAULT_MIN_GROUP_ROWS,
        description="Groups with fewer ranked rows are listed but never warned about (chance moves small counts a lot).",
    )

    def share_check(self) -> ShareCheck:
        """The share-check settings, checked (a :class:`CurriculumError` names the bad one)."""
        try:
            return ShareCheck(self.max_share_ratio, self.min_group_rows)
        except GroupError as err:
            raise CurriculumError(str(err)) from None


class ExportConfig(ShareCheckConfig):
    """``srdata export``: how a scored run is cut into curriculum stages (recorded in curriculum.json)."""

    stages: Optional[int] = Field(default=None, description="Number of equal parts, easy to hard. Default: 4.")
    keep: Optional[int] = Field(default=None, description="Easiest parts kept as stages. Default: stages - 1.")
    layout: Layout = Field(default="cumulative", description="cumulative: stage s holds parts 0..s; disjoint: part s only.")
    fractions: Optional[list[float]] = Field(
        default=None,
        description="Uneven cuts: cumulative boundaries in (0, 1], e.g. 0.2,0.5,0.8 (instead of --stages).",
        json_schema_extra={"metavar": "F1,F2,..."},
    )
    out: Optional[str] = Field(default=None, description="Output folder (or s3://..., gs://...). Default: RUN_DIR/curriculum.")
    storage_options: Optional[str] = Field(default=None, exclude=True, description=STORAGE_OPTIONS_HELP, json_schema_extra={"metavar": "JSON"})
    format: Format = Field(default="parquet", description="Stage file format.")
    rank_by: Optional[str | tuple[RankKey, ...]] = Field(
        default=None, description=RANK_BY_HELP + " Default: the run's ranking (paper).", json_schema_extra={"metavar": "COL:asc|desc[:W],..."}
    )
    rrf_k: Optional[int] = Field(default=None, ge=0, description=f"RRF constant k (re-ranks in memory). Default: the run's, {DEFAULT_RRF_K}.")
    ties: Optional[TieMode] = Field(default=None, description=TIES_HELP + " Default: the run's.")
    compression: Literal["zstd", "lz4", "snappy", "gzip", "uncompressed"] = Field(default="zstd", description="Parquet compression (zstd at level 1).")
    by: list[str] = Field(
        default_factory=list,
        description="Check each value of this column (template, task, source, ...) against its share of every stage and "
        "of the dropped part; warn when far from it (repeatable).",
        json_schema_extra={"metavar": "COLUMN", "multiple": True},
    )
    stratify: Optional[str] = Field(
        default=None,
        description="Cut the stages within each value of COLUMN, so every group keeps its share of every stage and of "
        "the dropped part (not the paper's cut).",
        json_schema_extra={"metavar": "COLUMN"},
    )
    overwrite: bool = Field(default=False, description="Replace an earlier export in --out cut with other settings (ranking, stages, format, run).")

    @field_validator("fractions", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """``--fractions 0.2,0.5,0.8`` arrives as one string."""
        if not isinstance(value, str):
            return value
        try:
            return [float(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(f"expected comma-separated numbers such as 0.25,0.5,0.75, got {value!r}") from None

    _known_choice = field_validator("layout", "format", "ties", mode="before")(_known)

    @field_validator("out", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("by", mode="before")
    @classmethod
    def _by_columns(cls, value: Any) -> Any:
        return _columns(value)

    @model_validator(mode="after")
    def _usable(self) -> "ExportConfig":
        """The stages, the ranking and the share check, checked before any file is read (what ``srdata export`` says)."""
        plan_stages(self.stages, self.keep, self.fractions, self.layout)
        parse_rank_by(self.rank_by)
        self.share_check()
        return self


class RankConfig(_Section):
    """``srdata rank``: the ranking written into a finished run."""

    rank_by: Optional[str | tuple[RankKey, ...]] = Field(
        default=None, description=RANK_BY_HELP + " Default: paper.", json_schema_extra={"metavar": "COL:asc|desc[:W],..."}
    )
    rrf_k: int = Field(default=DEFAULT_RRF_K, ge=0, description="RRF constant k.")
    ties: TieMode = Field(default="input", description=TIES_HELP)

    _known_choice = field_validator("ties", mode="before")(_known)

    @model_validator(mode="after")
    def _usable(self) -> "RankConfig":
        parse_rank_by(self.rank_by)  # before the run is read: what ``srdata rank`` says
        return self


class ReportConfig(ShareCheckConfig):
    """``srdata report``: the report of a scored run."""

    out: Optional[Path] = Field(default=None, description="Report folder. Default: RUN_DIR/report.")
    by: list[str] = Field(
        default_factory=list, description="Summarise per value of this column (repeatable).", json_schema_extra={"metavar": "COLUMN", "multiple": True}
    )
    curriculum: Optional[Path] = Field(
        default=None, description="Export whose stages to show. Default: RUN_DIR/curriculum if present, else the paper's cut."
    )
    examples: int = Field(default=5, ge=0, description="Easiest and hardest rows shown.")

    @field_validator("by", mode="before")
    @classmethod
    def _by_columns(cls, value: Any) -> Any:
        return _columns(value)

    @model_validator(mode="after")
    def _usable(self) -> "ReportConfig":
        self.share_check()
        return self


class TeacherConfig(_Section):
    """``srdata teach``: the teacher, and what its pass stores."""

    teacher: str = Field(description="The teacher: a save_pretrained folder (or hub id) that shares the student's tokenizer.")
    top_k: int = Field(
        default=0, ge=0,
        description="Also store the teacher's top-K log-probs at every reference position under RUN/teacher/, for "
        "`srd-distill --teacher-logits` (0 = teacher_ce_loss only; 64 is a good start).",
    )
    overwrite: bool = Field(default=False, description="Replace an earlier teach pass of another teacher or top-K.")
    storage_options: Optional[str] = Field(default=None, exclude=True, description=STORAGE_OPTIONS_HELP, json_schema_extra={"metavar": "JSON"})


class TeachConfig(_Section):
    """Everything ``srdata teach`` runs with: the teacher, and where and how it runs (the student's sections).

    ``model.path`` is the teacher; the encoding settings (template, token limits) are the
    scored run's own and cannot be changed here.
    """

    teach: TeacherConfig
    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="before")
    @classmethod
    def _teacher_is_the_model(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("teach"), dict) and "teacher" in values["teach"]:
            values = {**values, "model": {**values.get("model", {}), "model": values["teach"]["teacher"]}}
        return values


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in ScoreConfig.model_fields.items()  # type: ignore[misc]
}
TEACH_SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in TeachConfig.model_fields.items()  # type: ignore[misc]
}


def resumable_settings(model: type[BaseModel]) -> frozenset[tuple[str, ...]]:
    """The path of every setting of ``model`` marked :data:`RESUMABLE`, nested sections included.

    Example:
        >>> sorted(resumable_settings(BatchingConfig))
        [('batch_size',), ('token_budget',)]
    """
    paths: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        key = field.alias or name  # the key in dumps, manifests and settings
        if extra.get("resumable"):
            paths.add((key,))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths |= {(key, *path) for path in resumable_settings(field.annotation)}
    return frozenset(paths)


# Settings that change speed or memory but not a single output value: a run may be
# resumed with other values of these (for example a smaller batch after running out of memory).
PERFORMANCE_ONLY = resumable_settings(ScoreConfig)


def nest(flat: dict[str, Any], sections: dict[str, type[BaseModel]] | None = None) -> dict[str, dict[str, Any]]:
    """Place flat keys (``max_new_tokens``, ``max-new-tokens``) in the section that owns them.

    A setting given twice (flat and inside its section, or as ``max_new_tokens`` and
    ``max-new-tokens``) is refused, naming it: which one was meant cannot be told.

    Example:
        >>> nest({"max_new_tokens": 8, "model": {"model": "gpt2"}})
        {'generation': {'max_new_tokens': 8}, 'model': {'model': 'gpt2'}}
    """
    sections = SECTIONS if sections is None else sections
    nested: dict[str, dict[str, Any]] = {}
    given_as: dict[tuple[str, str], str] = {}

    def place(section: str, name: str, value: Any, how: str) -> None:
        if (section, name) in given_as:
            raise ValueError(f"setting {section}.{name} is given twice ({given_as[section, name]} and {how}); keep one")
        given_as[section, name] = how
        nested.setdefault(section, {})[name] = value

    for key, value in flat.items():
        if key in sections and isinstance(value, dict):
            nested.setdefault(key, {})
            for name, inner in value.items():
                place(key, str(name).replace("-", "_"), inner, f"{name!r} under {key!r}")
            continue
        name = key.replace("-", "_")
        owners = [section for section, cls in sections.items() if name in setting_names(cls)]
        if not owners:
            known = sorted({f for cls in sections.values() for f in setting_names(cls)})
            raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(known)}")
        place(owners[0], name, value, f"{key!r} at the top level")
    return nested


def read_config_file(path: str | Path, sections: dict[str, type[BaseModel]] | None = None) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into nested sections (``sections``: default, ScoreConfig's).

    Syntax errors, a key given twice and a setting given both flat and inside its section
    are :class:`ConfigFileError` naming the file (and the line where the parser knows it).

    Example:
        >>> read_config_file("score.yaml")     # doctest: +SKIP
        {'generation': {'max_new_tokens': 128}, 'model': {'model': './student'}}
    """
    raw = parse_config_file(path)
    try:
        return nest(raw, sections)
    except ValueError as err:
        raise ConfigFileError(f"config file {path}: {err}") from None


def merge(base: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Section-wise merge; values in ``overrides`` win."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def build_config(values: dict[str, Any]) -> ScoreConfig:
    """Validate settings (flat or nested) into a ScoreConfig, with readable errors."""
    try:
        return ScoreConfig.model_validate(nest(values))
    except ValidationError as err:
        raise ValueError("invalid settings:\n" + "\n".join(f"  {line}" for line in validation_problems(err))) from None


def result_settings(config: ScoreConfig) -> dict[str, Any]:
    """The settings that determine the output values (everything but PERFORMANCE_ONLY)."""
    dumped = config.model_dump()
    settings = {
        section: {k: v for k, v in values.items() if (section, k) not in PERFORMANCE_ONLY}
        for section, values in dumped.items()
    }
    # No signal asked for records nothing, so a run scored before --signals existed has the
    # same settings and resumes; a run with signals differs and is refused by the diff.
    if not settings["metrics"]["signals"]:
        del settings["metrics"]["signals"]
    if settings["data"].get("messages_column") is None:  # likewise: runs from before --messages-column resume
        settings["data"].pop("messages_column", None)
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """A short stable hash of result-determining settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
