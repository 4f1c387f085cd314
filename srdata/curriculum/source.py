"""The scored run an export (or a re-rank, or a report) reads: a finished ``srdata score`` folder.

A run folder is read through :class:`~srdata.run.folder.RunStore` (its files, its manifest);
this module adds what a reader of a *finished* run needs: the refusal of an unfinished or
missing run, named, and the check that it was not replaced while it was read.

Example:
    >>> read_run("runs/dolly").annotated          # doctest: +SKIP
    PosixPath('runs/dolly/annotated.parquet')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from srdata.curriculum.cut import CurriculumError
from srdata.run.folder import CURRICULUM_FILE, MANIFEST_FILE, Manifest, RunStore
from srdata.run.storage import local_path


@dataclass(frozen=True)
class Run:
    """A finished ``srdata score`` folder, as :func:`read_run` found it."""

    path: Path
    manifest: Manifest
    read_at: tuple[tuple[int, ...] | None, ...] = ()  # annotated.parquet and manifest.json as read_run found them

    @property
    def store(self) -> RunStore:
        """The folder's store: every file of the run is found through it."""
        return RunStore(self.path)

    @property
    def annotated(self) -> Path:
        return self.store.annotated_path

    @property
    def config_hash(self) -> str | None:
        return self.manifest.config_hash


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Open a run folder, refusing one whose scoring has not finished.

    Example:
        >>> read_run("runs/dolly").config_hash        # doctest: +SKIP
        '5f1c...'
    """
    path = local_path(run_dir, "RUN_DIR")  # a remote run is read through a local copy (srdata.curriculum.remote_export)
    if not path.is_dir():
        raise CurriculumError(f"run folder {path} does not exist")
    store = RunStore(path)
    read_at = _identities(store)
    manifest = read_run_manifest(path)
    if manifest.status != "complete":
        raise CurriculumError(_unfinished_message(path, manifest))
    if not store.annotated_path.is_file():
        raise CurriculumError(
            f"{store.annotated_path} is missing although the manifest says the run is complete; "
            "rerun the same `srdata score` command into this folder to rebuild it"
        )
    return Run(path, manifest, read_at)


def read_run_manifest(path: Path) -> Manifest:
    """The manifest of a run folder, whatever its status; a folder without one is explained."""
    try:
        manifest = RunStore(path).read_manifest()
    except ValueError as err:  # RunDirError (an unreadable manifest) is one
        raise CurriculumError(str(err)) from None
    if manifest is None:
        raise CurriculumError(_not_a_run_message(path))
    return manifest


def _not_a_run_message(path: Path) -> str:
    """Why ``path`` is not a run folder, pointing to the run folder that exists nearby."""
    if (path / CURRICULUM_FILE).is_file() and (path.parent / MANIFEST_FILE).is_file():
        return f"{path} is an export (it holds {CURRICULUM_FILE}), not a run; its run is {path.parent}: `srdata export {path.parent}`"
    runs = sorted(p.name for p in path.iterdir() if (p / MANIFEST_FILE).is_file()) if path.is_dir() else []
    if runs:
        listed = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        return f"{path} is a folder of runs ({listed}), not a run; pass one of them, e.g. `srdata export {path / runs[0]}`"
    return f"{path} holds no srdata run ({MANIFEST_FILE} missing); create one with `srdata score ... --output {path}`"


def _unfinished_message(path: Path, manifest: Manifest) -> str:
    shards = manifest.shards
    missing = [s for s in shards if not s.done or not (path / s.file).is_file()]
    listed = ", ".join(f"{s.file} (rows {s.start}-{s.stop - 1})" for s in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    detail = f"{len(missing)} of {len(shards)} shards are missing: {listed}{more}" if missing else "no shard is missing, but the final merge did not run"
    return (
        f"the run in {path} is not finished (status {manifest.status!r}): {detail}. "
        "Resume it by rerunning the same `srdata score` command"
    )


def file_identity(path: Path) -> tuple[int, ...] | None:
    """Which file ``path`` is now: device, inode, size and modification time (``None`` if there is none).

    Compared before and after a command reads a run, it tells whether the file was replaced
    meanwhile (``srdata rank`` and ``srdata score`` replace it in one rename).

    Example:
        >>> file_identity(Path("/dev/null")) == file_identity(Path("/dev/null"))
        True
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _identities(store: RunStore) -> tuple[tuple[int, ...] | None, ...]:
    return file_identity(store.annotated_path), file_identity(store.manifest_path)


def check_unchanged(run: Run, command: str, out_dir: Path) -> None:
    """Refuse to publish what was made from a run replaced since :func:`read_run` (it could mix two rankings).

    Both ``annotated.parquet`` and ``manifest.json`` (the ranking settings) are compared.
    """
    if _identities(run.store) != run.read_at:
        raise CurriculumError(
            f"{run.annotated} was replaced while this {command} read it (by `srdata rank` or `srdata score`); "
            f"nothing in {out_dir} was changed: run `srdata {command}` again"
        )
