"""A curriculum in object storage (``s3://bucket/curricula/a``), read through a verified local copy.

``curriculum.json`` is read first; an export interrupted while it published is refused; every
stage file it lists is downloaded and must have the bytes and SHA-256 recorded there
(:func:`srdata.run.storage.download_verified`); then the copy is checked like any local
export (:func:`srdata.curriculum.reader.verified_curriculum`). A copy already matching the record
is not downloaded again.

Example:
    >>> local_curriculum("runs/a/curriculum")
    PosixPath('runs/a/curriculum')
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from srdata.run.io import IntegrityError
from srdata.run.names import CURRICULUM_FILE, MANIFEST_FILE, PUBLISHING_KEY
from srdata.run.storage import Location, download, download_verified, is_remote, parse_location, read_bytes, remember_published, staging_folder

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def local_curriculum(path: str | os.PathLike[str], setting: str = "curriculum") -> Path:
    """``path`` as a local export folder: itself when local, else a verified copy of the remote export."""
    location = parse_location(path if isinstance(path, str) else Path(path), setting)
    if not location.is_remote:
        return location.local
    if location.name == CURRICULUM_FILE:
        location = parse_location(location.uri.rsplit("/", 1)[0], setting)
    data = read_bytes(location / CURRICULUM_FILE)
    if data is None and (inner := read_bytes(location / "curriculum" / CURRICULUM_FILE)) is not None:
        location, data = location / "curriculum", inner
    if data is None:
        raise FileNotFoundError(f"no {CURRICULUM_FILE} in {location} (or {location / 'curriculum'}); create one with "
                                f"`srdata export RUN_DIR --out {location}`")
    try:
        summary = json.loads(data)
        stages = summary["stages"]
        names = [stage["file"] for stage in stages]
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{location / CURRICULUM_FILE} is not a readable curriculum summary ({err}); export again") from None
    if summary.get(PUBLISHING_KEY):
        raise IntegrityError(f"an export into {location} was interrupted while it published its files: run "
                                       f"`srdata export` again into {location}")
    bad = [n for n in names if not isinstance(n, str) or not PLAIN_NAME.fullmatch(n)]
    if bad:
        raise IntegrityError(f"{location / CURRICULUM_FILE} lists {bad[0]!r}, which is not a file of the folder; export again")
    local = staging_folder(location, "curriculum")
    local.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if not download_verified(location / stage["file"], local / stage["file"], stage.get("sha256"), stage.get("file_bytes")):
            raise IntegrityError(f"stage file {location / stage['file']} is missing or does not match the checksum "
                                           f"{CURRICULUM_FILE} records for it; run `srdata export` again into {location}")
    (local / CURRICULUM_FILE).write_bytes(data)
    remember_published(local, location)
    return local


def run_manifest_copy(run_dir: str) -> Path:
    """A local folder holding a copy of the ``manifest.json`` of the run at ``run_dir`` (a URI); empty when it has none."""
    location: Location = parse_location(run_dir, "run")
    local = staging_folder(location, "manifest")
    local.mkdir(parents=True, exist_ok=True)
    (local / MANIFEST_FILE).unlink(missing_ok=True)
    if is_remote(run_dir):
        download(location / MANIFEST_FILE, local / MANIFEST_FILE)
    remember_published(local, location)
    return local
