"""A run folder in object storage (``--output s3://bucket/runs/a``): staged locally, published object by object.

Object stores have no rename and no ``flock``, so the run-folder guarantees of
:class:`srdata.run.folder.RunStore` are kept another way:

* **Staging.** The run works in a local staging folder (:func:`srdata.run.storage.staging_folder`,
  the same for the same location), with every local rule unchanged: atomic files, checksums,
  settings and identity checks, ``--overwrite``.
* **Publish order.** A finished shard is uploaded to its final key as soon as it is written;
  ``manifest.json``, which records each shard's SHA-256 and size, is uploaded after it, and
  ``annotated.parquet`` before the manifest that marks the run complete. The manifest is the
  commit: an object it does not record as done is never trusted (as datatrove commits a
  marker after its data files).
* **Resume.** The remote manifest is downloaded first; every shard it records as done is
  downloaded and checked against its SHA-256 and size before it is used (one that differs or
  is missing is recomputed, and said so); anything else in the staging folder is discarded,
  since the remote folder is the truth.
* **One writer.** A lock object (:class:`srdata.run.remote_lock.RemoteLock`) instead of
  ``flock``, plus the staging folder's own ``flock``.
* **Whose files.** The same rules as a local folder, on the remote objects: a folder of
  other objects is refused (unless ``--overwrite``, which writes beside them), run-like
  objects without a manifest are refused, ``--overwrite`` removes only the objects the
  manifest names.

Example:
    >>> store = RunStore("s3://bucket/runs/a")    # doctest: +SKIP
    >>> type(store).__name__                      # doctest: +SKIP
    'RemoteRunStore'
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from srdata.run.folder import ANNOTATED_FILE, MANIFEST_FILE, SHARD_FILE, Manifest, RunDirError, RunStore, Shard, read_manifest
from srdata.run.io import FolderLock, is_tool_file
from srdata.run.remote_lock import RemoteLock
from srdata.run.storage import (Location, check_bucket, download, download_verified, is_remote, list_names, parse_location,
                                remember_published, remove, staging_folder, upload)


class RemoteRunStore(RunStore):
    """A :class:`~srdata.run.folder.RunStore` whose folder is a remote location (see the module docstring)."""

    def __init__(self, directory: str | Path | Location, staging: Path | None = None) -> None:
        self.location: Location = parse_location(str(directory), "--output")
        super().__init__(staging if staging is not None else staging_folder(self.location, "run"))
        self.say: Any = None

    @property
    def output(self) -> str:
        return self.location.uri

    @contextlib.contextmanager
    def _both_locks(self, command: str) -> Iterator[None]:
        with RemoteLock(self.location, command, say=_warn), FolderLock(self.dir, command):
            yield

    def lock(self, command: str = "srdata score") -> Any:
        return self._both_locks(command)

    def check_foreign(self, overwrite: bool) -> None:
        """The local rules (:meth:`RunStore.check_foreign`) applied to the remote objects; reads only."""
        check_bucket(self.location)
        names = [n for n in list_names(self.location) if not is_tool_file(n.rsplit("/", 1)[-1])]
        if MANIFEST_FILE in names:
            manifest = self._remote_manifest()
            if manifest is not None and manifest.srdata_version is None:
                raise RunDirError(f"{self.location / MANIFEST_FILE} was not written by `srdata score`; choose another --output")
            return
        run_like = [n for n in names if n == ANNOTATED_FILE or SHARD_FILE.match(n)]
        if run_like:
            raise RunDirError(
                f"{self.output} holds {_some(run_like)} but no {MANIFEST_FILE}: srdata cannot tell it wrote them, so it "
                "neither reuses nor removes them; remove them yourself, or choose another --output"
            )
        if names and not overwrite:
            raise RunDirError(
                f"output folder {self.output} is not empty and holds no srdata run ({_some(names)}); choose an empty or "
                "new folder, or pass --overwrite to score into it anyway (beside these objects: srdata removes none of them)"
            )

    def _remote_manifest(self) -> Manifest | None:
        """The remote manifest, read through a local copy (the same parser and errors as a local one)."""
        probe = self.dir.parent / f".{self.dir.name}.manifest-probe"
        probe.mkdir(parents=True, exist_ok=True)
        try:
            if not download(self.location / MANIFEST_FILE, probe / MANIFEST_FILE):
                return None
            try:
                return read_manifest(probe)
            except RunDirError as err:
                raise RunDirError(str(err).replace(str(probe / MANIFEST_FILE), (self.location / MANIFEST_FILE).uri)) from None
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def prepare(self, settings: dict[str, Any], identity: dict[str, Any], overwrite: bool) -> bool:
        """Mirror the remote run into the staging folder (verified), then the local rules; an overwrite clears the remote too."""
        self._mirror()
        remote_before = read_manifest(self.dir)
        resumed = super().prepare(settings, identity, overwrite)
        if not resumed and remote_before is not None:
            # The local rules chose to start over (--overwrite, or a failed start): the remote objects
            # the earlier manifest named go too, the manifest last (a kill midway leaves a run).
            for name in sorted(self.owned) + [ANNOTATED_FILE, MANIFEST_FILE]:
                remove(self.location / name)
        return resumed

    def _mirror(self) -> None:
        """Make the staging folder hold exactly the remote manifest and the done shards it records (each verified)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self._remote_manifest()
        records = {s.file: s for s in manifest.shards if s.done and s.sha256} if manifest is not None else {}
        for path in sorted(self.dir.rglob("*")):
            if path.is_file() and not is_tool_file(path.name):
                name = path.relative_to(self.dir).as_posix()
                if name not in records:
                    path.unlink()  # the staging folder is srdata's own; the remote folder is the truth
        if manifest is None:
            return
        download(self.location / MANIFEST_FILE, self.dir / MANIFEST_FILE)
        for name, record in records.items():
            if not SHARD_FILE.match(name):
                continue
            # Downloaded even when the staging copy matches: the remote object is what the manifest vouches for.
            if not download_verified(self.location / name, self.dir / name, record.sha256, record.bytes, reuse=False):
                _warn(f"{self.location / name} is missing or does not match the checksum in the manifest: recomputing it")
                (self.dir / name).unlink(missing_ok=True)

    def pending(self, shards: list[Shard], say: Any) -> list[Shard]:
        present = set(list_names(self.location))
        strangers = [s.file for s in shards if s.file not in self.owned and s.file in present]
        if strangers:
            raise RunDirError(f"{self.output} holds {_some(strangers)}, which no manifest of this folder records: srdata cannot "
                              "tell it wrote them and will not overwrite them; remove them yourself, or choose another --output")
        return super().pending(shards, say)

    def write_shard(self, shard: Shard, frame: pl.DataFrame) -> dict[str, Any]:
        written = super().write_shard(shard, frame)
        upload(self.dir / shard.file, self.location / shard.file)  # before the manifest that records it
        return written

    def write_manifest(self, manifest: Manifest) -> None:
        super().write_manifest(manifest)
        upload(self.manifest_path, self.location / MANIFEST_FILE)

    def write_annotated(self, frame: pl.DataFrame, metadata: dict[str, str] | None = None) -> None:
        super().write_annotated(frame, metadata)
        upload(self.annotated_path, self.location / ANNOTATED_FILE)


