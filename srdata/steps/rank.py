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
from typing import Callable, Literal, Sequence, get_args

import numpy as np
import polars as pl

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
    # when one is (in "input" mode), as fresh memory costs page faults (see stable_arg_sort).
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
    columns[DIFFICULTY_COLUMN] = _ranks_from_order(_stable_order(columns[FUSED_COLUMN], True, last_order, alone=True, work=work))
    return pl.DataFrame([series.alias(name) for name, series in columns.items()])


def _key_ranks(
    scores: pl.DataFrame, keys: Sequence[RankKey], info_keys: Sequence[RankKey], chained: bool
) -> tuple[dict[str, np.ndarray], dict[str, pl.Series]]:
    """The sort order and the rank of every ranked column; independent sorts run on parallel threads.

    In ``reference`` mode each fused key sorts the previous key's order, so those run one
    after the other; otherwise every sort starts from the input order.
    """

    def order_and_rank(key: RankKey, start: np.ndarray | None) -> tuple[np.ndarray, pl.Series]:
        order = _stable_order(scores[key.column], key.descending, start)
        return order, _ranks_from_order(order)

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


def _stable_order(
    values: pl.Series, descending: bool, start: np.ndarray | None, alone: bool = False, work: np.ndarray | None = None
) -> np.ndarray:
    """Row positions (int64) sorted by ``values`` with a stable sort applied to the ``start`` order."""
    in_start_order = values if start is None else values.gather(start)
    local = _packed_arg_sort(in_start_order, descending, alone, work)
    if local is None:
        local = _polars_stable_arg_sort(in_start_order, descending).to_numpy()
    return local if start is None else start[local]


def stable_arg_sort(values: pl.Series, descending: bool = False, multithreaded: bool = False) -> pl.Series:
    """Positions of ``values`` in sorted order, equal values in position order (Int64).

    The same result as ``arg_sort_by(..., maintain_order=True)``, about 3x faster on
    10M rows: the value's sortable bits and the position are packed into one uint64 and
    sorted as plain numbers, which polars does much faster than a stable arg sort.

    Example:
        >>> stable_arg_sort(pl.Series([0.5, 0.1, 0.5, 0.2]), descending=True).to_list()
        [0, 2, 3, 1]
    """
    return pl.Series(_stable_order(values, descending, None, alone=multithreaded))


def _packed_arg_sort(values: pl.Series, descending: bool, multithreaded: bool, work: np.ndarray | None = None) -> np.ndarray | None:
    """``stable_arg_sort`` as an int64 array, in ``work`` (uint64, overwritten) when given; None where it does not apply."""
    raw = _raw_values(values)
    position_bits = max(1, (values.len() - 1).bit_length())
    if raw is None or position_bits > 40:  # other dtypes, nulls, or too little room for the value
        return None
    # One 80 MB work array per sort, reused at every step: on a VM, first-touch page
    # faults on fresh memory cost as much CPU as the sort itself.
    keys = _sortable_keys(raw, out=work)
    if descending:
        np.invert(keys, out=keys)
    key_min = keys.min()
    keys -= key_min  # the smaller range keeps more value bits
    # The value gets the bits the position leaves: all of them when its range fits (ints),
    # else its top bits, and _sort_truncated_ties puts right the few distinct values that
    # share them (they come out in position order, and full keys are recomputed for them).
    dropped = np.uint64(max(0, int(keys.max()).bit_length() - (64 - position_bits)))
    shift = np.uint64(position_bits)
    if dropped:
        keys >>= dropped
    keys <<= shift
    _or_positions(keys)
    # Single-threaded by default: it leaves the other core to a concurrent sort.
    packed = pl.Series(keys).sort(multithreaded=multithreaded).to_numpy()
    order = np.bitwise_and(packed, (np.uint64(1) << shift) - np.uint64(1), out=keys).view(np.int64)  # positions < 2**40
    if dropped:

        def full_keys(rows: np.ndarray) -> np.ndarray:
            # The same map as for the whole column, for a few rows.
            some = _sortable_keys(raw[rows])
            return (np.invert(some, out=some) if descending else some) - key_min

        _sort_truncated_ties(order, packed, shift, full_keys, values)
    return order


POSITION_BLOCK = 1 << 18


def _or_positions(packed: np.ndarray) -> None:
    """``packed |= arange(len(packed))``, a block at a time so no 80 MB arange is made."""
    block = np.arange(min(POSITION_BLOCK, len(packed)), dtype=np.uint64)
    for start in range(0, len(packed), POSITION_BLOCK):
        piece = packed[start : start + POSITION_BLOCK]
        np.bitwise_or(piece, block[: len(piece)], out=piece)
        block += np.uint64(POSITION_BLOCK)


def _polars_stable_arg_sort(values: pl.Series, descending: bool) -> pl.Series:
    frame = pl.DataFrame({"v": values})
    return frame.select(pl.arg_sort_by("v", descending=descending, maintain_order=True)).to_series().cast(pl.Int64)


