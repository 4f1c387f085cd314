"""Where a run may write: an output folder that its own dataset reads, or whose files would replace the data, is refused.

Checked before any work, for local folders and remote locations (``s3://...``) alike.
"""

from __future__ import annotations

import fnmatch
import glob
from pathlib import Path

from srdata.run.names import ANNOTATED_FILE, MANIFEST_FILE, SHARD_FILE, RunDirError
from srdata.run.storage import is_remote, parse_location


def _written_by_a_run(output: Path, path: Path) -> bool:
    """Whether ``path`` is a file that a run in ``output`` writes (manifest, annotated table, shards)."""
    if output not in path.parents:
        return False
    name = path.relative_to(output).as_posix()
    return name in (MANIFEST_FILE, ANNOTATED_FILE) or SHARD_FILE.match(name) is not None


def check_output_location(dataset: str, output: str | Path) -> None:
    """Refuse an output folder that the run's own loading would read, or whose files would replace the data.

    A dataset folder holding the output folder (or held by it) would read the run's own parquet
    files, and change the dataset's fingerprint with every shard; a data file or glob that is,
    or could match, a file the run writes would be overwritten. Checked before any work.

    Example:
        >>> check_output_location("data", "data/run")   # doctest: +SKIP
        RunDirError: output folder data/run is inside the dataset folder data: ...
    """
    target = parse_location(output, "--output")
    parts = [p.strip() for p in dataset.split(",")]
    for part in parts:  # an unknown scheme, a missing package or a lost slash: refused before the folder is made
        parse_location(part, "dataset")
    if target.is_remote or any(is_remote(p) for p in parts):
        _check_remote(parts, target.uri if target.is_remote else None, str(output))
        if target.is_remote:
            return
    out = target.local.resolve()
    for part in parts:
        if is_remote(part):
            continue
        part = str(parse_location(part, "dataset").local)
        path = Path(part)
        if path.is_dir():
            folder = path.resolve()
            if folder == out or folder in out.parents:
                raise RunDirError(
                    f"output folder {output} is inside the dataset folder {part}: loading the dataset would read the run's "
                    f"own files; choose an --output outside {part}"
                )
            if out in folder.parents:
                raise RunDirError(f"the dataset folder {part} is inside the output folder {output}; move it, or choose another --output")
            continue
        matches = [Path(m).resolve() for m in glob.glob(part)]
        if glob.has_magic(part) and not glob.has_magic(str(path.parent)):
  # files the run will write, matched later
            parent = path.parent.resolve()
            ours = [out / MANIFEST_FILE, out / ANNOTATED_FILE, out / "shards" / "shard-00000.parquet"]
            matches += [w for w in ours if w.parent == parent and fnmatch.fnmatchcase(w.name, path.name)]
        clash = next((m for m in matches if _written_by_a_run(out, m)), None)
        if clash is not None:
            raise RunDirError(
                f"dataset {part} reads {clash}, a file the run writes in the output folder {output}; move the dataset, "
                "or choose another --output"
            )


def _check_remote(parts: list[str], out: str | None, output: str) -> None:
    """The same rule for URIs: a dataset inside the remote output folder (or holding it) is refused.

    Example:
        >>> _check_remote(["s3://b/data/d.jsonl"], "s3://b/data", "s3://b/data")   # doctest: +SKIP
        RunDirError: dataset s3://b/data/d.jsonl is inside the output folder s3://b/data: ...
    """
    if out is None:
        return
    out = out.rstrip("/")
    for part in parts:
        if not is_remote(part):
            continue
        data = parse_location(part, "dataset").uri.rstrip("/")
        if data == out or data.startswith(out + "/"):
            raise RunDirError(f"dataset {part} is inside the output folder {output}: the run's own files would be read or "
                              "replaced; choose another --output")
        if out.startswith(data + "/"):
            raise RunDirError(f"output folder {output} is inside the dataset folder {part}: loading the dataset would read "
                              f"the run's own files; choose an --output outside {part}")
