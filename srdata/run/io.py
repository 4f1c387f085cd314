"""Safe files: atomic writes, one writer per folder, checksums, and no file of the user's touched.

* **Atomic writes.** Every file is written to a temp file beside its final path and moved
  into place in one step (:func:`atomic_path`), so a reader never sees a half-written file
  and a crash never leaves one.
* **Temp files carry a marker.** They are named ``.tmp-srdata-HOST-PID-...``: HOST is a short
  hash of this machine's name, PID the writing process. A process killed mid-write leaves its
  temp files behind; :func:`remove_stale_temps` deletes only files with this marker, written on
  this host by a process that no longer runs. Nothing else in a folder is ever removed by it.
* **One writer per folder.** :class:`FolderLock` holds an exclusive ``flock`` on
  ``FOLDER/.srdata.lock`` for as long as a command writes there; a second command on the same
  folder is refused at once with the holder's PID and command. The kernel drops the lock when
  its process dies, so a killed run never leaves a folder locked.
* **Checksums.** :func:`file_sha256` fingerprints a finished file; :func:`verify_file` checks one
  against its record before it is trusted, naming the file when it differs.
* **Clear write errors.** A full disk, a read-only folder or a missing permission while writing
  becomes a :class:`WriteError` that names the file and the fix, with no temp file left behind.

Finished files get the ordinary permissions of the user's umask (0644 under umask 022),
not the 0600 of a raw temp file, so teammates on a shared file system can read results.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import polars as pl

TEMP_PREFIX = ".tmp-srdata-"
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OURS = re.compile(r"^\.tmp-srdata-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
LOCK_FILE = ".srdata.lock"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
FILE_MODE = 0o666 & ~_read_umask()


class WriteError(OSError):
    """A file could not be written (disk full, read-only, no permission); the message names it and the fix."""


class IntegrityError(ValueError):
    """A file differs from what was recorded when it was written (size or checksum); the message names it."""


class FolderBusyError(ValueError):
    """Another process holds the folder's lock; the message names it."""


def write_problem(err: OSError, path: str | Path) -> str:
    """A sentence saying why ``path`` could not be written and what to do.

    Example:
        >>> write_problem(OSError(errno.ENOSPC, "No space left on device"), "out/a.parquet")
        'could not write out/a.parquet: no space left on the device; free some space or choose a folder on another disk'
    """
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        why = "no space left on the device; free some space or choose a folder on another disk"
    elif code == errno.EROFS:
        why = "the file system is read-only; choose a writable folder"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied; make the folder writable or choose another one"
    elif code == errno.EFBIG:
        why = "the file is larger than this system allows (ulimit -f); raise the limit or write elsewhere"
    else:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        why = f"{reason}"
    return f"could not write {path}: {why}"


def temp_path(path: str | Path, tag: str = "") -> Path:
    """A temp-file path beside ``path`` that :func:`remove_stale_temps` recognises as this tool's.

    Example:
        >>> temp_path("out/stage-0.parquet").name.startswith(".tmp-srdata-")
        True
    """
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{HOST_TAG}-{os.getpid()}-{tag}{path.name}")


