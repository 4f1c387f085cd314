"""Where a user's path points: a local folder or file, or an object store (``s3://``, ``gs://``, ``hf://``, ...).

Every path a user gives srdata and srd-distill goes through :func:`parse_location`:

* no scheme, or ``file://``: a local path (``file:///data/a.jsonl`` is ``/data/a.jsonl``);
* a scheme that fsspec knows (``s3://`` through s3fs, ``gs://`` through gcsfs, ``hf://``
  through huggingface_hub, ...): a remote location, read and written through fsspec;
* anything else, or a scheme whose package is not installed, a :class:`StorageError` that
  names the setting and the fix. Never a local folder named ``s3:``.

Credentials and the endpoint come from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``), then from
``SRDATA_STORAGE_OPTIONS`` (JSON), then from ``--storage-options`` (JSON, :func:`use_options`):
keyword arguments of the fsspec filesystem, later ones winning. Connections time out after a
few seconds and are retried only twice, so an endpoint that does not answer is an error in
seconds, not minutes.

Object stores have no rename, so nothing is published by renaming: a data object is put
whole (a PUT is atomic: readers see the old object or the new one), its SHA-256 and size are
recorded in a manifest object put after it, and readers trust only objects a manifest
records, checked against the record (:func:`download_verified`). A folder's one writer is
held by a lock object (:class:`srdata.run.remote_lock.RemoteLock`).

Example:
    >>> parse_location("runs/a", "--output").is_remote
    False
    >>> parse_location("file:///tmp/runs/a", "--output").local
    PosixPath('/tmp/runs/a')
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from srdata.run.io import WriteError, atomic_path, file_sha256

SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)
# What a URI becomes once a Path() swallowed one of its slashes ("s3://b/x" -> "s3:/b/x").
MANGLED = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/(?!/)")
OPTIONS_ENV = "SRDATA_STORAGE_OPTIONS"
INSTALL_HINTS = {"s3": "s3fs (pip install 'srdata[s3]')", "s3a": "s3fs (pip install 'srdata[s3]')", "gs": "gcsfs (pip install gcsfs)",
                 "gcs": "gcsfs (pip install gcsfs)", "az": "adlfs (pip install adlfs)", "abfs": "adlfs (pip install adlfs)",
                 "hf": "huggingface_hub (pip install huggingface_hub)"}
LOCAL_SCHEMES = {"file", "local"}
# Short connection timeouts, few retries: an endpoint that does not answer fails in seconds.
S3_DEFAULTS: dict[str, Any] = {"retries": 2, "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                                               "retries": {"max_attempts": 2, "mode": "standard"}}}
_OPTIONS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("srdata_storage_options", default={})
STAGING_ENV = "SRDATA_STAGING"
STORAGE_OPTIONS_HELP = ("Remote storage options as JSON, e.g. '{\"endpoint_url\": \"http://host:8333\"}' (fsspec keyword "
                        "arguments; credentials also from AWS_* variables and SRDATA_STORAGE_OPTIONS). Not recorded.")
_PUBLISHED: dict[str, str] = {}  # local copy -> the remote location it was published to or read from
_TARGETS: dict[str, "Location"] = {}  # staging folder -> the remote location its files are published to


class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, missing package, credentials, bucket, endpoint); the message names it and the fix."""


