"""Checkpoint folders of ``srd-distill``: marked as ours when created, sealed with checksums, verified before use.

Every checkpoint folder this tool writes (a stage's ``.stage-N.partial`` that becomes
``stage-N``, a step checkpoint ``.stage-N.step-K``) follows one life:

1. :func:`start_checkpoint` creates it empty and writes :data:`MARKER_FILE` into it *first*:
   a folder holding the marker was provably created by srd-distill, and only such folders
   are ever deleted (:func:`remove_checkpoint` refuses any other).
2. The files are written into it (a hidden name: nothing reads it yet).
3. :func:`seal_checkpoint` writes :data:`CHECKSUM_FILE` *last*: the SHA-256 and size of
   every other file in it.
4. It is published by one ``rename`` (:func:`publish_checkpoint`), so its final name only
   ever shows a complete, sealed folder.

:func:`verify_checkpoint` checks every file against the seal before the checkpoint is used
(resumed from, or loaded as the next stage's starting weights); a flipped bit, a truncated
file or a missing one is refused with the file named and the fix.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / ".stage-0.partial"
    >>> start_checkpoint(folder)
    >>> _ = (folder / "weights.bin").write_bytes(b"123")
    >>> seal_checkpoint(folder)
    >>> verify_checkpoint(folder, fix="retrain it")
    >>> sorted(recorded_files(folder))
    ['.srd-distill-checkpoint', 'weights.bin']
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from srd_distill.errors import RunFolderError
from srdata.run.io import FILE_MODE, IntegrityError, WriteError, file_sha256, verify_file, write_json_atomic, write_problem

__all__ = [
    "MARKER_FILE",
    "CHECKSUM_FILE",
    "CheckpointError",
    "start_checkpoint",
    "is_our_checkpoint",
    "remove_checkpoint",
    "seal_checkpoint",
    "recorded_files",
    "verify_checkpoint",
    "publish_checkpoint",
    "save_error",
]

MARKER_FILE = ".srd-distill-checkpoint"  # written first: the folder was created by srd-distill
CHECKSUM_FILE = "srd_checksums.json"  # written last: sha256 and size of every other file


class CheckpointError(RunFolderError):
    """A checkpoint differs from its seal, or a folder to replace is not srd-distill's; the message names it and the fix."""


def start_checkpoint(folder: Path) -> None:
    """Create ``folder`` empty with the marker in it (an earlier checkpoint of ours there is removed first).

    Example:
        >>> start_checkpoint(Path("runs/kd/.stage-1.partial"))   # doctest: +SKIP
    """
    try:
        if folder.exists() or folder.is_symlink():
            remove_checkpoint(folder)
        folder.mkdir(parents=True)
        marker = folder / MARKER_FILE
        marker.write_text(json.dumps({"tool": "srd-distill", "pid": os.getpid(), "host": socket.gethostname()}) + "\n",
                          encoding="utf-8")
        marker.chmod(FILE_MODE)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(write_problem(err, getattr(err, "filename", None) or folder)) from err


def is_our_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a real folder (not a link) that srd-distill created: it holds the marker."""
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER_FILE).is_file()


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder srd-distill created; refuse any other folder or file, touching nothing.

    The marker goes last, so a process killed while deleting leaves a folder that is still
    provably ours (and is removed by the next run) rather than one that looks foreign.

    Example:
        >>> remove_checkpoint(Path("runs/kd/.stage-1.partial"))   # doctest: +SKIP
    """
    if not (folder.exists() or folder.is_symlink()):
        return
    if not is_our_checkpoint(folder):
        raise CheckpointError(
            f"{folder} was not written by srd-distill (it holds no {MARKER_FILE}), so it is left as it is; "
            f"move it out of {folder.parent} or choose another --output"
        )
    for entry in folder.iterdir():
        if entry.name == MARKER_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / MARKER_FILE).unlink()
    folder.rmdir()


def seal_checkpoint(folder: Path) -> None:
    """Record the SHA-256 and size of every file in ``folder`` (subfolders included) in :data:`CHECKSUM_FILE`, last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE):
        files[path.relative_to(folder).as_posix()] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    write_json_atomic(folder / CHECKSUM_FILE, {"files": files})


def recorded_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The files the seal of ``folder`` lists (relative name -> sha256, bytes); refuse a missing or damaged seal."""
    seal = folder / CHECKSUM_FILE
    try:
        files = json.loads(seal.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v and "bytes" in v for v in files.values()):
            raise TypeError("files")
    except FileNotFoundError:
        raise CheckpointError(f"{seal} is missing") from None
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{seal} is damaged ({type(err).__name__}: {err})") from None
    for name in files:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(f"{seal} lists {name!r}, which is not a file inside {folder}: the seal was edited or damaged")
    return files


def verify_checkpoint(folder: Path, fix: str) -> None:
    """Check every file of a sealed checkpoint against its seal; refuse with the file named and ``fix``.

    Example:
        >>> verify_checkpoint(Path("runs/kd/stage-0"), fix="remove it to retrain stage 0")   # doctest: +SKIP
    """
    if not is_our_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a checkpoint written by srd-distill (no {MARKER_FILE} in it); {fix}")
    try:
        files = recorded_files(folder)
    except CheckpointError as err:
        raise CheckpointError(f"{err}: the checkpoint cannot be verified; {fix}") from None
    for name, record in files.items():
        try:
            verify_file(folder / name, record["sha256"], record["bytes"], fix=fix)
        except IntegrityError as err:
            raise CheckpointError(str(err)) from None


def publish_checkpoint(folder: Path, final: Path) -> None:
    """Seal ``folder`` and rename it to ``final`` in one step; ``final`` must not exist (or be an earlier one of ours)."""
    seal_checkpoint(folder)
    if final.exists() or final.is_symlink():
        remove_checkpoint(final)
    try:
        folder.replace(final)
    except OSError as err:
        raise WriteError(write_problem(err, final)) from err


def save_error(err: BaseException, folder: Path, what: str) -> WriteError | None:
    """A :class:`WriteError` naming the file and the fix for a failed save into ``folder``, or None when ``err`` is no I/O error.

    safetensors reports a full disk as a ``SafetensorError`` ("... No space left on device
    (os error 28)"), not as an ``OSError``; both are recognised.

    Example:
        >>> str(save_error(OSError(28, "No space left on device"), Path("runs/kd/.stage-1.partial"), "stage 1's checkpoint"))
        "could not write stage 1's checkpoint into runs/kd/.stage-1.partial: no space left on the device; free some space or choose a folder on another disk. Nothing finished is lost: run the same command again to resume"
    """
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    found = re.search(r"os error (\d+)", str(err))
    if code is None and found:
        code = int(found.group(1))
    if code is None and not isinstance(err, OSError):
        return None
    problem = write_problem(OSError(code, os.strerror(code) if code else str(err)), folder)
    target = getattr(err, "filename", None) or folder
    problem = problem.replace(f"could not write {folder}", f"could not write {what} into {target}", 1)
    return WriteError(f"{problem}. Nothing finished is lost: run the same command again to resume")