def is_our_temp(name: str) -> bool:
    """Whether a file name carries this tool's temp-file marker.

    Example:
        >>> is_our_temp(temp_path("a.parquet").name), is_our_temp(".tmp-42-a.parquet")
        (True, False)
    """
    return _OURS.match(name) is not None


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give ``tmp`` the umask's permissions and move it onto ``path`` in one step."""
    try:
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except OSError as err:
        raise WriteError(write_problem(err, path)) from err


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    An ``OSError`` while writing (disk full, read-only folder) becomes a :class:`WriteError`
    naming ``path``; the temp file is removed and ``path`` keeps its earlier content.

    Example:
        >>> with atomic_path("out/table.parquet") as tmp:   # doctest: +SKIP
        ...     frame.write_parquet(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_path(path).name.removesuffix(path.name), suffix=f"-{path.name}", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(write_problem(err, path)) from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        publish(tmp, path)
    except WriteError:
        raise
    except OSError as err:  # pyarrow's and polars' IO errors are OSErrors too
        raise WriteError(write_problem(err, path)) from err
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
    """Delete this tool's temp files in ``folder`` left by processes of this host that no longer run.

    Only files named by :func:`temp_path` are candidates: a file without the marker, one written
    on another host (a shared file system) or by a live process is kept.

    Example:
        >>> remove_stale_temps("runs/a")   # doctest: +SKIP
        [PosixPath('runs/a/.tmp-srdata-1a2b3c4d-4242-x1y2-manifest.json')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        ours = _OURS.match(entry.name)
        if ours and ours["host"] == HOST_TAG and not _alive(int(ours["pid"])) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex.

    Example:
        >>> file_sha256("/dev/null")
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    with open(path, "rb") as f:
        if sys.version_info >= (3, 11):
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()


def verify_file(path: str | Path, sha256: str | None, size: int | None = None, fix: str = "") -> None:
    """Refuse a file whose bytes differ from its record (size first: cheap, then the checksum).

    Example:
        >>> verify_file("/dev/null", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    """
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing{hint}")
    if size is not None and path.stat().st_size != size:
        raise IntegrityError(f"{path} has {path.stat().st_size} bytes, {size} were written: the file was changed or damaged{hint}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise IntegrityError(f"{path} does not match the checksum recorded when it was written: the file was changed or damaged{hint}")


def read_shard_rows(path: str | Path, start: int, stop: int, columns: list[str] | None = None, fix: str = "") -> pl.DataFrame:
    """A shard's parquet table, refused unless it reads and its ``srd_id`` column is rows start..stop-1.

    Check its bytes against its record first with :func:`verify_file`; this checks what the bytes hold.
    Raises :class:`IntegrityError` naming the file (and ``fix``). ``columns`` must include ``srd_id``.

    Example:
        >>> read_shard_rows("run/shards/shard-00001.parquet", 4, 8, ["srd_id"]).height   # doctest: +SKIP
        4
    """
    import polars as pl  # only the readers of shards need it (the lock and the temps do not)

    hint = f"; {fix}" if fix else ""
    try:
        frame = pl.read_parquet(path, columns=columns)
    except Exception as err:  # bytes as recorded, yet unreadable: refuse rather than guess
        raise IntegrityError(f"{path} cannot be read ({type(err).__name__}: {err}){hint}") from None
    if frame["srd_id"].to_list() != list(range(start, stop)):
        raise IntegrityError(f"{path} does not hold exactly rows {start}..{stop - 1} in its srd_id column{hint}")
    return frame


class FolderLock:
    """One writer per folder: an exclusive ``flock`` on ``FOLDER/.srdata.lock``.

    Taken before a command reads the folder's state and held until it ends; a second command
    on the same folder (this host or another one on a file system with working locks) fails at
    once with :class:`FolderBusyError`, naming the holder. The lock file itself stays (removing
    it would let two processes lock two different files); it is the only file a lock adds.

    Example:
        >>> with FolderLock("runs/a", "srdata score"):    # doctest: +SKIP
        ...     ...
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise WriteError(write_problem(err, path)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WriteError(write_problem(err, path)) from err
            raise FolderBusyError(
                f"{self.folder} is in use by another process ({self._holder(path)}); "
                "wait for it to finish, or choose another folder"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as err:  # a full disk: the lock is held, but say which file could not be written
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise WriteError(write_problem(err, path)) from err
        self._fd = fd
        return self

    @staticmethod
    def _holder(path: Path) -> str:
        # The holder writes its details just after it takes the lock; a process refused in
        # that instant (two started together) waits a moment for them rather than naming no
        # one, or the earlier holder (a dead process of this host) whose details are still there.
        for _ in range(50):
            try:
                info = json.loads(path.read_text(encoding="utf-8") or "{}")
                if info["host"] == socket.gethostname() and not _alive(int(info["pid"])):
                    raise ValueError("the details of an earlier holder")
                return f"{info['command']}, PID {info['pid']} on {info['host']}, since {info['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.02)
        return "its details are not readable yet"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_tool_file(name: str) -> bool:
    """Names this tool may leave in a folder by itself: the lock file and its marked temp files."""
    return name == LOCK_FILE or is_our_temp(name)
