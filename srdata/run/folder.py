"""The run folder: resumable shards, the manifest, the final annotated table.

Layout::

    DIR/manifest.json          settings, identity, shard plan with checksums, counts, timings
    DIR/shards/shard-00000.parquet   rows [0, shard_size) once scored (written atomically)
    DIR/annotated.parquet      every row, original columns + srdata's columns
    DIR/.srdata.lock           held by the one command writing the folder

What ``srdata score`` guarantees about a run folder:

* **One writer.** ``srdata score`` holds :class:`~srdata.run.io.FolderLock` on the folder from
  before it reads the manifest until it ends; a second command on the folder is refused at
  once, naming the folder and the process holding it. A killed run releases the lock.
* **Content identity.** The manifest records the dataset's and the model's content
  fingerprints (:mod:`srdata.run.identity`), not paths or modification times: a dataset
  edited with its mtime kept is another input, and a run is not resumed with it.
* **Checksums.** Every shard's SHA-256, bytes and rows are recorded when it is written. On
  resume a shard without a record, or whose bytes or ``srd_id`` range differ from it, is
  recomputed (named); at assembly a mismatch is refused, naming the file. A shard file is
  never trusted without a record in the manifest.
* **Nothing of the user's is touched.** A folder without a manifest that holds files named
  like a run's (``annotated.parquet``, ``shards/shard-*.parquet``) is refused, ``--overwrite``
  or not, before anything is written: srdata cannot tell it wrote them. Another non-empty
  folder without a manifest is refused unless ``--overwrite``, which scores beside its files.
  ``--overwrite`` removes only what srdata provably wrote: the shard files the manifest's plan
  names, the annotated table and the manifest; and any run removes temp files carrying
  srdata's marker left by a dead process of this host. Every other file is kept.
* **Atomic writes.** Every file appears complete or not at all (temp file + rename); a full
  disk or a read-only folder is an error naming the file and the fix, and a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from srdata.config import (SECTIONS, BatchingConfig, DataConfig, EngineConfig, GenerationConfig, MetricsConfig, ModelConfig, PromptConfig,
                           RunConfig, setting_names, validation_problems)

from srdata.run.names import ANNOTATED_FILE, CURRICULUM_FILE, MANIFEST_FILE, SHARD_FILE, RunDirError  # noqa: F401 - re-exported
from srdata.run.output_location import check_output_location  # noqa: F401 - re-exported
from srdata.run.storage import parse_location
from srdata.run.io import (FolderLock, IntegrityError, WriteError, atomic_path, file_sha256, is_tool_file, remove_stale_temps,
                           read_shard_rows, verify_file, write_json_atomic, write_problem)

log = logging.getLogger(__name__)


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with a local dataset path made absolute: ``data.jsonl`` and ``/work/data.jsonl``
    are the same input (the dataset fingerprint guards the content)."""
    data = settings.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        return settings
    parts = [str(Path(part).resolve()) if Path(part).exists() else part for part in data["dataset"].split(",")]
    return {**settings, "data": {**data, "dataset": ",".join(parts)}}




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
            section: {k: v for k, v in content.items() if k in setting_names(SECTIONS[section])} if isinstance(content, dict) else content
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
    sha256: Optional[str] = None  # of the file as written; a done shard without one is recomputed
    bytes: Optional[int] = None
    rows: Optional[int] = None


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

    @property
    def template(self) -> Optional[str]:
        """The template the run's prompts were rendered with: ``config.prompt.template``, where the run records it.

        Manifests written before srdata resolved the config recorded it apart, as a top-level
        ``template``, with ``auto`` (or nothing, before ``auto``) in the config: read there.

        Example:
            >>> Manifest.model_validate({"config": {"prompt": {"template": "chat"}}}).template
            'chat'
            >>> Manifest.model_validate({"config": {"prompt": {"template": "auto"}}, "template": "alpaca"}).template
            'alpaca'
        """
        recorded = self.config.prompt.template
        if recorded not in (None, "auto"):
            return recorded
        return (self.model_extra or {}).get("template")


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


