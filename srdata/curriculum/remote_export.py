"""``srdata export`` from or to object storage (``s3://...``): read a local copy, write a local copy, publish it.

* A remote run (``RUN_DIR`` = ``s3://bucket/runs/a``) is read through a local copy of its
  ``manifest.json`` and ``annotated.parquet`` (refused, as a local one, unless complete).
* A remote ``--out`` (or the default ``RUN_DIR/curriculum`` of a remote run) is checked by
  the local rules on its objects (:func:`srdata.curriculum.output.check_remote_output`),
  locked by a lock object, exported into a local staging folder by the ordinary export,
  then published in the same order as a local export: marked summary, stage files,
  removals, summary (:func:`srdata.curriculum.output.publish_remote_export`).
* ``curriculum.json`` names the run by its URI (``source.run_dir``), so srd-distill and
  ``add_chat_messages`` find its manifest in the store.

Example:
    >>> export_curriculum("s3://bucket/runs/a", out="s3://bucket/curricula/a")   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from srdata.curriculum.cut import CurriculumError
from srdata.curriculum.output import check_remote_output, publish_remote_export
from srdata.curriculum.replacing import recorded_decisions, replaced_export
from srdata.run.folder import ANNOTATED_FILE, CURRICULUM_FILE, MANIFEST_FILE
from srdata.run.io import write_json_atomic
from srdata.run.remote_lock import RemoteLock
from srdata.run.storage import Location, download, is_remote, parse_location, remember_published, staging_folder

log = logging.getLogger(__name__)


def remote_capable(export: Callable[..., Path]) -> Callable[..., Path]:
    """Let ``export(run_dir, ..., out=...)`` take remote locations; local ones call it unchanged.

    Example:
        >>> @remote_capable
        ... def export(run_dir, out=None): return Path(out or run_dir)
        >>> export("runs/a")
        PosixPath('runs/a')
    """
    signature = inspect.signature(export)

    @functools.wraps(export)
    def wrapper(*args: Any, **kwargs: Any) -> Path:
        bound = signature.bind(*args, **kwargs)
        run_dir, out = bound.arguments.get("run_dir"), bound.arguments.get("out")
        if not (is_remote(run_dir) or is_remote(out)):
            bound.arguments["run_dir"] = parse_location(run_dir, "RUN_DIR").local  # file:// and a lost slash, too
            if out is not None:
                bound.arguments["out"] = parse_location(out, "--out").local
            return export(*bound.args, **bound.kwargs)
        return _export_remote(export, bound)

    return wrapper


def _export_remote(export: Callable[..., Path], bound: inspect.BoundArguments) -> Path:
    run = parse_location(bound.arguments["run_dir"], "RUN_DIR")
    out_value = bound.arguments.get("out")
    out = parse_location(out_value, "--out") if out_value is not None else run / "curriculum"
    local_run = read_copy(run) if run.is_remote else run.local
    if not out.is_remote:
        bound.arguments.update(run_dir=local_run, out=out.local)
        return _named_by_uri(export(*bound.args, **bound.kwargs), run)
    check_remote_output(out, [])  # before anything is written: a refused folder is left as it was
    staged = staging_folder(out, "export")
    with RemoteLock(out, "srdata export"):
        shutil.rmtree(staged, ignore_errors=True)  # srdata's own staging copy of an earlier export
        bound.arguments.update(run_dir=local_run, out=staged)
        folder = _named_by_uri(export(*bound.args, **bound.kwargs), run)
        summary = json.loads((folder / CURRICULUM_FILE).read_text(encoding="utf-8"))
        # The staged export started empty, so it could not see an earlier one: the same rule, on the stored summary.
        replacing = _replaced_remote_export(out, recorded_decisions(summary), bool(bound.arguments.get("overwrite", False)))
        names = [stage["file"] for stage in summary["stages"]]
        owned = check_remote_output(out, names)  # again, under the lock, with the names this export writes
        publish_remote_export(folder, out, owned)
    if replacing is not None:
        (bound.arguments.get("echo") or log.warning)(replacing)
    remember_published(folder, out)
    return folder


def _replaced_remote_export(out: Location, decisions: dict[str, Any], overwrite: bool) -> str | None:
    """:func:`srdata.curriculum.replacing.replaced_export` for an export stored at ``out`` (its ``curriculum.json`` read)."""
    earlier = staging_folder(out, "earlier")
    shutil.rmtree(earlier, ignore_errors=True)  # srdata's own copy of the stored summary
    if not download(out / CURRICULUM_FILE, earlier / CURRICULUM_FILE):
        return None
    try:
        replacing = replaced_export(earlier, decisions, overwrite)
    except CurriculumError as err:
        raise CurriculumError(str(err).replace(str(earlier), out.uri)) from None
    return None if replacing is None else replacing.replace(str(earlier), out.uri)


def read_copy(run: Location) -> Path:
    """A local copy of a remote run's ``manifest.json`` and ``annotated.parquet``, to be read as a run folder."""
    from srdata.curriculum.source import read_run_manifest

    local = staging_folder(run, "read")
    shutil.rmtree(local, ignore_errors=True)
    if not download(run / MANIFEST_FILE, local / MANIFEST_FILE):
        raise CurriculumError(f"{run} holds no srdata run ({MANIFEST_FILE} missing); create one with "
                              f"`srdata score ... --output {run}`")
    manifest = read_run_manifest(local)
    if manifest.status == "complete" and not download(run / ANNOTATED_FILE, local / ANNOTATED_FILE):
        raise CurriculumError(f"{run / ANNOTATED_FILE} is missing although the manifest says the run is complete; rerun "
                              f"the same `srdata score` command to rebuild it")
    remember_published(local, run)
    return local


def _named_by_uri(folder: Path, run: Location) -> Path:
    """Record the run's URI (not the local copy's path) as the export's source in ``curriculum.json``."""
    if run.is_remote:
        summary_path = folder / CURRICULUM_FILE
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary["source"]["run_dir"] = run.uri
        write_json_atomic(summary_path, summary)
    return folder