@contextlib.contextmanager
def staged_run(run: Location, command: str, names: list[str]) -> Iterator[Path]:
    """A local copy of these files of the remote run ``run``, made and used holding the run's lock (remote and local).

    For a command that rewrites a finished run (``srdata teach``): one writer on the remote
    folder (its lock object, as ``srdata score`` takes), every named file downloaded afresh
    (one the store lacks is absent from the copy: the remote folder is the truth), the copy
    named by the run's URI in messages (:func:`srdata.run.storage.shown`). Publish through
    :class:`RemoteRunStore` objects whose ``staging`` is the copy (or a folder inside it).

    Example:
        >>> with staged_run(parse_location("s3://b/runs/a", "RUN_DIR"), "srdata teach", ["manifest.json"]) as local:   # doctest: +SKIP
        ...     read_manifest(local).status
        'complete'
    """
    check_bucket(run)  # a missing bucket or an endpoint that does not answer: said so before anything is written
    staged = staging_folder(run, "staged")
    with RemoteLock(run, command, say=_warn), FolderLock(staged, command):
        for name in names:
            (staged / name).unlink(missing_ok=True)
            download(run / name, staged / name)
        remember_published(staged, run)
        yield staged


def open_run_store(output: str | Path) -> RunStore:
    """The run folder ``output``: a :class:`RemoteRunStore` for a remote location (``s3://...``), else a local one.

    Example:
        >>> type(open_run_store("runs/a")).__name__
        'RunStore'
    """
    return RemoteRunStore(output) if is_remote(output) else RunStore(output)


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" (and {len(names) - shown} more)" if len(names) > shown else "")


def _warn(message: str) -> None:
    import logging

    logging.getLogger("srdata.run").warning(message)
