"""Groups across curriculum stages: the share check behind ``--by`` and the stratified cut of ``--stratify``.

SRD ranks rows by how hard they are for the student, and the ranking follows the
student's skills: on the testbed the dropped quarter took 40% of one task family and
the first stage was 85% one family, and knowledge distillation then never learnt the
families the curriculum starved (``benchmarks/README.md``). With a grouping column
(a template, task or source column of the scored data) two tools guard against that:

**Share check** (``srdata export --by COLUMN``, ``srdata report --by COLUMN``). For each
group, its share of the ranked rows is compared with its share of every stage file and
of the dropped part. A group is flagged in a part when

    share in the part / share of all ranked rows  >  max_ratio   or   <  1 / max_ratio

(default ``max_ratio`` 2: more than twice, or less than half, its share), provided the
group has at least ``min_rows`` ranked rows (default 40). Smaller groups are listed but
not flagged, because chance alone moves small counts that far: under a random ranking a
group of 40 rows has 4 or fewer of them (under half its 10) in a given quarter with
probability 1.6% (binomial), a group of 20 has 2 or fewer (under half its 5) with 9%,
which would flag dozens of the groups of a dataset with hundreds of templates.
Their fate is shown in aggregate instead (:func:`small_groups`): how many of them lose
every row to the dropped part (against how many would by chance), and the share of the
dropped part they make up together; that combined share is checked like a group's.

**Stratified cut** (``srdata export --stratify COLUMN``). The ranked rows are put in one
order that interleaves the groups in proportion to their sizes, each group's rows easiest
first (:func:`stratified_ranks`), so that every prefix of the order holds each group
within less than one row of its share. The stages are then cut from that order exactly
as from the difficulty ranks: the stage sizes are unchanged, and every group holds its
share of every cumulative stage and of the dropped part within one row (of a disjoint
part within two). The order is written as the ``stratified_rank`` column (1 = first).

Example:
    >>> import polars as pl
    >>> stratified_ranks(pl.Series([1, 2, 3, 4, 5, 6]), pl.Series(["a", "a", "a", "a", "b", "b"])).to_list()
    [1, 2, 4, 5, 3, 6]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import polars as pl

STRATIFIED_COLUMN = "stratified_rank"
DEFAULT_MAX_SHARE_RATIO = 2.0
DEFAULT_MIN_GROUP_ROWS = 40
DROPPED = "dropped"
SHOWN_WARNINGS = 20  # warnings echoed to the terminal; curriculum.json and the report keep all


class GroupError(ValueError):
    """A grouping column or share-check setting that cannot be used."""


class GroupShareWarning(UserWarning):
    """A group's share of a stage or of the dropped part is far from its share of all rows.

    Turn it into an error in a pipeline with ``warnings.simplefilter("error", GroupShareWarning)``
    (or ``python -W error::srdata.curriculum.groups.GroupShareWarning``).
    """


@dataclass(frozen=True)
class ShareCheck:
    """When a group's share of a part is far enough from its overall share to warn.

    Example:
        >>> ShareCheck().flags(share=0.85, overall=0.25, rows=500)
        True
        >>> ShareCheck().flags(share=0.40, overall=0.25, rows=500), ShareCheck().flags(share=0.0, overall=0.25, rows=20)
        (False, False)
    """

    max_ratio: float = DEFAULT_MAX_SHARE_RATIO
    min_rows: int = DEFAULT_MIN_GROUP_ROWS

    def __post_init__(self) -> None:
        if not isinstance(self.max_ratio, (int, float)) or isinstance(self.max_ratio, bool) or not self.max_ratio > 1:
            raise GroupError(f"--max-share-ratio must be a number above 1 (2 = warn at twice or half a group's share), got {self.max_ratio!r}")
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise GroupError(f"--min-group-rows must be a positive integer, got {self.min_rows!r}")

    def flags(self, share: float, overall: float, rows: int) -> bool:
        """Whether a group of ``rows`` ranked rows, ``overall`` of all of them, is out of bounds at ``share`` of a part."""
        if rows < self.min_rows or overall <= 0:
            return False
        ratio = share / overall
        return ratio > self.max_ratio or ratio < 1 / self.max_ratio

    def describe(self) -> dict[str, Any]:
        return {"max_share_ratio": self.max_ratio, "min_group_rows": self.min_rows}


def check_group_columns(schema: Mapping[str, Any], columns: Iterable[str], option: str = "--by") -> list[str]:
    """The grouping columns, checked against the run's columns; a clear error for any that cannot group.

    Example:
        >>> check_group_columns({"task": pl.String, "srd_id": pl.Int64}, ["task"])
        ['task']
    """
    columns = list(dict.fromkeys(columns))
    for column in columns:
        if column not in schema:
            raise GroupError(f"{option} column {column!r} does not exist in the run; columns: {', '.join(schema)}")
        dtype = schema[column]
        if isinstance(dtype, (pl.List, pl.Array, pl.Struct, pl.Object)) or dtype in (pl.List, pl.Array, pl.Struct, pl.Object):
            raise GroupError(f"{option} column {column!r} holds {dtype} values; group by a column of plain values (text, numbers, booleans)")
    return columns


def stratified_ranks(difficulty: pl.Series, groups: pl.Series) -> pl.Series:
    """Positions 1..N of the stratified easy-to-hard order (null where ``difficulty`` is null).

    ``difficulty`` holds the difficulty ranks (1 = easiest, null = not ranked), ``groups``
    the group of each row (null values form a group of their own). Every group's rows
    keep their easy-to-hard order, and every prefix of the order holds each group within
    less than one row of its share: after ``e`` positions, a group of ``n`` of the ``N``
    ranked rows has more than ``n e / N - 1`` and fewer than ``n e / N + 1`` rows placed.

    The order is a schedule of unit jobs: the k-th easiest row of a group of n rows may
    take position t only when ``k - 1 < n t / N`` (else the group would run one row
    ahead of its share) and must take one by ``t = ceil(k N / n)`` (else it would fall
    one row behind). Earliest deadline first among the rows whose time has come meets
    every deadline whenever any order can (unit jobs, integer release times), and one
    can: Tijdeman (1980, "The chairman assignment problem") builds an order that keeps
    every group within ``1 - 1/(2G - 2)`` rows. Equal deadlines go to the easier row.
    Cost: one heap push and pop per row, in Python.

    Example:
        >>> stratified_ranks(pl.Series([3, 1, None, 2]), pl.Series(["x", "y", "x", "x"])).to_list()
        [3, 2, None, 1]
    """
    if difficulty.len() != groups.len():
        raise GroupError(f"{difficulty.len()} difficulty ranks but {groups.len()} group values")
    frame = pl.DataFrame({"difficulty": difficulty.cast(pl.Int64), "group": groups}).with_row_index("row")
    jobs = (
        frame.filter(pl.col("difficulty").is_not_null())
        .with_columns(
            pl.col("difficulty").rank("ordinal").over("group").cast(pl.Int64).alias("k"),
            pl.len().over("group").cast(pl.Int64).alias("n"),
        )
    )
    total = jobs.height
    if jobs["difficulty"].n_unique() != total:
        raise GroupError("difficulty ranks repeat: stratify a ranked run (difficulty_rank is a permutation of 1..N)")
    jobs = jobs.with_columns(
        ((pl.col("k") - 1) * total // pl.col("n") + 1).alias("release"),
        (-((-pl.col("k") * total) // pl.col("n"))).alias("deadline"),
    ).sort(["release", "deadline", "difficulty"])
    positions = _earliest_deadline_first(jobs["release"].to_numpy(), jobs["deadline"].to_numpy(), jobs["difficulty"].to_numpy())
    placed = jobs.select("row", pl.Series(STRATIFIED_COLUMN, positions, dtype=pl.Int64))
    return frame.select("row").join(placed, on="row", how="left", maintain_order="left")[STRATIFIED_COLUMN]


def _earliest_deadline_first(release: Any, deadline: Any, difficulty: Any) -> list[int]:
    """Position of every job (given in release order): each position goes to the released job of earliest deadline."""
    import heapq

    total = len(release)
    scale = int(difficulty.max()) + 1 if total else 1
    # One int per heap entry (deadline, then the easier row): much faster than tuples.
    job_of = {int(d): i for i, d in enumerate(difficulty.tolist())}
    release, deadline, difficulty = release.tolist(), deadline.tolist(), difficulty.tolist()
    positions = [0] * total
    heap: list[int] = []
    next_job = 0
    for t in range(1, total + 1):
        while next_job < total and release[next_job] <= t:
            heapq.heappush(heap, deadline[next_job] * scale + difficulty[next_job])
            next_job += 1
        key = heapq.heappop(heap)  # never empty: every position has a released job (see the docstring)
        job = job_of[key % scale]
        if deadline[job] < t:
            raise RuntimeError(f"stratified order missed a deadline at position {t}; please report this with the group sizes")
        positions[job] = t
    return positions


@dataclass(frozen=True)
class Part:
    """A stage file or the dropped part: the rows at positions ``start < p <= stop`` (1-based positions)."""

    name: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def curriculum_parts(bounds: Sequence[tuple[int, int]], n_ranked: int) -> list[Part]:
    """The parts a share check looks at: every stage file (``stage 0`` ...), then ``dropped`` when rows are dropped.

    Example:
        >>> [(p.name, p.start, p.stop) for p in curriculum_parts([(0, 2), (0, 4), (0, 6)], 9)]
        [('stage 0', 0, 2), ('stage 1', 0, 4), ('stage 2', 0, 6), ('dropped', 6, 9)]
    """
    parts = [Part(f"stage {s}", start, stop) for s, (start, stop) in enumerate(bounds)]
    kept_end = max((stop for _, stop in bounds), default=0)
    if kept_end < n_ranked:
        parts.append(Part(DROPPED, kept_end, n_ranked))
    return parts


def group_shares(
    positions: pl.Series,
    groups: pl.Series,
    parts: Sequence[Part],
    column: str,
    check: ShareCheck = ShareCheck(),
) -> dict[str, Any]:
    """Each group's rows and share overall and in every part, and the warnings of ``check``.

    ``positions`` are the easy-to-hard positions the parts are cut from (the difficulty
    ranks, or the stratified ranks of a stratified export; null = not ranked, left out).
    The result is what ``curriculum.json`` records under ``groups`` (one entry per column).

    Example:
        >>> result = group_shares(pl.Series([1, 2, 3, 4]), pl.Series(["a", "a", "b", "b"]), [Part("stage 0", 0, 2)], "task")
        >>> [(g["value"], g["parts"]["stage 0"]["share"]) for g in result["table"]]
        [('a', 1.0), ('b', 0.0)]
    """
    frame = pl.DataFrame({"position": positions, "group": groups}).filter(pl.col("position").is_not_null())
    total = frame.height
    counts = frame.group_by("group").agg(
        pl.len().alias("rows"),
        *(pl.col("position").is_between(part.start + 1, part.stop).sum().alias(part.name) for part in parts),
    )
    counts = counts.sort(["rows", "group"], descending=[True, False], nulls_last=True)
    table = []
    for row in counts.iter_rows(named=True):
        overall = row["rows"] / total if total else 0.0
        shares = {}
        for part in parts:
            share = row[part.name] / part.rows if part.rows else None
            shares[part.name] = {
                "rows": row[part.name],
                "share": share,
                "ratio": share / overall if share is not None and overall else None,
                "flagged": share is not None and check.flags(share, overall, row["rows"]),
            }
        table.append({"value": row["group"], "rows": row["rows"], "share": overall, "parts": shares})
    small = small_groups(table, total, next((p for p in parts if p.name == DROPPED), None), check)
    return {
        "column": column,
        "ranked_rows": total,
        "groups": len(table),
        "parts": [{"name": p.name, "rows": p.rows} for p in parts],
        **check.describe(),
        "table": table,
        "small_groups": small,
        "warnings": [
            share_warning(column, entry, name) for entry in table for name, part in entry["parts"].items() if part["flagged"]
        ] + ([small_groups_warning(column, small)] if small is not None and small["flagged"] else []),
    }


def small_groups(table: Sequence[Mapping[str, Any]], total: int, dropped: Part | None, check: ShareCheck) -> dict[str, Any] | None:
    """The groups under ``check.min_rows`` ranked rows (never flagged one by one), taken together; ``None`` if there are none.

    ``all_dropped_groups``: how many lose every row to the dropped part; ``expected_all_dropped``:
    how many would under a random ranking (for a group of n rows, the chance that all n fall in
    a dropped part of D of the N rows is D(D-1)...(D-n+1) / N(N-1)...(N-n+1)). ``share_of_dropped``:
    the share of the dropped part they make up together, against ``share`` of all ranked rows;
    ``flagged`` when that is out of bounds and they hold ``check.min_rows`` rows or more together.

    Example:
        >>> table = [{"rows": 2, "parts": {"dropped": {"rows": 2}}}, {"rows": 96, "parts": {"dropped": {"rows": 23}}}]
        >>> small = small_groups(table, 98, Part("dropped", 73, 98), ShareCheck())
        >>> small["groups"], small["all_dropped_groups"], round(small["share_of_dropped"], 2), small["flagged"]
        (1, 1, 0.08, False)
    """
    small = [entry for entry in table if entry["rows"] < check.min_rows]
    if not small:
        return None
    rows = sum(entry["rows"] for entry in small)
    share = rows / total if total else 0.0
    result: dict[str, Any] = {"min_rows": check.min_rows, "groups": len(small), "rows": rows, "share": share, "dropped_part_rows": 0,
                              "dropped_rows": 0, "share_of_dropped": None, "ratio": None, "all_dropped_groups": 0,
                              "all_dropped_rows": 0, "expected_all_dropped": 0.0, "flagged": False}
    if dropped is None or not dropped.rows:
        return result
    held = [entry["parts"][DROPPED]["rows"] for entry in small]
    lost = [entry["rows"] for entry, count in zip(small, held) if count == entry["rows"]]
    share_of_dropped = sum(held) / dropped.rows
    result.update(
        dropped_part_rows=dropped.rows,
        dropped_rows=sum(held),
        share_of_dropped=share_of_dropped,
        ratio=share_of_dropped / share if share else None,
        all_dropped_groups=len(lost),
        all_dropped_rows=sum(lost),
        expected_all_dropped=sum(_chance_all_dropped(entry["rows"], dropped.rows, total) for entry in small),
        flagged=check.flags(share_of_dropped, share, rows),
    )
    return result


def _chance_all_dropped(n: int, dropped: int, total: int) -> float:
    chance = 1.0
    for i in range(n):
        chance *= max(dropped - i, 0) / (total - i)
    return chance


def small_groups_text(result: Mapping[str, Any]) -> str | None:
    """One sentence on the fate of the groups too small to flag, or ``None`` when there are none (or nothing is dropped).

    Example:
        >>> result = group_shares(pl.Series(range(1, 45)), pl.Series(["a"] * 40 + ["b"] * 3 + ["c"]), [Part("stage 0", 0, 33), Part("dropped", 33, 44)], "task")
        >>> print(small_groups_text(result))
        2 groups of task under 40 ranked rows (4 rows, 9.1% of ranked rows): 2 lose every row to the dropped part (4 rows; 0.26 expected by chance); together they are 36% of the dropped part against 9.1% of all ranked rows (4.00x their share).
    """
    small = result.get("small_groups")
    if not small or small["share_of_dropped"] is None:  # none, or nothing dropped
        return None
    head = (f"{small['groups']} group{'s' * (small['groups'] != 1)} of {result['column']} under {small['min_rows']} ranked rows "
            f"({small['rows']} rows, {_percent(small['share'])} of ranked rows)")
    return (
        f"{head}: {small['all_dropped_groups']} lose every row to the dropped part ({small['all_dropped_rows']} rows; "
        f"{small['expected_all_dropped']:.2g} expected by chance); together they are {_percent(small['share_of_dropped'])} of the "
        f"dropped part against {_percent(small['share'])} of all ranked rows ({small['ratio']:.2f}x their share)."
    )


def small_groups_warning(column: str, small: Mapping[str, Any]) -> str:
    """The warning when the small groups together are far from their share of the dropped part."""
    return (
        f"the dropped part is {_percent(small['share_of_dropped'])} groups of {column} under {small['min_rows']} rows "
        f"({small['groups']} groups, {small['dropped_rows']} of their {small['rows']} rows) against {_percent(small['share'])} of all "
        f"ranked rows: {small['ratio']:.2f}x their share; {small['all_dropped_groups']} of them lose every row"
    )


def share_warning(column: str, entry: Mapping[str, Any], part: str) -> str:
    """One line: which part holds how much of a group, against its overall share.

    Example:
        >>> share_warning("task", {"value": "sort", "rows": 500, "share": 0.25,
        ...                        "parts": {"stage 0": {"rows": 425, "share": 0.85, "ratio": 3.4}}}, "stage 0")
        "stage 0 is 85% task='sort' (425 of its 500 rows) against 25% of all ranked rows: 3.40x its share"
    """
    held = entry["parts"][part]
    where = "the dropped part" if part == DROPPED else part
    return (
        f"{where} is {_percent(held['share'])} {column}={format_value(entry['value'])} ({held['rows']} of its {entry['rows']} rows) "
        f"against {_percent(entry['share'])} of all ranked rows: {held['ratio']:.2f}x its share"
    )


def _percent(share: float) -> str:
    # One decimal below 10%, so that 1 row in 200 does not read as 0%.
    return f"{share:.1%}" if 0 < share < 0.1 else f"{share:.0%}"


def format_value(value: Any) -> str:
    """A group value as shown in tables and warnings: text quoted, null as ``null``."""
    return "null" if value is None else repr(value)


def emit_warnings(messages: Iterable[str], stacklevel: int = 3) -> None:
    """Raise each message as a :class:`GroupShareWarning` (shown on stderr unless filtered)."""
    for message in messages:
        warnings.warn(message, GroupShareWarning, stacklevel=stacklevel)


def share_table_rows(result: Mapping[str, Any], limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-group share table (flagged cells marked ``!``), largest groups first.

    With ``limit``, the ``limit`` largest groups are shown, plus every flagged group.
    """
    names = [p["name"] for p in result["parts"]]
    headers = [result["column"], "ranked rows", "share of all", *(f"share of {n}" for n in names)]
    rows = []
    for index, entry in enumerate(result["table"]):
        flagged = any(entry["parts"][n]["flagged"] for n in names)
        if limit is not None and index >= limit and not flagged:
            continue
        cells = [_share_cell(entry["parts"][n]) for n in names]
        rows.append([format_value(entry["value"]), str(entry["rows"]), f"{entry['share']:.1%}", *cells])
    return headers, rows


