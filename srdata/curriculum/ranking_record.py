"""Which ranking a file's rank columns come from, written where a reader of that file finds it.

``difficulty_rank``, ``rrf_score`` and the ``rank_*`` columns of a stage file come from the
ranking its export cut by; ``annotated.parquet``'s from the run's own (the paper's unless
``srdata rank`` changed it). They can differ (``srdata export --rank-by noisy`` re-ranks in
memory), so every file says which:

* ``curriculum.json``: ``ranking`` (``rank_by``, ``rrf_k``, ``ties``, ``recomputed``: the
  stage files' ranking, and whether the export computed it in memory) and ``rank_columns``
  = ``{"columns": [...], "stage_files": R, "annotated_parquet": R}``, where each ``R`` is
  ``{"rank_by", "name", "rrf_k", "ties"}`` and ``name`` the preset (``paper``, ``noisy``,
  ``teachable``; ``null`` for a custom list): the stage files' ranking and the run's own,
  that of ``annotated.parquet``'s rank columns;
* every parquet stage file (and an ``annotated.parquet`` re-ranked by ``srdata rank``): the
  key-value metadata entry ``srdata.ranking`` = ``R`` plus ``columns``, as JSON
  (``pyarrow.parquet.read_metadata(path).metadata[b"srdata.ranking"]``). JSON-lines stage
  files cannot carry metadata: their ``curriculum.json`` says it.

Example:
    >>> ranking_name("ifd:asc:2,ce_loss:asc,pmi:desc"), ranking_name("rouge_l:desc")
    ('noisy', None)
    >>> json.loads(ranking_metadata("rouge_l:desc,ce_loss:asc", 60, "input")[METADATA_KEY])["name"]
    'paper'
"""

from __future__ import annotations

import json
from typing import Any

from srdata.steps.rank import RANK_PRESETS, format_rank_by, parse_rank_by

METADATA_KEY = "srdata.ranking"
RANK_COLUMNS = ["difficulty_rank", "rrf_score", "rank_<column> (one per ranked column)"]


def ranking_name(rank_by: str) -> str | None:
    """The preset (``paper``, ``noisy``, ``teachable``) a canonical ``rank_by`` is, or ``None`` for a custom list."""
    for name, spec in RANK_PRESETS.items():
        if format_rank_by(parse_rank_by(spec)) == rank_by:
            return name
    return None


def ranking_record(rank_by: str, rrf_k: int, ties: str) -> dict[str, Any]:
    """A ranking as the files record it.

    Example:
        >>> ranking_record("rouge_l:desc,ce_loss:asc", 60, "input")
        {'rank_by': 'rouge_l:desc,ce_loss:asc', 'name': 'paper', 'rrf_k': 60, 'ties': 'input'}
    """
    return {"rank_by": rank_by, "name": ranking_name(rank_by), "rrf_k": rrf_k, "ties": ties}


def ranking_metadata(rank_by: str, rrf_k: int, ties: str) -> dict[str, str]:
    """The parquet key-value metadata saying which ranking a file's rank columns come from."""
    return {METADATA_KEY: json.dumps({**ranking_record(rank_by, rrf_k, ties), "columns": RANK_COLUMNS})}


def run_ranking(manifest_ranking: dict[str, Any], default_rrf_k: int) -> dict[str, Any]:
    """The ranking of a run's ``annotated.parquet`` rank columns, from its manifest's ``ranking`` (empty = the paper's)."""
    rank_by = format_rank_by(parse_rank_by(manifest_ranking.get("rank_by")))
    return ranking_record(rank_by, manifest_ranking.get("rrf_k", default_rrf_k), manifest_ranking.get("ties", "input"))


def rank_columns_record(rank_by: str, rrf_k: int, ties: str, manifest_ranking: dict[str, Any], default_rrf_k: int) -> dict[str, Any]:
    """``curriculum.json``'s ``rank_columns``: which ranking the stage files' rank columns and annotated.parquet's come from."""
    return {"columns": RANK_COLUMNS, "stage_files": ranking_record(rank_by, rrf_k, ties),
            "annotated_parquet": run_ranking(manifest_ranking, default_rrf_k)}
