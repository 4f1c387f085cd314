"""The export folder: which folders ``srdata export`` writes into, what it may replace there, and how it publishes.

* **Whose folder.** A folder holds an export when it holds ``curriculum.json``. Export writes
  into a new folder, an empty one (apart from srdata's lock file and marked temp files), or
  the folder of an earlier export. A folder holding other files and no ``curriculum.json``
  (the user's own folder, a run folder) is refused before anything in it is touched; so is
  the default ``RUN/curriculum`` when it holds files of something else.
* **What is replaced.** In an earlier export's folder, export replaces or removes only the
  ``stage-K.parquet`` / ``stage-K.jsonl`` files that its ``curriculum.json`` lists (other
  names listed there are never touched), ``curriculum.json`` itself, and marked temp files
  of dead processes (:func:`srdata.run.io.remove_stale_temps`). A new stage file whose name
  is taken by a file the earlier export did not write is refused; a user's ``notes.txt`` or
  ``stage-9.parquet`` beside an export survives every re-export, byte for byte.
* **Publishing order.** The stage files are written to marked temp files and checksummed
  first (a failure up to then leaves the earlier export as it was). Then ``curriculum.json``
  is replaced by the new summary marked ``"publishing"`` (it also lists the earlier export's
  files that are to go), the temp files are moved onto their names, the leftover files are
  removed, and ``curriculum.json`` is written without the mark. A process killed in between
  leaves a summary that readers refuse (:func:`srdata.curriculum.reader.verified_curriculum`)
  and that tells the next export every file it may replace: a rerun is clean.

Example:
    >>> owned = check_output_folder(Path("runs/a/curriculum"), [Path("runs/a/curriculum/stage-0.parquet")])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from srdata.curriculum.cut import CurriculumError
from srdata.curriculum.reader import PUBLISHING_KEY
from srdata.run.folder import CURRICULUM_FILE
from srdata.run.io import WriteError, is_tool_file, publish, write_json_atomic, write_problem

if TYPE_CHECKING:
    from srdata.run.storage import Location

STAGE_FILE_PATTERN = re.compile(r"stage-\d+\.(parquet|jsonl)")
LEAVING_KEY = "leaving"  # in a publishing curriculum.json: the earlier export's files that are to go
SHOWN_NAMES = 5


@dataclass(frozen=True)
class EncodedStage:
    """A stage file written to its temp file and checksummed, not yet moved onto ``path``."""

    path: Path
    temp: Path
    sha256: str
    bytes: int


def check_output_folder(out_dir: Path, finals: Sequence[Path]) -> set[str]:
    """Refuse a folder export may not write into; return the names of the earlier export's files there.

    Nothing is changed: this runs before the folder is locked, and again once it is.

    Example:
        >>> check_output_folder(Path("a-new-folder"), [Path("a-new-folder/stage-0.parquet")])
        set()
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        return set()
    if not out_dir.is_dir():
        raise CurriculumError(f"output folder {out_dir} is a file, not a folder; choose another --out")
    if (out_dir / CURRICULUM_FILE).exists():
        owned = previous_export_files(out_dir)
    else:
        others = sorted(p.name for p in out_dir.iterdir() if not is_tool_file(p.name))
        if others:
            raise CurriculumError(
                f"output folder {out_dir} already holds files ({_listing(others)}) but no srdata export ({CURRICULUM_FILE}); "
                "nothing in it was changed. Export into a new or empty folder (--out), or into the folder of an earlier export"
            )
        owned = set()
    taken = sorted(f.name for f in finals if (f.exists() or f.is_symlink()) and f.name not in owned)
    if taken:
        raise CurriculumError(
            f"output folder {out_dir} holds {_listing(taken)}, which its earlier export did not write; nothing in it was "
            "changed. Move those files away, or export into another folder (--out)"
        )
    return owned


def previous_export_files(out_dir: Path) -> set[str]:
    """The stage files the export in ``out_dir`` wrote (listed, or leaving, in its ``curriculum.json``).

    Only plain ``stage-K.parquet`` / ``stage-K.jsonl`` names count: whatever else a damaged or
    edited ``curriculum.json`` names is never replaced or removed.
    """
    summary_path = out_dir / CURRICULUM_FILE
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        names = [stage["file"] for stage in summary["stages"]] + list(summary.get(LEAVING_KEY, []))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CurriculumError(
            f"{summary_path} is not a readable srdata curriculum summary ({type(err).__name__}: {err}); nothing in "
            f"{out_dir} was changed. Export into another folder (--out), or remove that folder's curriculum.json and stage files"
        ) from None
    return {name for name in names if isinstance(name, str) and STAGE_FILE_PATTERN.fullmatch(name)}