def _share_cell(part: Mapping[str, Any]) -> str:
    if part["share"] is None:
        return "-"
    return f"{part['share']:.1%}" + (" !" if part["flagged"] else "")


def format_share_table(result: Mapping[str, Any], limit: int | None = 12) -> list[str]:
    """The share table as aligned plain-text lines (``srdata demo``, the terminal).

    Example:
        >>> result = group_shares(pl.Series([1, 2, 3, 4]), pl.Series(["a", "a", "b", "b"]), [Part("stage 0", 0, 2)], "task")
        >>> print("\\n".join(format_share_table(result)))
        task  ranked rows  share of all  share of stage 0
        'a'             2         50.0%            100.0%
        'b'             2         50.0%              0.0%
    """
    headers, rows = share_table_rows(result, limit)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in [headers, *rows]]
    hidden = len(result["table"]) - len(rows)
    if hidden:
        lines.append(f"... and {hidden} smaller groups, none flagged")
    small = small_groups_text(result)
    if small:
        lines.append(small)
    return lines


def advice(result: Mapping[str, Any]) -> str:
    """What to do about flagged groups (one paragraph), or an empty string when none is flagged."""
    if not result["warnings"]:
        return ""
    column = result["column"]
    return (
        f"A stage far from a group's share floods or starves that {column} while the student trains on it, and a dropped "
        f"part far above it removes much of that {column}. If every {column} matters, keep each one's share with "
        f"`--stratify {column}`, or drop less (`--keep` equal to `--stages`, or `--fractions` ending nearer 1)."
    )
