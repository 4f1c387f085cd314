"""An export into the folder of an earlier one: say what it replaces, and refuse to replace another decision silently.

The earlier export's ``curriculum.json`` records how it was cut: from which run (folder and
``config_hash``), by which ranking, into which stages, in which format. A new export with
the same decisions replaces it (a rerun gives the same files). One that differs in any of
them (another ``--rank-by``, ``--stages``, ``--keep``, ``--fractions``, ``--layout``,
``--format``, ``--stratify``, or a run re-scored or re-ranked since) is refused, nothing in
the folder changed, unless ``overwrite`` is given, as ``srdata score`` refuses other
settings in a run folder without ``--overwrite``; with it, the differences are said.

Example:
    >>> decisions = export_decisions(run, plan, ranking, "parquet", None)                 # doctest: +SKIP
    >>> replaced_export(Path("runs/dolly/curriculum"), decisions, overwrite=False)        # doctest: +SKIP
    Traceback (most recent call last):
    CurriculumError: runs/dolly/curriculum holds an earlier export cut with other settings (ranking: ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from srdata.curriculum.cut import CurriculumError, StagePlan
from srdata.curriculum.reader import PUBLISHING_KEY
from srdata.curriculum.ranking import Ranking
from srdata.curriculum.ranking_record import ranking_name
from srdata.curriculum.source import Run
from srdata.run.folder import CURRICULUM_FILE

#: The decisions compared, in the order they are reported.
DECISIONS = ("run", "config_hash", "ranking", "rrf_k", "ties", "layout", "stages", "keep", "fractions", "format", "stratify")


def export_decisions(run: Run, plan: StagePlan, ranking: Ranking, fmt: str, stratify: str | None) -> dict[str, Any]:
    """How a new export cuts, in the terms of :data:`DECISIONS`."""
    described = ranking.describe()
    return {
        "run": str(run.path.resolve()),
        "config_hash": run.config_hash,
        "ranking": described["rank_by"],
        "rrf_k": described["rrf_k"],
        "ties": described["ties"],
        **{key: plan.describe()[key] for key in ("layout", "stages", "keep", "fractions")},
        "format": fmt,
        "stratify": stratify,
    }


def recorded_decisions(summary: dict[str, Any]) -> dict[str, Any]:
    """How the export that wrote ``summary`` (a ``curriculum.json``) cut, in the terms of :data:`DECISIONS`."""
    source, settings, ranking = summary.get("source", {}), summary.get("settings", {}), summary.get("ranking", {})
    return {
        "run": source.get("run_dir"),
        "config_hash": source.get("config_hash"),
        "ranking": ranking.get("rank_by"),
        "rrf_k": ranking.get("rrf_k"),
        "ties": ranking.get("ties"),
        **{key: settings.get(key) for key in ("layout", "stages", "keep", "fractions", "format", "stratify")},
    }


def replaced_export(out_dir: Path, decisions: dict[str, Any], overwrite: bool) -> str | None:
    """What an export into ``out_dir`` replaces: ``None`` (nothing, or the same cut), or one line saying what changes.

    An earlier export cut otherwise is refused (:class:`CurriculumError`, nothing changed) unless ``overwrite``.
    """
    summary_path = out_dir / CURRICULUM_FILE
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        before = recorded_decisions(summary)
    except (OSError, ValueError, AttributeError):
        return None  # check_output_folder refuses an unreadable summary, naming it
    if summary.get(PUBLISHING_KEY):  # no whole export to protect: files of two exports, which no reader accepts
        return f"replacing the export in {out_dir} that was interrupted while it replaced its files"
    changes = [_change(key, before[key], decisions[key]) for key in DECISIONS if before[key] != decisions[key]]
    if not changes:
        return None
    files = ", ".join(str(stage.get("file")) for stage in summary.get("stages", []))
    what = f"the earlier export in {out_dir} ({files} and {CURRICULUM_FILE}), cut with other settings: {'; '.join(changes)}"
    if not overwrite:
        raise CurriculumError(
            f"{out_dir} holds an earlier export cut with other settings ({'; '.join(changes)}); nothing in it was changed. "
            "Pass --overwrite (overwrite=True) to replace it, or export into another folder (--out)"
        )
    return f"replacing {what}"


def _change(key: str, before: Any, after: Any) -> str:
    if key == "ranking":
        return f"ranking {_ranking_label(before)} -> {_ranking_label(after)}"
    if key == "config_hash":
        return f"the run was scored again since (config_hash {before} -> {after})"
    return f"{key} {before} -> {after}"


def _ranking_label(rank_by: Any) -> str:
    name = ranking_name(rank_by) if isinstance(rank_by, str) else None
    return f"{name} ({rank_by})" if name else str(rank_by)
