"""Sizes, rank and score thresholds of the curriculum's stages, as ``curriculum.json`` records them.

Example:
    >>> import polars as pl
    >>> ranks = pl.DataFrame({"difficulty_rank": [2, 1, 3], "rrf_score": [0.2, 0.3, 0.1], "rouge_l": [0.5, 0.9, 0.1]})
    >>> [s["rows"] for s in range_summaries(ranks, [(0, 2), (2, 3)], ["rouge_l"])]
    [2, 1]
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from srdata.steps.rank import CONTRACT_KEYS, DIFFICULTY_COLUMN, FUSED_COLUMN, RankKey


def score_columns(schema: dict[str, Any], keys: Sequence[RankKey]) -> list[str]:
    """The score columns a curriculum summarises: the contract's scores, then every ranked column, those in ``schema``.

    Example:
        >>> score_columns({"rouge_l": 0, "ce_loss": 0, "ifd": 0}, [RankKey("ifd", descending=False)])
        ['rouge_l', 'ce_loss', 'ifd']
    """
    contract = [column for column, _ in CONTRACT_KEYS if column in schema]
    return list(dict.fromkeys([*contract, *(k.column for k in keys if k.column in schema)]))


def range_summaries(
    ranks: pl.DataFrame, ranges: Sequence[tuple[int, int]], score_columns: Sequence[str], position: str = DIFFICULTY_COLUMN
) -> list[dict[str, Any]]:
    """Size, rank and score thresholds of the rows at each range of easy-to-hard positions [start, stop).

    One grouped pass over the rows: aggregates per piece between any two range
    boundaries, combined per range (the cumulative stages overlap). Positions are the
    ``position`` column (the difficulty rank, or the stratified rank).
    """
    points = sorted({p for r in ranges for p in r})
    pieces = _piece_aggregates(ranks, points, score_columns, position)
    return [
        _combine_pieces([pieces[i] for i in range(len(points) - 1) if start <= points[i] and points[i + 1] <= stop and i in pieces], score_columns, position)
        for start, stop in ranges
    ]


def _piece_aggregates(ranks: pl.DataFrame, points: Sequence[int], score_columns: Sequence[str], position_column: str) -> dict[int, dict[str, Any]]:
    """Per piece ``i`` = easy-to-hard positions ``[points[i], points[i+1])``: count, min, max, sum."""
    position = pl.col(position_column).fill_null(0) - 1  # null (not ranked) -> -1, in no piece
    piece = pl.sum_horizontal([(position >= p).cast(pl.Int8) for p in points]) - 1
    aggregates = [pl.len().alias("rows")]
    for column in dict.fromkeys((DIFFICULTY_COLUMN, position_column, FUSED_COLUMN, *score_columns)):
        aggregates += [pl.col(column).min().alias(f"{column}:min"), pl.col(column).max().alias(f"{column}:max")]
    for column in score_columns:
        aggregates += [pl.col(column).sum().alias(f"{column}:sum"), pl.col(column).count().alias(f"{column}:count")]
    grouped = ranks.lazy().group_by(piece.alias("piece")).agg(aggregates).collect()  # lazy: parallel, no copies
    return {row.pop("piece"): row for row in grouped.iter_rows(named=True)}


def _combine_pieces(pieces: Sequence[dict[str, Any]], score_columns: Sequence[str], position: str) -> dict[str, Any]:
    rows = sum(piece["rows"] for piece in pieces)
    if rows == 0:
        return {"rows": 0}

    def low(column: str) -> Any:
        return min(piece[f"{column}:min"] for piece in pieces)

    def high(column: str) -> Any:
        return max(piece[f"{column}:max"] for piece in pieces)

    def mean(column: str) -> float | None:
        count = sum(piece[f"{column}:count"] for piece in pieces)
        return sum(piece[f"{column}:sum"] for piece in pieces) / count if count else None

    if position == DIFFICULTY_COLUMN:
        thresholds = {"max_difficulty_rank": high(DIFFICULTY_COLUMN), "min_rrf_score": low(FUSED_COLUMN)}
    else:
        # Cut within groups: no difficulty or score threshold separates the stages, only the order cut from.
        thresholds = {f"max_{position}": high(position)}
    return {
        "rows": rows,
        "difficulty_rank": {"min": low(DIFFICULTY_COLUMN), "max": high(DIFFICULTY_COLUMN)},
        "rrf_score": {"min": low(FUSED_COLUMN), "max": high(FUSED_COLUMN)},
        "thresholds": thresholds,
        "scores": {c: {"min": low(c), "max": high(c), "mean": mean(c)} for c in score_columns},
    }