def publish_export(out_dir: Path, stages: Sequence[EncodedStage], summary: dict[str, Any], owned: set[str]) -> None:
    """Move the encoded stages onto their names and write ``curriculum.json``, in the order the module docstring gives.

    Example:
        >>> publish_export(out, encoded, summary, check_output_folder(out, [s.path for s in encoded]))   # doctest: +SKIP
    """
    leaving = sorted(owned - {stage.path.name for stage in stages})
    write_json_atomic(out_dir / CURRICULUM_FILE, {**summary, PUBLISHING_KEY: True, LEAVING_KEY: leaving})
    for stage in stages:
        publish(stage.temp, stage.path)
    for name in leaving:
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError as err:
            raise WriteError(write_problem(err, out_dir / name)) from err
    write_json_atomic(out_dir / CURRICULUM_FILE, summary)


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


def check_remote_output(out: "Location", names: Sequence[str]) -> set[str]:
    """:func:`check_output_folder` for a remote ``--out`` (``s3://...``): the same rules on its objects; reads only.

    Example:
        >>> check_remote_output(parse_location("s3://b/cur", "--out"), ["stage-0.parquet"])   # doctest: +SKIP
        set()
    """
    from srdata.run.storage import check_bucket, list_names, read_bytes

    check_bucket(out)
    present = [n for n in list_names(out) if not is_tool_file(n.rsplit("/", 1)[-1])]
    owned: set[str] = set()
    if CURRICULUM_FILE in present:
        try:
            summary = json.loads(read_bytes(out / CURRICULUM_FILE) or b"")
            listed = [stage["file"] for stage in summary["stages"]] + list(summary.get(LEAVING_KEY, []))
        except (ValueError, KeyError, TypeError) as err:
            raise CurriculumError(f"{out / CURRICULUM_FILE} is not a readable srdata curriculum summary ({type(err).__name__}: "
                                  f"{err}); nothing in {out} was changed. Export into another --out") from None
        owned = {n for n in listed if isinstance(n, str) and STAGE_FILE_PATTERN.fullmatch(n)}
    elif present:
        raise CurriculumError(
            f"output folder {out} already holds objects ({_listing(present)}) but no srdata export ({CURRICULUM_FILE}); "
            "nothing in it was changed. Export into a new or empty folder (--out), or into the folder of an earlier export"
        )
    taken = sorted(n for n in names if n in present and n not in owned)
    if taken:
        raise CurriculumError(f"output folder {out} holds {_listing(taken)}, which its earlier export did not write; nothing in it "
                              "was changed. Move those objects away, or export into another folder (--out)")
    return owned


def publish_remote_export(staged: Path, out: "Location", owned: set[str]) -> None:
    """Publish an export written to the local folder ``staged`` into ``out``, in :func:`publish_export`'s order.

    ``curriculum.json`` marked ``"publishing"`` (with the earlier export's objects that are to
    go) first, then the stage files (each checked against the size the summary records),
    then the removals, then ``curriculum.json`` unmarked: the commit. A kill in between
    leaves a summary that readers refuse and that tells the next export what it may replace.
    """
    from srdata.run.storage import remove, upload, write_bytes

    summary = json.loads((staged / CURRICULUM_FILE).read_text(encoding="utf-8"))
    names = [stage["file"] for stage in summary["stages"]]
    leaving = sorted(owned - set(names))
    marked = {**summary, PUBLISHING_KEY: True, LEAVING_KEY: leaving}
    write_bytes(out / CURRICULUM_FILE, (json.dumps(marked, indent=2) + "\n").encode())
    for stage in summary["stages"]:
        sent = upload(staged / stage["file"], out / stage["file"])
        if stage.get("sha256") and sent["sha256"] != stage["sha256"]:
            raise WriteError(f"{staged / stage['file']} changed while it was published; export again")
    for name in leaving:
        remove(out / name)
    write_bytes(out / CURRICULUM_FILE, (staged / CURRICULUM_FILE).read_bytes())
