"""Rank scored rows from easy to hard by reciprocal rank fusion (RRF).

SRD ranks every valid row once per score (ROUGE-L descending, cross-entropy ascending),
fuses the ranks with ``rrf = sum(weight / (k + rank))`` and sorts by ``rrf`` descending:
``difficulty_rank`` 1 is the easiest row.

Ties are resolved deterministically, in one of two ways (``ties=``):

- ``"input"`` (default): at every step (each score, then the fused score) rows with equal
  values are ordered by ``srd_id`` ascending, that is by their position in the input.
- ``"reference"``: the authors' ``tools/rank.py``, a chain of stable sorts, each starting
  from the order the previous left (ties in ``rrf`` fall back on the last score's rank).

Everything is columnar (polars); ten million rows rank in a few seconds.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np
import polars as pl

from srdata.steps.order import ranks_from_order, stable_order
from srdata.steps.teacher import TEACHER_COLUMNS

TieMode = Literal["input", "reference"]
TIE_MODES: tuple[str, ...] = get_args(TieMode)
DEFAULT_RANK_BY = "rouge_l:desc,ce_loss:asc"
#: Named rankings ``--rank-by`` accepts in place of a column list. ``paper`` is SRD's own
#: (the default); ``noisy`` is the one measured to put the most corrupted references in the
#: dropped quarter of real data (benchmarks/bench_noise.py); it needs ``srdata score --signals ifd``.
#: ``teachable`` (needs ``srdata teach``) puts last what the teacher cannot do: benchmarks/bench_teachable.py.
RANK_PRESETS: dict[str, str] = {
    "paper": DEFAULT_RANK_BY,
    "noisy": "ifd:asc:2,ce_loss:asc,pmi:desc",
    "teachable": "teacher_ce_loss:asc:3,rouge_l:desc,ce_loss:asc",
}
#: Columns filled only when the run was scored with a ``--signals`` value, and that value.
SIGNAL_COLUMNS = {"ce_loss_uncond": "ifd", "ifd": "ifd", "pmi": "ifd"}
DEFAULT_RRF_K = 60
ID_COLUMN = "srd_id"
INVALID_COLUMN = "invalid_reason"
FUSED_COLUMN = "rrf_score"
DIFFICULTY_COLUMN = "difficulty_rank"

# The contract's per-score rank columns: kept up to date even when a custom --rank-by
# leaves one of them out of the fusion, so a stale rank never survives a re-rank.
CONTRACT_KEYS = (("rouge_l", True), ("ce_loss", False))


class RankingError(ValueError):
    """A ranking request that cannot be honoured (bad spec, missing column, NaN scores)."""


@dataclass(frozen=True)
class RankKey:
    """One score to rank by: its column, its direction and its weight in the fusion.

    Example:
        >>> RankKey("rouge_l", descending=True).rank_column
        'rank_rouge_l'
    """

    column: str
    descending: bool
    weight: float = 1.0

    @property
    def rank_column(self) -> str:
        return f"rank_{self.column}"

    def spec(self) -> str:
        """The key written back in ``--rank-by`` syntax (weight omitted when 1)."""
        direction = "desc" if self.descending else "asc"
        return f"{self.column}:{direction}" + ("" if self.weight == 1.0 else f":{self.weight:g}")


def parse_rank_by(spec: str | Sequence[RankKey] | None) -> tuple[RankKey, ...]:
    """Parse ``"col:desc|asc[:weight],..."`` or a preset name (:data:`RANK_PRESETS`) into
    rank keys (``None`` = SRD's default, the ``paper`` preset).

    Example:
        >>> [k.spec() for k in parse_rank_by("rouge_l:desc,ce_loss:asc:0.5")]
        ['rouge_l:desc', 'ce_loss:asc:0.5']
        >>> format_rank_by(parse_rank_by("paper"))
        'rouge_l:desc,ce_loss:asc'
    """
    if spec is None:
        spec = DEFAULT_RANK_BY
    if isinstance(spec, str) and spec.strip().lower() in RANK_PRESETS:
        spec = RANK_PRESETS[spec.strip().lower()]
    keys = tuple(spec) if not isinstance(spec, str) else tuple(_parse_key(part) for part in spec.split(","))
    if not keys:
        raise RankingError("--rank-by is empty; give at least one column, e.g. 'rouge_l:desc,ce_loss:asc'")
    columns = [key.column for key in keys]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise RankingError(f"--rank-by names {', '.join(duplicates)} more than once")
    return keys


def format_rank_by(keys: Sequence[RankKey]) -> str:
    """The canonical text of a list of keys, as recorded in manifests and curriculum.json."""
    return ",".join(key.spec() for key in keys)


def _parse_key(text: str) -> RankKey:
    parts = [p.strip() for p in text.strip().split(":")]
    if len(parts) not in (2, 3) or not parts[0]:
        raise RankingError(
            f"bad --rank-by entry {text.strip()!r}: expected COLUMN:desc|asc[:WEIGHT], e.g. 'ce_loss:asc:0.5', "
            f"or one of the presets {', '.join(RANK_PRESETS)} alone"
        )
    column, direction = parts[0], parts[1].lower()
    if direction not in ("asc", "desc"):
        raise RankingError(f"bad direction {parts[1]!r} for column {column!r} in --rank-by: use 'asc' or 'desc'")
    weight = _parse_weight(parts[2], column) if len(parts) == 3 else 1.0
    return RankKey(column, descending=direction == "desc", weight=weight)


def _parse_weight(text: str, column: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise RankingError(f"bad weight {text!r} for column {column!r} in --rank-by: expected a positive number") from None
    if not weight > 0 or weight == float("inf"):
        raise RankingError(f"weight for column {column!r} in --rank-by must be a positive finite number, got {text}")
    return weight


def rank(
    df: pl.DataFrame,
    rrf_k: int = DEFAULT_RRF_K,
    *,
    rank_by: str | Sequence[RankKey] | None = None,
    ties: TieMode = "input",
) -> pl.DataFrame:
    """Add (or replace) the rank columns, ``rrf_score`` and ``difficulty_rank``.

    Rows with a null score in a ranked column, or a non-null ``invalid_reason``, are not
    ranked: their rank columns are null, and ``difficulty_rank`` is a permutation of
    ``1..N_valid`` over the other rows. The result is sorted by ``srd_id``.

    Example:
        >>> df = pl.DataFrame({"srd_id": [0, 1, 2], "rouge_l": [0.2, 0.9, 0.5], "ce_loss": [3.0, 1.0, 2.0]})
        >>> rank(df)["difficulty_rank"].to_list()
        [3, 1, 2]
    """
    keys = parse_rank_by(rank_by)
    _check_settings(df, keys, rrf_k, ties)
    info_keys = _informational_keys(df, keys)
    df = df if df[ID_COLUMN].is_sorted() else df.sort(ID_COLUMN)
    _check_has_values(df, keys)
    valid = _valid_mask(df, keys + info_keys)
    scores = df if valid.all() else df.filter(valid)
    check_no_nan(scores, keys + info_keys)
    ranks = _rank_valid_rows(scores, keys, info_keys, rrf_k, ties)
    return _attach(df, valid, ranks)


def _check_settings(df: pl.DataFrame, keys: Sequence[RankKey], rrf_k: int, ties: str) -> None:
    if ties not in TIE_MODES:
        raise RankingError(f"unknown ties mode {ties!r}: use one of {', '.join(TIE_MODES)}")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 0:
        raise RankingError(f"rrf_k must be a non-negative integer, got {rrf_k!r}")
    if ID_COLUMN not in df.columns:
        raise RankingError(f"the data has no {ID_COLUMN!r} column, needed as the join key and tie-breaker")
    if df[ID_COLUMN].null_count() or not _all_distinct(df[ID_COLUMN]):
        raise RankingError(f"{ID_COLUMN!r} must be unique and non-null")
    numeric = [c for c, t in df.schema.items() if t.is_numeric() and c != ID_COLUMN]
    for key in keys:
        if key.column not in df.columns:
            raise missing_column(key.column, numeric, "")
        if key.column not in numeric:
            raise RankingError(f"--rank-by column {key.column!r} is {df.schema[key.column]}, not numeric")


def missing_column(column: str, numeric: Sequence[str], where: str = " in the run") -> RankingError:
    """The error for a ``--rank-by`` column the data lacks; a teacher-pass column says how to get it."""
    if column in TEACHER_COLUMNS:
        return RankingError(f"--rank-by column {column!r} is written by the teacher pass: run `srdata teach RUN --teacher TEACHER` first")
    return RankingError(f"--rank-by column {column!r} does not exist{where}; numeric columns: {', '.join(numeric) or 'none'}")


def _check_has_values(df: pl.DataFrame, keys: Sequence[RankKey]) -> None:
    """Refuse a signal column (``--signals``) that is null on every scored row: the run was
    scored without that signal, so ranking by it would leave no row rankable.

    Scored rows: no ``invalid_reason`` and a ``ce_loss``. Other columns keep the general
    rule (rows with a null score are not ranked).
    """
    signal_keys = [key for key in keys if key.column in SIGNAL_COLUMNS]
    if not signal_keys:
        return
    scored = df
    if INVALID_COLUMN in df.columns:
        scored = scored.filter(pl.col(INVALID_COLUMN).is_null())
    if "ce_loss" in df.columns:
        scored = scored.filter(pl.col("ce_loss").is_not_null())
    if scored.height == 0:
        return
    for key in signal_keys:
        if scored[key.column].null_count() == scored.height:
            raise RankingError(
                f"--rank-by column {key.column!r} is empty (null on all {scored.height} scored rows): it is filled when "
                f"the run is scored with `srdata score --signals {SIGNAL_COLUMNS[key.column]}` (a run scored without it "
                "must be scored again into a new --output, or with --overwrite)"
            )


def _all_distinct(ids: pl.Series) -> bool:
    """No value twice. Sorted ids (the usual case) need only a neighbour comparison, not a hash count."""
    if ids.len() < 2:
        return True
    if ids.is_sorted():
        return not (ids.slice(1) == ids.slice(0, ids.len() - 1)).any()
    return ids.n_unique() == ids.len()


def _informational_keys(df: pl.DataFrame, keys: Sequence[RankKey]) -> tuple[RankKey, ...]:
    """Contract score columns present but not fused: ranked (weight 0) so they stay current."""
    used = {key.column for key in keys}
    return tuple(
        RankKey(column, descending=descending, weight=0.0)
        for column, descending in CONTRACT_KEYS
        if column in df.columns and column not in used and df.schema[column].is_numeric()
    )


def _valid_mask(df: pl.DataFrame, keys: Sequence[RankKey]) -> pl.Series:
    conditions = [pl.col(key.column).is_not_null() for key in keys]
    if INVALID_COLUMN in df.columns:
        conditions.append(pl.col(INVALID_COLUMN).is_null())
    return df.select(pl.all_horizontal(conditions).alias("valid")).to_series()


def check_no_nan(scores: pl.DataFrame, keys: Sequence[RankKey]) -> None:
    """Refuse NaN in any ranked column, naming the column and the rows' srd_id."""
    for key in keys:
        if key.column not in scores.columns or not scores.schema[key.column].is_float():
            continue
        bad_ids = scores.filter(pl.col(key.column).is_nan())[ID_COLUMN]
        if bad_ids.len():
            shown = ", ".join(str(i) for i in bad_ids.head(10).to_list())
            more = f" and {bad_ids.len() - 10} more" if bad_ids.len() > 10 else ""
            raise RankingError(
                f"column {key.column!r} has NaN scores ({bad_ids.len()} rows) at srd_id {shown}{more}; "
                "NaN cannot be ranked: rescore these rows or mark them invalid (null score)"
            )


def _rank_valid_rows(
    scores: pl.DataFrame, keys: Sequence[RankKey], info_keys: Sequence[RankKey], rrf_k: int, ties: str
) -> pl.DataFrame:
    """Ranks of the valid rows (already in srd_id order), one column per output."""
    chained = ties == "reference"
    orders, ranks = _key_ranks(scores, keys, info_keys, chained)
    last_order = orders[keys[-1].column] if chained else None
    # Work memory for the fused score and its sort: a key order that is no longer needed
    # when one is (in "input" mode), as fresh memory costs page faults (see srdata.steps.order).
    spare = [order for order in orders.values() if not chained and order.flags.writeable and order.dtype == np.int64]
    work = spare[0].view(np.uint64) if spare else np.empty(scores.height, dtype=np.uint64)
    del orders, spare
    columns: dict[str, pl.Series] = {ID_COLUMN: scores[ID_COLUMN]}
    fused = np.zeros(scores.height, dtype=np.float64)
    term = work.view(np.float64)
    for key in keys:
        columns[key.rank_column] = ranks[key.column]
        # Same float operations, in the same order, as the reference: 1/(k+rank) summed.
        np.add(ranks[key.column].to_numpy(), rrf_k, out=term, casting="unsafe")  # exact: ranks < 2**53
        np.divide(key.weight, term, out=term)
        fused += term
    for key in info_keys:
        columns[key.rank_column] = ranks[key.column]
    columns[FUSED_COLUMN] = pl.Series(FUSED_COLUMN, fused)
    # The fused sort runs alone: it may use every core.
    columns[DIFFICULTY_COLUMN] = ranks_from_order(stable_order(columns[FUSED_COLUMN], True, last_order, alone=True, work=work))
    return pl.DataFrame([series.alias(name) for name, series in columns.items()])


def _key_ranks(
    scores: pl.DataFrame, keys: Sequence[RankKey], info_keys: Sequence[RankKey], chained: bool
) -> tuple[dict[str, np.ndarray], dict[str, pl.Series]]:
    """The sort order and the rank of every ranked column; independent sorts run on parallel threads.

    In ``reference`` mode each fused key sorts the previous key's order, so those run one
    after the other; otherwise every sort starts from the input order.
    """

    def order_and_rank(key: RankKey, start: np.ndarray | None) -> tuple[np.ndarray, pl.Series]:
        order = stable_order(scores[key.column], key.descending, start)
        return order, ranks_from_order(order)

    independent = [*info_keys, *([] if chained else keys)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(independent), os.cpu_count() or 1))) as pool:
        futures = {key.column: pool.submit(order_and_rank, key, None) for key in independent}
        results: dict[str, tuple[np.ndarray, pl.Series]] = {}
        previous: np.ndarray | None = None
        for key in keys if chained else ():
            results[key.column] = order_and_rank(key, previous)
            previous = results[key.column][0]
        results.update({column: future.result() for column, future in futures.items()})
    return {c: r[0] for c, r in results.items()}, {c: r[1] for c, r in results.items()}


def _attach(df: pl.DataFrame, valid: pl.Series, ranks: pl.DataFrame) -> pl.DataFrame:
    """Put the valid rows' ranks back on the full frame (null on invalid rows)."""
    outputs = [c for c in ranks.columns if c != ID_COLUMN]
    base = df.drop([c for c in outputs if c in df.columns])
    if ranks.height == df.height:
        return base.hstack(ranks.drop(ID_COLUMN))
    positions = valid.arg_true()
    filled = [_scatter_into_nulls(ranks[c], positions, df.height) for c in outputs]
    return base.hstack(filled)


def _scatter_into_nulls(values: pl.Series, positions: pl.Series, length: int) -> pl.Series:
    return pl.repeat(None, length, dtype=values.dtype, eager=True).alias(values.name).scatter(positions, values)
