"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one.

Every temporary file srdata writes is named ``.tmp-PID-...`` (PID: the writing process),
beside its final path. A process killed mid-write (``kill -9``, a lost node) leaves its
temp files behind; :func:`remove_stale_temps` deletes those whose process is gone, and
``srdata score`` and ``srdata export`` call it on their folders before any work.
Finished files get the ordinary permissions of the user's umask (0644 under umask 022),
not the 0600 of a raw temp file, so teammates on a shared file system can read results.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".tmp-"
_OURS = re.compile(r"^\.tmp-(?P<pid>\d+)-")
# Temp files of srdata versions before the PID naming: ".manifest.json.x1y2.tmp" and the like.
_LEGACY = re.compile(r"^\.(manifest\.json|annotated\.parquet|shard-\d+\.parquet|curriculum\.json|stage-\d+\.\w+)\..+\.tmp$")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
FILE_MODE = 0o666 & ~_read_umask()


def temp_path(path: str | Path, tag: str = "") -> Path:
    """A temp-file path beside ``path`` that :func:`remove_stale_temps` recognises.

    Example:
        >>> temp_path("out/stage-0.parquet").name.startswith(".tmp-")
        True
    """
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{tag}{path.name}")


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give ``tmp`` the umask's permissions and move it onto ``path`` in one step."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)  # atomic on POSIX within one file system


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Example:
        >>> with atomic_path("out/table.parquet") as tmp:   # doctest: +SKIP
        ...     frame.write_parquet(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_path(path).name.removesuffix(path.name), suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete srdata temp files in ``folder`` left by processes that no longer run.

    Temp files of a live process (another run writing there right now) are kept.

    Example:
        >>> remove_stale_temps("runs/a")   # doctest: +SKIP
        [PosixPath('runs/a/.tmp-4242-x1y2-manifest.json')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        ours = _OURS.match(entry.name)
        stale = (ours and not _alive(int(ours["pid"]))) or (not ours and _LEGACY.match(entry.name))
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