#: The name of every shard file srdata writes; a plan naming anything else is not followed.


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


def _planned_files(manifest: Manifest) -> set[str]:
    """Shard files a manifest's plan names (well-formed names under shards/ only), with the partial
    files its records name (an interrupted shard's finished rows: srdata.run.partial)."""
    planned = {s.file for s in manifest.shards if s.file == Shard(s.index, 0, 0).file}
    partial = {s.index: (s.model_extra or {}).get("partial") for s in manifest.shards}
    return planned | {r["file"] for i, r in partial.items() if isinstance(r, dict) and r.get("file") == f"shards/shard-{i:05d}.partial.parquet"}


class RunStore:
    """Reads and writes one run folder, touching only files srdata provably wrote.

    The one reader of a run folder: ``srdata score`` resumes through it, and the commands that
    read a finished run (export, rank, report: :func:`srdata.curriculum.source.read_run`) find
    its manifest and table through it.

    Example:
        >>> store = RunStore("runs/student-a")                           # doctest: +SKIP
        >>> store.check_foreign(overwrite=False)                         # doctest: +SKIP
        >>> with store.lock():                                           # doctest: +SKIP
        ...     resumed = store.prepare(settings, identity, overwrite=False)
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = parse_location(directory, "--output").local  # file:// URIs are local paths; s3://: open_run_store
        self.manifest_path = self.dir / MANIFEST_FILE
        self.annotated_path = self.dir / ANNOTATED_FILE
        self.previous_manifest: Manifest | None = None  # what prepare() found, before this run rewrites it
        self.owned: set[str] = set()  # shard files the folder's manifest planned: srdata's own to replace
        self.records: dict[str, ShardRecord] = {}  # the previous records of a resumed run, by file

    @property
    def output(self) -> str | Path:
        """Where the run is, as the user gave it: the folder, or the remote location (``s3://...``)."""
        return self.dir

    def read_manifest(self) -> Manifest | None:
        """The folder's ``manifest.json`` (:func:`read_manifest`); ``None`` when it holds none."""
        return read_manifest(self.dir)

    def lock(self, command: str = "srdata score") -> Any:
        """The folder's lock (one writer): take it after :meth:`check_foreign`, before :meth:`prepare`."""
        return FolderLock(self.dir, command)

    def check_foreign(self, overwrite: bool) -> None:
        """Refuse, reading only, a folder that srdata cannot use without touching files it did not write.

        * a file, or a ``manifest.json`` that ``srdata score`` did not write: refused;
        * no manifest, but ``annotated.parquet`` or ``shards/shard-*.parquet``: refused even with
          ``--overwrite``, since srdata cannot tell it wrote them (a deleted manifest, another
          tool): it would neither reuse them (no checksum) nor remove them;
        * no manifest and other files: refused unless ``--overwrite``, which scores beside them.

        srdata's lock file and its marked temp files do not count as content.
        """
        if self.dir.exists() and not self.dir.is_dir():
            raise RunDirError(f"output {self.dir} is a file, not a folder; choose another --output")
        if not self.dir.is_dir():
            return
        manifest = self.read_manifest()
        if manifest is not None:
            if manifest.srdata_version is None:
                raise RunDirError(f"{self.manifest_path} was not written by `srdata score`; choose another --output")
            return
        entries = self._entries()
        run_like = [n for n in entries if n in (ANNOTATED_FILE, "shards") or SHARD_FILE.match(n)]
        if run_like:
            raise RunDirError(
                f"{self.dir} holds {_some(run_like)} but no {MANIFEST_FILE}: srdata cannot tell it wrote them, so it "
                "neither reuses nor removes them; remove them yourself, or choose another --output"
            )
        if entries and not overwrite:
            raise RunDirError(
                f"output folder {self.dir} is not empty and holds no srdata run ({_some(entries)}); choose an empty or "
                "new folder, or pass --overwrite to score into it anyway (beside these files: srdata removes none of them)"
            )

    def _entries(self) -> list[str]:
        """The folder's content (one level into shards/), srdata's lock and temp files left out."""
        names = []
        for entry in sorted(self.dir.iterdir()):
            if is_tool_file(entry.name):
                continue
            if entry.name == "shards" and entry.is_dir() and not entry.is_symlink():
                names += [f"shards/{e.name}" for e in sorted(entry.iterdir()) if not is_tool_file(e.name)]
            else:
                names.append(entry.name)
        return names

    def prepare(self, settings: dict[str, Any], identity: dict[str, Any], overwrite: bool) -> bool:
        """Check the folder can hold this run; returns True when it resumes an earlier one.

        Call it holding :meth:`lock`: temp files of killed processes are removed, and the
        folder is checked again, under the lock. A folder holding a run with other settings
        (or another model or dataset content) is refused, naming every difference, unless
        ``overwrite`` is set. A run that never finished a shard is refused the same way when
        its settings differ (a run restarted under other settings is never a silent choice);
        when only the model's or dataset's content differs (a failed start: a model without
        weights, fixed by the user) the folder is reused, and the log says what changed.
        """
        for folder in (self.dir, self.dir / "shards"):
            remove_stale_temps(folder)
        self.check_foreign(overwrite)
        previous = self.previous_manifest = self.read_manifest()
        if previous is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            return False
        self.owned = _planned_files(previous)
        recorded = previous.settings
        if recorded.get("prompt", {}).get("template", "") is None:  # recorded before "auto": the template it rendered
            recorded["prompt"]["template"] = previous.template
        changed = diff_settings(_canonical(recorded), _canonical(settings))
        differences = changed + diff_settings({"identity": previous.identity}, {"identity": identity})
        if not differences:
            self.records = {s.file: s for s in previous.shards if s.file in self.owned}
            return True
        scored_nothing = not any(s.done for s in previous.shards) and not any((self.dir / f).exists() for f in self.owned)
        if not overwrite and scored_nothing and changed:
            raise RunDirError(
                f"{self.output} holds an interrupted run that finished no shard, started with other settings:\n  "
                + "\n  ".join(differences)
                + "\nuse the same settings to continue it, another --output, or --overwrite to start over with these"
            )
        if not overwrite and scored_nothing:
            log.warning("%s: the interrupted run there finished no shard; starting it again with %s", self.output, "; ".join(differences))
        if not overwrite and not scored_nothing:
            edited = ""
            if previous.identity.get("dataset") != identity.get("dataset"):
                edited = (f"\nthe dataset {settings.get('data', {}).get('dataset')} does not hold the content this run scored "
                          "(it was edited or replaced, even if its modification time was kept)")
            raise RunDirError(
                f"{self.output} holds a run with other settings:\n  "
                + "\n  ".join(differences)
                + edited
                + "\nuse the same settings to resume it, another --output, or --overwrite to start over"
            )
        self.clear()
        return False

    def clear(self) -> None:
        """Remove the previous run's files: only those srdata provably wrote.

        That is the shard files its manifest's plan names, the annotated table and the manifest
        (last, so that a kill midway leaves a folder that is still recognised as a run). Any
        other file, in ``shards/`` too, is kept.
        """
        for name in sorted(self.owned):
            (self.dir / name).unlink(missing_ok=True)
        for name in (ANNOTATED_FILE, MANIFEST_FILE):
            (self.dir / name).unlink(missing_ok=True)
        self.records = {}
        self.dir.mkdir(parents=True, exist_ok=True)

    def pending(self, shards: list[Shard], say: Callable[[str], None]) -> list[Shard]:
        """The shards to compute: those without a file, and those whose file does not match its record.

        A shard file whose record is missing (its run was killed between writing it and recording
        it), or whose bytes or ``srd_id`` range differ from the record, is recomputed, and ``say``
        names it. A file at a planned path that no manifest of this folder planned is not
        srdata's: refused, never overwritten.
        """
        strangers = [s.file for s in shards if s.file not in self.owned and (self.dir / s.file).exists()]
        if strangers:
            raise RunDirError(f"{self.dir} holds {_some(strangers)}, which no manifest of this folder records: srdata cannot "
                              "tell it wrote them and will not overwrite them; remove them yourself, or choose another --output")
        todo = []
        for shard in shards:
            problem = self._shard_problem(shard)
            if problem is None:
                continue
            if problem:
                say(f"{problem}: recomputing it")
            todo.append(shard)
        return todo

    def _shard_problem(self, shard: Shard) -> str | None:
        """``None``: done and verified; ``""``: not written yet; otherwise why the file is not trusted."""
        if not (self.dir / shard.file).exists():
            return ""
        record = self.records.get(shard.file)
        if record is None or not record.done or record.sha256 is None or (record.start, record.stop) != (shard.start, shard.stop):
            return f"{self.dir / shard.file} has no checksum in the manifest (its run stopped before recording it)"
        try:
            self._read_verified(record, columns=["srd_id"])
        except IntegrityError as err:
            return str(err)
        return None

    def _read_verified(self, record: ShardRecord, columns: list[str] | None = None) -> pl.DataFrame:
        """A shard's table, once its bytes match the record and its ``srd_id`` column is exactly its rows."""
        path = self.dir / record.file
        try:
            verify_file(path, record.sha256, record.bytes)
        except IntegrityError:
            raise IntegrityError(f"{path} does not match its checksum (the file was changed or damaged)") from None
        return read_shard_rows(path, record.start, record.stop, columns)

    def write_shard(self, shard: Shard, frame: pl.DataFrame) -> dict[str, Any]:
        """Write a shard atomically; returns what its record must hold (``sha256``, ``bytes``, ``rows``)."""
        with atomic_path(self.dir / shard.file) as tmp:
            _write_parquet(frame, tmp, self.dir / shard.file)
            written = {"sha256": file_sha256(tmp), "bytes": tmp.stat().st_size, "rows": frame.height}
        return written

    def read_shards(self, records: list[ShardRecord], columns: list[str] | None = None) -> pl.DataFrame:
        """Every shard (or these ``columns`` of it), checked against its record (checksum, srd_id range); a mismatch is refused, named."""
        missing = [r.file for r in records if not (self.dir / r.file).exists()]
        if missing:
            raise RunDirError(f"{self.dir} is missing finished shards: {', '.join(missing)}; re-run `srdata score` to finish them")
        frames = []
        for record in records:
            try:
                frames.append(self._read_verified(record, columns))
            except IntegrityError as err:
                raise IntegrityError(f"{err}; run the same command again to recompute it") from None
        # Diagonal: shards written before a column existed (ce_loss_uncond, ifd, pmi) read it as null.
        return pl.concat(frames, how="diagonal_relaxed")

    def write_manifest(self, manifest: Manifest) -> None:
        write_manifest(self.dir, manifest)

    def write_annotated(self, frame: pl.DataFrame, metadata: dict[str, str] | None = None) -> None:
        """Write ``annotated.parquet``; ``metadata``: parquet key-value pairs (which ranking its rank columns are)."""
        with atomic_path(self.annotated_path) as tmp:
            _write_parquet(frame, tmp, self.annotated_path, metadata)


def _write_parquet(frame: pl.DataFrame, tmp: Path, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``frame.write_parquet``, with a full disk or a read-only folder reported as a :class:`WriteError` naming ``path``.

    polars reports IO errors as ``ComputeError: ... (os error 28)``, not as ``OSError``.
    """
    try:
        frame.write_parquet(tmp, metadata=metadata)
    except pl.exceptions.PolarsError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise WriteError(write_problem(OSError(int(code[1]), os.strerror(int(code[1]))), path)) from err


def _some(names: list[str], shown: int = 5) -> str:
    """``a, b, c`` (and N more)."""
    return ", ".join(names[:shown]) + (f" (and {len(names) - shown} more)" if len(names) > shown else "")