@dataclass(frozen=True)
class Location:
    """A parsed user path: local (``local`` is its Path) or remote (``protocol`` and fsspec ``path``).

    Example:
        >>> loc = parse_location("s3://bucket/runs/a", "--output")   # doctest: +SKIP
        >>> loc.protocol, loc.path, str(loc / "manifest.json")         # doctest: +SKIP
        ('s3', 'bucket/runs/a', 's3://bucket/runs/a/manifest.json')
    """

    uri: str
    setting: str
    protocol: str | None = None
    path: str = ""

    @property
    def is_remote(self) -> bool:
        return self.protocol is not None

    @property
    def local(self) -> Path:
        if self.protocol is not None:
            raise StorageError(f"{self.setting} {self.uri} is remote, not a local path")
        return Path(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "Location":
        if self.protocol is None:
            child = str(Path(self.path) / name)
            return Location(child, self.setting, None, child)
        return Location(f"{self.uri.rstrip('/')}/{name}", self.setting, self.protocol, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def fs(self) -> Any:
        """The fsspec filesystem of a remote location (credentials checked before any request)."""
        return filesystem(self)


def scheme_of(value: str | os.PathLike[str]) -> str | None:
    """The URI scheme of ``value`` (lower case), or ``None`` for a plain path.

    Example:
        >>> scheme_of("S3://b/k"), scheme_of("runs/a"), scheme_of("file:///tmp")
        ('s3', None, 'file')
    """
    match = SCHEME.match(os.fspath(value)) if isinstance(value, str) else None
    return match["scheme"].lower() if match else None


def is_remote(value: Any) -> bool:
    """Whether ``value`` is a URI of a remote store (not a plain path, not ``file://``).

    Example:
        >>> is_remote("s3://b/x"), is_remote("runs/a"), is_remote("file:///tmp/a")
        (True, False, False)
    """
    if isinstance(value, Location):
        return value.is_remote
    scheme = scheme_of(value) if isinstance(value, str) else None
    return scheme is not None and scheme not in LOCAL_SCHEMES


def parse_location(value: str | os.PathLike[str] | Location, setting: str) -> Location:
    """Parse a user's path for ``setting`` (named in every error): local, ``file://``, or a supported remote scheme.

    Example:
        >>> parse_location("file:///tmp/a", "--out").local
        PosixPath('/tmp/a')
        >>> parse_location("nosuch://b/a", "--out")
        Traceback (most recent call last):
        ...
        srdata.run.storage.StorageError: --out nosuch://b/a: the scheme nosuch:// is not a storage srdata knows (fsspec has no filesystem of that name); use a local path, file://, s3://, gs:// or hf://
    """
    if isinstance(value, Location):
        return value
    if not isinstance(value, str):  # a Path: always local (a URI never survives Path(), see MANGLED)
        return Location(os.fspath(value), setting, None, _checked_local(os.fspath(value), setting))
    match = SCHEME.match(value)
    if match is None:
        return Location(value, setting, None, _checked_local(value, setting))
    scheme, rest = match["scheme"].lower(), match["rest"]
    if scheme in LOCAL_SCHEMES:
        host, _, tail = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"{setting} {value}: a file:// URI names a file on this machine (file:///path); "
                               f"{host!r} is another host")
        return Location(value, setting, None, "/" + tail)
    _filesystem_class(scheme, value, setting)
    if not rest.strip("/"):
        raise StorageError(f"{setting} {value} names no bucket or folder; write it as {scheme}://BUCKET/FOLDER")
    return Location(f"{scheme}://{rest}", setting, scheme, rest.rstrip("/"))


def local_path(value: str | os.PathLike[str], setting: str) -> Path:
    """``value`` as a local path for a setting that takes only local paths; a remote URI is refused, naming the setting.

    Example:
        >>> local_path("file:///tmp/x", "--eval-file")
        PosixPath('/tmp/x')
    """
    location = parse_location(value, setting)
    if location.is_remote:
        raise StorageError(f"{setting} {value}: this takes a local path only. Remote storage (s3://, gs://, hf://) is "
                           "read and written by `srdata score` (DATASET, --output), `srdata teach` (RUN_DIR), `srdata export` (RUN_DIR, --out), "
                           "load_curriculum and `srd-distill train` (--curriculum, --data, --output, --teacher-logits); "
                           "copy it to a local path first")
    return location.local


def _checked_local(path: str, setting: str) -> str:
    mangled = MANGLED.match(path)
    if mangled and not Path(path.split("/", 1)[0]).exists():
        raise StorageError(f"{setting} {path} looks like a URI that lost a slash ({mangled['scheme']}:/ instead of "
                           f"{mangled['scheme']}://); write {mangled['scheme']}://... (srdata would otherwise create a "
                           f"local folder named {mangled['scheme']}:)")
    return path


def _filesystem_class(scheme: str, value: str, setting: str) -> Any:
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError:
        need = INSTALL_HINTS.get(scheme, "the fsspec package for it")
        raise StorageError(f"{setting} {value}: reading {scheme}:// needs {need}, which is not installed") from None
    except ValueError:
        raise StorageError(f"{setting} {value}: the scheme {scheme}:// is not a storage srdata knows (fsspec has no "
                           "filesystem of that name); use a local path, file://, s3://, gs:// or hf://") from None


# ---------------------------------------------------------------------------- options and filesystems
@contextlib.contextmanager
def use_options(options: dict[str, Any] | str | None) -> Iterator[None]:
    """Use ``options`` (``--storage-options``: a dict or its JSON) for every remote location opened inside.

    Example:
        >>> with use_options('{"anon": true}'):
        ...     options_for("s3")["anon"]
        True
    """
    parsed = parse_options(options, "--storage-options")
    token = _OPTIONS.set({**_OPTIONS.get(), **parsed})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def parse_options(options: dict[str, Any] | str | None, setting: str) -> dict[str, Any]:
    """Storage options as a dict; JSON text is parsed, and a bad one is refused naming ``setting``."""
    if options is None or options == "":
        return {}
    if isinstance(options, dict):
        return options
    try:
        parsed = json.loads(options)
    except ValueError as err:
        raise StorageError(f"{setting} is not valid JSON ({err}); write it as '{{\"key\": \"value\"}}'") from None
    if not isinstance(parsed, dict):
        raise StorageError(f"{setting} must be a JSON object of filesystem options, not a {type(parsed).__name__}")
    return parsed


def options_for(protocol: str) -> dict[str, Any]:
    """The fsspec options of ``protocol``: srdata's defaults, the environment, ``SRDATA_STORAGE_OPTIONS``, ``--storage-options``.

    An options object may also hold one object per protocol (``{"s3": {...}, "gs": {...}}``).

    Example:
        >>> options_for("s3")["config_kwargs"]["connect_timeout"]
        5
    """
    merged: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        merged = json.loads(json.dumps(S3_DEFAULTS))
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            merged["endpoint_url"] = endpoint
        if region:
            merged.setdefault("client_kwargs", {})["region_name"] = region
    for layer in (parse_options(os.environ.get(OPTIONS_ENV), OPTIONS_ENV), _OPTIONS.get()):
        if protocol in layer and isinstance(layer[protocol], dict):
            layer = layer[protocol]
        elif any(isinstance(v, dict) and k in INSTALL_HINTS for k, v in layer.items()):
            layer = {}  # options of other protocols only
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def filesystem(location: Location) -> Any:
    """The fsspec filesystem of ``location``; missing credentials (S3) are refused before any request."""
    import logging

    import fsspec

    for name in ("botocore.credentials", "aiobotocore.credentials"):  # "Found credentials in environment variables"
        logging.getLogger(name).setLevel(logging.WARNING)
    options = options_for(location.protocol or "file")
    if location.protocol in ("s3", "s3a"):
        _check_s3_credentials(location, options)
    retries = options.pop("retries", None) if location.protocol in ("s3", "s3a") else None
    try:
        fs = fsspec.filesystem(location.protocol, **options)
        if retries is not None:
            fs.retries = int(retries)  # s3fs's own retry loop (a class attribute, not an argument)
        return fs
    except (TypeError, ValueError) as err:
        raise StorageError(f"{location.setting} {location.uri}: the storage options are not accepted ({err})") from None


def _check_s3_credentials(location: Location, options: dict[str, Any]) -> None:
    if options.get("anon") or options.get("key") or options.get("session") is not None:
        return
    import botocore.session

    session = botocore.session.Session(profile=options.get("profile"))
    try:
        found = session.get_credentials()
    except Exception as err:  # a broken profile or config file
        raise StorageError(f"{location.setting} {location.uri}: could not read the AWS credentials ({err})") from None
    if found is None:
        raise StorageError(
            f"{location.setting} {location.uri}: no credentials for S3. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
            "AWS_ENDPOINT_URL for a server other than AWS), use an AWS profile, or pass --storage-options "
            "'{\"anon\": true}' for a public bucket"
        )


def storage_problem(err: BaseException, location: Location, action: str) -> StorageError:
    """A clear error for a failed request: endpoint unreachable, bucket missing, access denied, or the store's own words."""
    text = f"{type(err).__name__}: {err}"
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    names = {type(e).__name__ for e in chain}
    texts = " ".join(str(e) for e in chain)
    endpoint = options_for(location.protocol or "").get("endpoint_url") or "the store"
    where = f"{location.setting} {location.uri}"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ClientConnectorError",
                "ServerTimeoutError", "ConnectTimeout", "ReadTimeoutError"} or "Could not connect" in texts:
        return StorageError(f"could not {action} {where}: {endpoint} does not answer ({text}); check AWS_ENDPOINT_URL "
                            "(or endpoint_url in --storage-options) and that the server runs")
    if "NoSuchBucket" in texts or "bucket does not exist" in texts.lower():
        return StorageError(f"could not {action} {where}: the bucket {location.path.split('/', 1)[0]} does not exist at "
                            f"{endpoint}; create it, or check the name")
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageError(f"could not {action} {where}: no credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(err, PermissionError) or "AccessDenied" in texts or "InvalidAccessKeyId" in texts or "SignatureDoesNotMatch" in texts:
        return StorageError(f"could not {action} {where}: access denied ({text}); check the credentials and the bucket's permissions")
    return StorageError(f"could not {action} {where}: {text}")


@contextlib.contextmanager
def store_errors(location: Location, action: str) -> Iterator[None]:
    """Turn any error of the requests made inside into a :class:`StorageError` naming ``location`` and the fix."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        if type(err).__module__.startswith(("srdata.", "srd_distill.")):  # our own messages pass unchanged
            raise
        if isinstance(err, FileNotFoundError) and "bucket" not in str(err).lower():
            raise
        raise storage_problem(err, location, action) from None


# ---------------------------------------------------------------------------- objects
def exists(location: Location) -> bool:
    """Whether an object (or a folder, a prefix holding objects) exists at ``location``."""
    fs = location.fs()
    with store_errors(location, "read"):
        return bool(fs.exists(location.path))


def check_bucket(location: Location) -> None:
    """Refuse, before anything is written, a bucket that does not exist or cannot be reached."""
    fs = location.fs()
    bucket = location.path.split("/", 1)[0]
    with store_errors(location, "reach"):
        try:
            if location.protocol in ("s3", "s3a"):
                from fsspec.asyn import sync

                sync(fs.loop, fs._call_s3, "head_bucket", Bucket=bucket)
            elif not fs.exists(bucket):
                raise FileNotFoundError(bucket)
        except FileNotFoundError:  # HEAD of a missing bucket: 404, without the store's words
            raise storage_problem(FileNotFoundError("NoSuchBucket"), location, "reach") from None


def list_names(location: Location) -> list[str]:
    """Every object below ``location``, as names relative to it (``shards/shard-00000.parquet``), sorted."""
    fs = location.fs()
    root = location.path.rstrip("/") + "/"
    with store_errors(location, "list"):
        try:
            found = fs.find(location.path, withdirs=False)
        except FileNotFoundError:
            return []
    return sorted(p[len(root):] for p in found if p.startswith(root))


def read_bytes(location: Location) -> bytes | None:
    """The bytes of the object at ``location``; ``None`` when there is none."""
    fs = location.fs()
    with store_errors(location, "read"):
        try:
            return fs.cat_file(location.path)
        except FileNotFoundError as err:
            if "bucket" in str(err).lower():
                raise
            return None


def write_bytes(location: Location, data: bytes) -> None:
    """Put one object, whole (an S3 PUT is atomic: readers see the old object or the new one)."""
    fs = location.fs()
    with store_errors(location, "write"):
        fs.pipe_file(location.path, data)


def upload(local: Path, location: Location) -> dict[str, Any]:
    """Put a local file as one object; return its ``sha256`` and ``bytes``, checked against the object's size."""
    digest, size = file_sha256(local), local.stat().st_size
    fs = location.fs()
    with store_errors(location, "write"):
        fs.put_file(str(local), location.path)
        stored = fs.info(location.path).get("size")
    if stored != size:
        raise WriteError(f"could not write {location.uri}: the store holds {stored} bytes of {size}; run the command again")
    return {"sha256": digest, "bytes": size}


def remove(location: Location) -> None:
    """Delete one object (no error when it is gone already)."""
    fs = location.fs()
    with store_errors(location, "remove"):
        try:
            fs.rm_file(location.path)
        except FileNotFoundError:
            pass


class _NoObject(Exception):
    """Raised inside :func:`download`'s atomic write so that no file is published for a missing object."""


def download(location: Location, local: Path) -> bool:
    """Copy one object to ``local`` atomically; ``False`` when there is no such object (``local`` is then left as it was)."""
    fs = location.fs()
    try:
        with store_errors(location, "read"), atomic_path(local) as tmp:
            try:
                fs.get_file(location.path, str(tmp))
            except FileNotFoundError as err:
                if "bucket" in str(err).lower():
                    raise
                raise _NoObject() from None  # not a return: that would publish the empty temp file as ``local``
    except _NoObject:
        return False
    return True


def download_verified(location: Location, local: Path, sha256: str | None, size: int | None, reuse: bool = True) -> bool:
    """Make ``local`` a copy of the object, checked against its record; ``False`` when the object is missing or differs.

    With ``reuse``, a local copy that already matches the record is kept (no download): right
    for reading; a writer that vouches for the remote object itself must check that (``reuse=False``).
    """
    if reuse and sha256 is not None and local.is_file() and (size is None or local.stat().st_size == size) and file_sha256(local) == sha256:
        return True
    if not download(location, local):
        return False
    if (size is not None and local.stat().st_size != size) or (sha256 is not None and file_sha256(local) != sha256):
        local.unlink(missing_ok=True)
        return False
    return True


def staging_folder(location: Location, kind: str) -> Path:
    """The local folder where work for ``location`` is prepared (``SRDATA_STAGING``, else ~/.cache/srdata/staging).

    The same location gets the same folder, so a rerun on this machine finds what it left.

    Example:
        >>> staging_folder(Location("s3://b/r", "--output", "s3", "b/r"), "run").name.startswith("run-")
        True
    """
    root = Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "srdata" / "staging")
    digest = hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    return root / f"{kind}-{location.name or 'root'}-{digest}"


def remember_published(local: Path, location: Location, publish: bool = False) -> None:
    """Note that the local folder ``local`` is a copy of ``location`` (for :func:`shown`); with ``publish``, the
    staging folder whose files are to be published there (for :func:`remote_of`)."""
    _PUBLISHED[str(Path(local).resolve())] = location.uri
    if publish:
        _TARGETS[str(Path(local).resolve())] = location


def remote_of(local: str | os.PathLike[str]) -> Location | None:
    """The remote location a staging folder publishes to; ``None`` for an ordinary local folder."""
    return _TARGETS.get(str(Path(local).resolve()))


def shown(path: str | os.PathLike[str]) -> str:
    """How to name ``path`` to the user: the remote location a local copy stands for, else the path itself.

    Example:
        >>> shown("runs/a")
        'runs/a'
    """
    text = os.fspath(path)
    return _PUBLISHED.get(str(Path(text).resolve()), text) if not is_remote(text) else text
