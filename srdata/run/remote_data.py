"""A remote dataset (``s3://bucket/data/train.jsonl``, a glob, or a folder) copied into a local folder to be read.

Why copied, not streamed: a run's identity is the SHA-256 of its data's bytes
(:func:`srdata.run.identity.dataset_identity`), which reads every byte anyway, and every check
srdata makes on local files (UTF-8, JSON lines, empty files, a file changed while read) then
holds unchanged. The copy lives in srdata's staging folder for that location
(:func:`srdata.run.storage.staging_folder`); files keep their base names, so a local file and
its copy in a bucket are the same dataset.

Example:
    >>> fetch_dataset(["s3://bucket/data/train.jsonl"])    # doctest: +SKIP
    '/home/me/.cache/srdata/staging/data-train.jsonl-1a2b.../train.jsonl'
"""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

from srdata.run.storage import Location, StorageError, check_bucket, download, parse_location, staging_folder, store_errors


def fetch_dataset(parts: list[str]) -> str:
    """Download every remote part (file, glob or folder) and return the local paths, comma-separated, as ``srdata score`` takes them."""
    local = []
    for part in parts:
        location = parse_location(part, "dataset")
        check_bucket(location)  # a missing bucket or an endpoint that does not answer: said so, not "file not found"
        folder = staging_folder(location, "data")
        shutil.rmtree(folder, ignore_errors=True)  # srdata's own copy of an earlier read: the store is the truth
        fs = location.fs()
        with store_errors(location, "read"):
            if glob.has_magic(location.path):
                found = sorted(p for p in fs.glob(location.path) if fs.isfile(p))
                if not found:
                    raise StorageError(f"data file not found: {part} matches no object")
                names = [p.rsplit("/", 1)[-1] for p in found]
                twice = sorted({n for n in names if names.count(n) > 1})
                if twice:
                    raise StorageError(f"dataset {part} matches several objects named {twice[0]}; use a narrower pattern")
                for path, name in zip(found, names):
                    _get(Location(f"{location.protocol}://{path}", "dataset", location.protocol, path), folder / name)
                local.append(str(folder / _suffix_glob(names)))
            elif fs.isdir(location.path):
                root = location.path.rstrip("/") + "/"
                files = [p for p in fs.find(location.path) if not any(s.startswith((".", "__")) for s in p[len(root):].split("/"))]
                if not files:
                    raise StorageError(f"dataset folder {part} holds no files")
                for path in files:
                    _get(Location(f"{location.protocol}://{path}", "dataset", location.protocol, path), folder / path[len(root):])
                local.append(str(folder))
            elif fs.isfile(location.path):
                _get(location, folder / location.name)
                local.append(str(folder / location.name))
            else:
                raise StorageError(f"data file not found: {part} (no such object)")
    return ",".join(local)


def _get(location: Location, local: Path) -> None:
    if not download(location, local):
        raise StorageError(f"data file not found: {location.uri} (removed while it was read)")


def _suffix_glob(names: list[str]) -> str:
    """A pattern matching exactly the downloaded files: ``*.jsonl`` when they share a suffix (one builder reads them)."""
    suffixes = {Path(n).suffix for n in names}
    return f"*{suffixes.pop()}" if len(suffixes) == 1 else "*"
