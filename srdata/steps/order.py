"""A stable sort order and ranks for numeric columns, fast at ten million rows.

The mechanics behind ranking (``srdata.steps.rank`` keeps the method: RRF and the presets):
the value's sortable bits and the row position are packed into one uint64 and sorted as
plain numbers, and the few values whose truncated keys tie are put right afterwards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import polars as pl


def stable_order(
    values: pl.Series, descending: bool = False, start: np.ndarray | None = None, alone: bool = False, work: np.ndarray | None = None
) -> np.ndarray:
    """Row positions (int64) sorted by ``values``, equal values kept in ``start`` order (input order when None).

    The same result as ``arg_sort_by(..., maintain_order=True)``, about 3x faster on
    10M rows: the value's sortable bits and the position are packed into one uint64 and
    sorted as plain numbers, which polars does much faster than a stable arg sort.
    ``alone=True`` lets the sort use every core; ``work`` (uint64, overwritten) saves a
    fresh 80 MB allocation at 10M rows.

    Example:
        >>> stable_order(pl.Series([0.5, 0.1, 0.5, 0.2]), descending=True).tolist()
        [0, 2, 3, 1]
    """
    in_start_order = values if start is None else values.gather(start)
    local = _packed_arg_sort(in_start_order, descending, alone, work)
    if local is None:
        local = _polars_stable_arg_sort(in_start_order, descending).to_numpy()
    return local if start is None else start[local]


def _packed_arg_sort(values: pl.Series, descending: bool, multithreaded: bool, work: np.ndarray | None = None) -> np.ndarray | None:
    """``stable_order`` without a start order, in ``work`` (uint64, overwritten) when given; None where it does not apply."""
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


def ranks_from_order(positions: np.ndarray) -> pl.Series:
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