_SIGN_BIT = np.uint64(1 << 63)
_SIGNED_64 = (pl.Int8, pl.Int16, pl.Int32, pl.Int64)
_UNSIGNED_64 = (pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def _raw_values(values: pl.Series) -> np.ndarray | None:
    """The values as a float64, int64 or uint64 array (None if they have no cheap sortable map)."""
    if values.len() == 0 or values.null_count() or not values.dtype.is_numeric():
        return None
    if values.dtype.is_float():
        return values.cast(pl.Float64).to_numpy()
    if values.dtype in _SIGNED_64:
        return values.cast(pl.Int64).to_numpy()
    if values.dtype in _UNSIGNED_64:
        return values.cast(pl.UInt64).to_numpy()
    return None  # decimals, 128-bit integers


def _sortable_keys(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint64 keys whose unsigned order is the order of ``raw`` (from ``_raw_values``), in ``out`` or a new array."""
    keys = np.empty(raw.size, dtype=np.uint64) if out is None else out
    if raw.dtype == np.uint64:
        np.copyto(keys, raw)
        return keys
    if raw.dtype == np.int64:
        np.bitwise_xor(raw.view(np.uint64), _SIGN_BIT, out=keys)
        return keys
    # + 0.0 turns -0.0 into 0.0: they compare equal, so they must tie. NaN is refused earlier.
    np.add(raw, 0.0, out=keys.view(np.float64))
    # IEEE order as unsigned order: flip every bit of negatives, only the sign of others.
    if keys.view(np.int64).min() >= 0:  # no negatives (scores usually): no temporary needed
        keys |= _SIGN_BIT
        return keys
    negative = keys.view(np.int64) < 0
    np.invert(keys, out=keys, where=negative)
    np.bitwise_or(keys, _SIGN_BIT, out=keys, where=~negative)
    return keys


def _sort_truncated_ties(
    order: np.ndarray, packed: np.ndarray, shift: np.uint64, full_keys: "Callable[[np.ndarray], np.ndarray]", values: pl.Series
) -> None:
    """Re-sort, in place, the runs of ``order`` whose values share their truncated keys.

    ``packed`` is the sorted array of (truncated key << shift | position): only neighbours
    with the same truncated key can be out of order, so only they are compared in full.
    """
    tied = _tied_neighbours(packed, shift)
    n_tied = int(np.count_nonzero(tied))
    if n_tied == 0:
        return
    if n_tied > order.size // 8:  # many repeated values
        # As many distinct values as truncated keys: no two values share their top bits,
        # nothing to fix. A hash count is ~5x cheaper than gathering every key.
        if values.n_unique() == order.size - n_tied:
            return
        # Else one gather of every key is cheaper than comparing the many tied neighbours.
        sorted_keys = full_keys(order)
        out_of_order = np.flatnonzero(sorted_keys[1:] < sorted_keys[:-1])
    else:
        same = np.flatnonzero(tied)
        out_of_order = same[full_keys(order[same + 1]) < full_keys(order[same])]
    if out_of_order.size == 0:
        return
    # Each run: the packed values from (truncated << shift) to (truncated << shift) | mask.
    low = (packed[out_of_order] >> shift) << shift
    starts = np.unique(low)
    firsts = np.searchsorted(packed, starts, side="left")
    lengths = np.searchsorted(packed, starts | ((np.uint64(1) << shift) - np.uint64(1)), side="right") - firsts
    slots = np.repeat(firsts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    rows = order[slots]
    # The runs are in value order among themselves, so sorting their union by (full value,
    # position) and writing it back into their slots sorts each run.
    order[slots] = rows[np.lexsort((rows, full_keys(rows)))]


def _tied_neighbours(packed: np.ndarray, shift: np.uint64) -> np.ndarray:
    """``tied[i]``: sorted entries i and i+1 have the same truncated key (a block at a time)."""
    tied = np.empty(max(packed.size - 1, 0), dtype=bool)
    limit = np.uint64(1) << shift
    scratch = np.empty(min(POSITION_BLOCK, tied.size), dtype=np.uint64)
    for start in range(0, tied.size, POSITION_BLOCK):
        stop = min(start + POSITION_BLOCK, tied.size)
        xor = np.bitwise_xor(packed[start + 1 : stop + 1], packed[start:stop], out=scratch[: stop - start])
        np.less(xor, limit, out=tied[start:stop])  # equal top bits: they differ below `shift`
    return tied


def _ranks_from_order(positions: np.ndarray) -> pl.Series:
    """1-based rank of every row: the inverse permutation of a sort order."""
    # A scatter is linear; inverting by a second sort would cost as much as the first.
    # Block by block, so that no 80 MB arange is made.
    ranks = np.empty(positions.size, dtype=np.int64)
    block = np.arange(1, min(POSITION_BLOCK, positions.size) + 1, dtype=np.int64)
    for start in range(0, positions.size, POSITION_BLOCK):
        piece = positions[start : start + POSITION_BLOCK]
        ranks[piece] = block[: piece.size]
        block += POSITION_BLOCK
    return pl.Series(ranks)


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
