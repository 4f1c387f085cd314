"""One writer per remote folder: a lock object created only if absent (S3 conditional put, ``If-None-Match: *``).

A local folder is locked with ``flock`` (:class:`srdata.run.io.FolderLock`); an object store has
no such thing, and no rename. The lock object ``FOLDER/.srdata.lock`` is put only if no
object of that name exists: S3 (and SeaweedFS, MinIO) answer 412 to the second writer, so
of two runs started together exactly one gets it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from srdata.run.io import HOST_TAG, LOCK_FILE, FolderBusyError
from srdata.run.storage import Location, StorageError, remove, store_errors


class RemoteLock:
    """One writer per remote folder: a ``.srdata.lock`` object created only if absent (S3 ``If-None-Match: *``).

    The object names the holder (PID, host, command, since). A second command is refused at
    once, naming it. A lock left by a killed process of this host (its PID no longer runs) is
    replaced, and said so; one of another host cannot be judged from here: refused, with the
    command that removes it once the user knows that run is gone. Released by deleting the
    object, only while it still holds this process's token.

    Example:
        >>> with RemoteLock(parse_location("s3://b/runs/a", "--output"), "srdata score"):   # doctest: +SKIP
        ...     ...
    """

    def __init__(self, folder: Location, command: str, say: Any = None) -> None:
        self.folder = folder
        self.location = folder / LOCK_FILE
        self.command = command
        self.say = say or (lambda message: None)
        self.token = uuid.uuid4().hex
        self.held = False

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "host_tag": HOST_TAG, "command": self.command,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}).encode() + b"\n"

    def acquire(self) -> "RemoteLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder, etag = self._holder()
            if holder is None:
                continue  # released meanwhile: try again
            if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
                if self._replace(etag):
                    self.say(f"replaced the lock of a run that no longer runs ({_describe(holder)}) in {self.folder}")
                    self.held = True
                    return self
                continue
            if holder.get("host") == socket.gethostname():
                raise FolderBusyError(f"{self.folder} is in use by another process ({_describe(holder)}); wait for it to "
                                      "finish, or choose another folder")
            raise FolderBusyError(
                f"{self.folder} is locked by a run on another machine ({_describe(holder)}): if it runs, wait for it to "
                f"finish; if it was killed, remove the lock yourself (e.g. `aws s3 rm {self.location.uri}`) and run again"
            )
        raise FolderBusyError(f"{self.folder}: could not take the lock {self.location.uri}; run the command again")

    def _create(self) -> bool:
        return self._put({"IfNoneMatch": "*"})

    def _replace(self, etag: str | None) -> bool:
        return etag is not None and self._put({"IfMatch": etag})

    def _put(self, condition: dict[str, str]) -> bool:
        fs = self.location.fs()
        bucket, _, key = self.location.path.partition("/")
        with store_errors(self.location, "lock"):
            if self.location.protocol not in ("s3", "s3a"):
                raise StorageError(f"{self.folder.setting} {self.folder.uri}: srdata can lock a folder on s3:// only; "
                                   "write runs to s3:// or to a local folder")
            from fsspec.asyn import sync

            try:
                sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=self._body(), **condition)
            except OSError as err:
                if _precondition_failed(err):
                    return False
                raise
        return True

    def _holder(self) -> tuple[dict[str, Any] | None, str | None]:
        fs = self.location.fs()
        bucket, _, key = self.location.path.partition("/")

        async def get() -> tuple[bytes, str | None]:
            # One GET for the body and its ETag (no race between them). Not fs.cat_file: s3fs 2026.9
            # answered FileNotFoundError for a lock object that HEAD and a plain GET found on SeaweedFS.
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response.get("ETag")

        with store_errors(self.location, "read"):
            from fsspec.asyn import sync

            try:
                data, etag = sync(fs.loop, get)
            except FileNotFoundError:
                return None, None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {"details": "unreadable"}
        return holder, etag

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder, _ = self._holder()
        if holder is not None and holder.get("token") == self.token:
            remove(self.location)

    def __enter__(self) -> "RemoteLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's live process counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _precondition_failed(err: BaseException) -> bool:
    while err is not None:
        text = str(err)
        if "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text or "412" in text:
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "its details are not readable"
    return f"{holder.get('command')}, PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
