"""The run folder: resumable shards, the manifest, the final annotated table.

Layout::

    DIR/manifest.json          settings, identity, shard plan, counts, timings
    DIR/shards/shard-00000.parquet   rows [0, shard_size) once scored (written atomically)
    DIR/annotated.parquet      every row, original columns + srdata's columns

A shard file exists only once it is complete (temp file + rename), so a run killed at
any moment resumes by recomputing just the shards whose file is missing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from srdata.config import (SECTIONS, BatchingConfig, DataConfig, EngineConfig, GenerationConfig, MetricsConfig, ModelConfig, PromptConfig,
                           RunConfig, validation_problems)

from srdata.run.io import atomic_path, remove_stale_temps, write_json_atomic


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with a local dataset path made absolute: ``data.jsonl`` and ``/work/data.jsonl``
    are the same input (the dataset fingerprint guards the content)."""
    data = settings.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        return settings
    parts = [str(Path(part).resolve()) if Path(part).exists() else part for part in data["dataset"].split(",")]
    return {**settings, "data": {**data, "dataset": ",".join(parts)}}


MANIFEST_FILE = "manifest.json"
ANNOTATED_FILE = "annotated.parquet"
CURRICULUM_FILE = "curriculum.json"  # written by `srdata export` into its output folder


class RecordedConfig(BaseModel):
    """The run's settings as recorded; every section optional so a partial record still reads."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    data: Optional[DataConfig] = None
    model: Optional[ModelConfig] = None
    run: Optional[RunConfig] = None
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    batching: BatchingConfig = BatchingConfig()
    metrics: MetricsConfig = MetricsConfig()
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="before")
    @classmethod
    def _known_settings_only(cls, values: Any) -> Any:
        """A setting this srdata does not know (recorded by a newer or older one) is left out, not refused."""
        if not isinstance(values, dict):
            return values
        return {
            section: {k: v for k, v in content.items() if k in SECTIONS[section].model_fields} if isinstance(content, dict) else content
            for section, content in values.items()
            if section in SECTIONS
        }


class ShardRecord(BaseModel):
    """One shard of the plan: its rows, its file, whether it is done and how it was batched."""

    model_config = ConfigDict(extra="allow")
    index: int
    file: str
    start: int
    stop: int
    done: bool = False
    batch_size: Optional[int] = None
    token_budget: Optional[int] = None


class Manifest(BaseModel):
    """``manifest.json``: what ``srdata score`` writes and every later command reads back.

    Unknown keys are kept (a newer srdata may add some); a field added later reads as its default.

    Example:
        >>> Manifest.model_validate({"status": "complete", "config": {"metrics": {"rrf_k": 30}}}).config.metrics.rrf_k
        30
    """

    model_config = ConfigDict(extra="allow")
    srdata_version: Optional[str] = None
    status: Literal["running", "complete"] = "running"
    config: RecordedConfig = RecordedConfig()
    settings: dict[str, Any] = {}
    config_hash: Optional[str] = None
    identity: dict[str, Any] = {}
    backend: Optional[str] = None
    tokenizer: dict[str, Any] = {}
    columns: dict[str, Any] = {}
    template: Optional[str] = None
    versions: dict[str, str] = {}
    shards: list[ShardRecord] = []
    resumed: bool = False
    unconditional_prompt: Optional[str] = None
    counts: dict[str, int] = {}
    timings: dict[str, int | float] = {}
    ranking: dict[str, Any] = {}

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (fields never set are left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


def read_manifest(run_dir: str | Path) -> Manifest | None:
    """The manifest of the run in ``run_dir``, or ``None`` when the folder holds none.

    Example:
        >>> read_manifest("runs/student-a").status                 # doctest: +SKIP
        'complete'
    """
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        problems = "; ".join(validation_problems(err)[:5])
        raise RunDirError(f"{path} is not an srdata manifest ({problems}); was it edited by hand?") from None


def write_manifest(run_dir: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically."""
    write_json_atomic(Path(run_dir) / MANIFEST_FILE, manifest.to_json())


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff_settings(
    old: dict[str, Any],
    new: dict[str, Any],
    ignore: frozenset[str] | set[str] = frozenset(),
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """``key: old -> new`` for every setting that differs between a recorded run and this one.

    Nested sections are compared key by key (``generation.max_new_tokens``). ``ignore`` names
    settings that may change on resume (speed or memory only); ``defaults`` fills settings the
    old record lacks, because a setting added after a run was recorded had its default there.
    Used by ``srdata score`` and ``srd-distill train`` alike.

    Example:
        >>> diff_settings({"generation": {"max_new_tokens": 8}}, {"generation": {"max_new_tokens": 16}})
        ['generation.max_new_tokens: 8 -> 16']
        >>> diff_settings({"lr": 1e-4}, {"lr": 1e-4, "epochs": 3}, defaults={"epochs": 3})
        []
    """
    a, b = _flatten(old), _flatten(new)
    filled = {**_flatten(defaults or {}), **a}
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {filled.get(k)!r} -> {b.get(k)!r}" for k in keys if filled.get(k) != b.get(k)]


class RunDirError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"shards/shard-{self.index:05d}.parquet"


def plan_shards(n_rows: int, shard_size: int) -> list[Shard]:
    """Consecutive row ranges of ``shard_size`` rows (the last may be shorter).

    Example:
        >>> [(s.start, s.stop) for s in plan_shards(5, 2)]
        [(0, 2), (2, 4), (4, 5)]
    """
    return [Shard(i, start, min(start + shard_size, n_rows)) for i, start in enumerate(range(0, n_rows, shard_size))]


class RunStore:
    """Reads and writes one run folder.

    Example:
        >>> store = RunStore("runs/student-a")                       # doctest: +SKIP
        >>> store.prepare(settings, identity, overwrite=False)       # doctest: +SKIP
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.manifest_path = self.dir / MANIFEST_FILE
        self.annotated_path = self.dir / ANNOTATED_FILE
        self.previous_manifest: Manifest | None = None  # what prepare() found, before this run rewrites it

    def prepare(self, settings: dict[str, Any], identity: dict[str, Any], overwrite: bool) -> bool:
        """Check the folder can hold this run; returns True when it resumes an earlier one.

        A folder holding a run with other settings (or another model or dataset) is
        refused, naming every difference, unless ``overwrite`` is set. A run that never
        finished a shard (a failed start: a model without weights, a bad device) holds no
        work to protect, so the same folder is simply reused. Temp files of killed
        processes are removed first.
        """
        if self.dir.exists() and not self.dir.is_dir():
            raise RunDirError(f"output {self.dir} is a file, not a folder; choose another --output")
        for folder in (self.dir, self.dir / "shards"):
            remove_stale_temps(folder)
        previous = self.previous_manifest = read_manifest(self.dir)
        if previous is None:
            if self.dir.exists() and not overwrite and any(p.name != "shards" or any(p.iterdir()) for p in self.dir.iterdir()):
                raise RunDirError(
                    f"output folder {self.dir} is not empty and holds no srdata run; "
                    "choose an empty or new folder, or pass --overwrite to score into it anyway"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            return False
        recorded = previous.settings
        if recorded.get("prompt", {}).get("template", "") is None:  # recorded before "auto": the template it rendered
            recorded["prompt"]["template"] = previous.template
        differences = diff_settings(_canonical(recorded), _canonical(settings)) + diff_settings(
            {"identity": previous.identity}, {"identity": identity}
        )
        if not differences:
            return True
        scored_nothing = not any(s.done for s in previous.shards) and not any((self.dir / "shards").glob("*.parquet"))
        if not overwrite and not scored_nothing:
            raise RunDirError(
                f"{self.dir} holds a run with other settings:\n  "
                + "\n  ".join(differences)
                + "\nuse the same settings to resume it, another --output, or --overwrite to start over"
            )
        self.clear()
        return False

    def clear(self) -> None:
        """Remove a previous run's files (only those srdata writes)."""
        shutil.rmtree(self.dir / "shards", ignore_errors=True)
        for name in (ANNOTATED_FILE, MANIFEST_FILE):
            (self.dir / name).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def is_done(self, shard: Shard) -> bool:
        """A shard is done when its file exists and holds exactly its rows."""
        path = self.dir / shard.file
        if not path.exists():
            return False
        try:
            n = pl.scan_parquet(path).select(pl.len()).collect().item()
        except Exception:  # an unreadable file (disk trouble): recompute it
            return False
        return n == shard.stop - shard.start

    def write_shard(self, shard: Shard, frame: pl.DataFrame) -> None:
        with atomic_path(self.dir / shard.file) as tmp:
            frame.write_parquet(tmp)

    def read_shards(self, shards: list[Shard]) -> pl.DataFrame:
        missing = [s.file for s in shards if not (self.dir / s.file).exists()]
        if missing:
            raise RunDirError(f"{self.dir} is missing finished shards: {', '.join(missing)}; re-run `srdata score` to finish them")
        # Diagonal: shards written before a column existed (ce_loss_uncond, ifd, pmi) read it as null.
        return pl.concat([pl.read_parquet(self.dir / s.file) for s in shards], how="diagonal_relaxed")

    def write_manifest(self, manifest: Manifest) -> None:
        write_manifest(self.dir, manifest)

    def write_annotated(self, frame: pl.DataFrame) -> None:
        with atomic_path(self.annotated_path) as tmp:
            frame.write_parquet(tmp)
