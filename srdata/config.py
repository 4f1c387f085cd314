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
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    dataset: str = Field(description="hub id, save_to_disk folder, or .jsonl/.json/.parquet/.csv file(s)")
    split: str = "train"
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    input_column: Optional[str] = None
    limit: Optional[int] = Field(default=None, ge=1, description="score only the first N rows")


class PromptConfig(_Section):
    template: Optional[str] = Field(
        default="auto",
        description="auto | alpaca | raw | chat | a format string with {column} fields; auto = chat when the tokenizer has a chat template (or the data holds chat messages), else alpaca",
    )
    max_prompt_tokens: int = Field(default=256, ge=1)
    max_reference_tokens: Optional[int] = Field(default=256, ge=1)
    truncation_side: Literal["left", "right"] = "left"
    eos_token: Optional[str] = Field(default=None, description="set when the tokenizer has no eos token")


class ModelConfig(_Section):
    model: str = Field(description="the student: a local folder or hub id loadable with from_pretrained")
    backend: Literal["auto", "hf", "vllm"] = "auto"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: Optional[int] = Field(default=None, ge=1)
    max_num_batched_tokens: Optional[int] = Field(default=None, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)


class GenerationConfig(_Section):
    max_new_tokens: int = Field(default=256, ge=1)
    no_repeat_ngram_size: Optional[int] = Field(default=None, ge=1)


class BatchingConfig(_Section):
    batch_size: int = Field(default=64, ge=1, description="most rows decoded together (prompts are prefilled in chunks)")
    token_budget: int = Field(default=16384, ge=1, description="most padded tokens in one forward pass")
    shard_size: int = Field(default=1000, ge=1, description="rows per resumable shard")


#: Optional per-row signals (``--signals``) and the columns each one fills.
SIGNALS: dict[str, tuple[str, ...]] = {"ifd": ("ce_loss_uncond", "ifd", "pmi")}


class MetricsConfig(_Section):
    rouge_tokenizer: Literal["default", "unicode"] = "default"
    rrf_k: int = Field(default=60, ge=0)
    signals: list[str] = Field(
        default_factory=list,
        description="extra per-row signals, comma-separated: ifd = ce_loss_uncond (the reference's cross-entropy after "
        "an empty prompt in the same template), ifd (ce_loss / ce_loss_uncond) and pmi (the nats the prompt saves on "
        "the whole reference), one more forward pass over the reference tokens; off by default",
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
    output: str
    on_invalid: Literal["error", "skip", "flag"] = "error"
    overwrite: bool = False
    seed: int = 0


class EngineConfig(_Section):
    """Where the shards are scored: in this process, or by a pool of Ray actors (``srdata[ray]``)."""

    engine: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = Field(
        default=None, description="Ray cluster to join (auto, host:port, ray://host:10001); default: RAY_ADDRESS, a Ray running here, or a new local one"
    )
    num_replicas: Optional[int] = Field(default=None, ge=1, description="Ray actors, each holding one model; default: as many as the cluster fits")
    gpus_per_replica: float = Field(default=0, ge=0, description="GPUs reserved per actor (vLLM: tensor_parallel_size)")
    cpus_per_replica: float = Field(default=1, gt=0, description="CPUs reserved per actor")


class ScoreConfig(_Section):
    data: DataConfig
    model: ModelConfig
    run: RunConfig
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    batching: BatchingConfig = BatchingConfig()
    metrics: MetricsConfig = MetricsConfig()
    engine: EngineConfig = EngineConfig()


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation for name, field in ScoreConfig.model_fields.items()  # type: ignore[misc]
}
# Settings that change speed or memory but not a single output value: a run may be
# resumed with other values of these (for example a smaller batch after running out of memory).
PERFORMANCE_ONLY = {
    ("batching", "batch_size"),
    ("batching", "token_budget"),
    ("model", "gpu_memory_utilization"),
    ("model", "max_num_batched_tokens"),
    ("run", "overwrite"),
    ("run", "output"),
    ("engine", "engine"),
    ("engine", "ray_address"),
    ("engine", "num_replicas"),
    ("engine", "gpus_per_replica"),
    ("engine", "cpus_per_replica"),
}


def nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Place flat keys (``max_new_tokens``, ``max-new-tokens``) in the section that owns them."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in SECTIONS and isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
            continue
        name = key.replace("-", "_")
        owners = [section for section, cls in SECTIONS.items() if name in cls.model_fields]
        if not owners:
            known = sorted({f for cls in SECTIONS.values() for f in cls.model_fields})
            raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(known)}")
        nested.setdefault(owners[0], {})[name] = value
    return nested


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into nested sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        raw = tomllib.loads(text)
    elif suffix == ".json":
        raw = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(raw).__name__}")
    return nest(raw)


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
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"  {where}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
        raise ValueError("invalid settings:\n" + "\n".join(problems)) from None


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
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """A short stable hash of result-determining settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
