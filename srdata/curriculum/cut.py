"""Where a curriculum cuts the ranked rows: stage settings, stage bounds, and the parts between them.

Export splits the valid rows, easiest first, into ``stages`` equal parts, keeps the
easiest ``keep`` of them and writes one file per kept stage:

- ``cumulative`` (the paper): stage s holds the easiest ``floor(N/stages) * (s+1)`` rows;
- ``disjoint``: stage s holds only part s.

When every part is kept (``keep == stages``) the last stage also takes the remainder
rows, as the authors' ``tools/rank.py`` does. ``fractions`` replaces the equal cuts by
cumulative boundaries (``0.25,0.5,0.75``); the rows past the last boundary are dropped.

Example:
    >>> stage_bounds(10, plan_stages(4, 3))
    [(0, 2), (0, 4), (0, 6)]
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Sequence, get_args

Layout = Literal["cumulative", "disjoint"]
Format = Literal["parquet", "jsonl"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
FORMATS: tuple[str, ...] = get_args(Format)
DEFAULT_STAGES = 4


class CurriculumError(ValueError):
    """A run that cannot be exported, or export settings that make no sense."""


@dataclass(frozen=True)
class StagePlan:
    """How to cut the ranked rows, independent of their number."""

    layout: str
    stages: int  # number of equal parts (0 when fractions are used)
    keep: int
    fractions: tuple[Fraction, ...] | None

    def describe(self) -> dict[str, Any]:
        cuts = self.fractions or tuple(Fraction(s + 1, self.stages) for s in range(self.keep))
        return {
            "layout": self.layout,
            "stages": self.stages if self.fractions is None else None,
            "keep": self.keep,
            "fractions": [float(f) for f in cuts],
        }


@dataclass(frozen=True)
class StagePart:
    """Easy-to-hard positions ``[start, stop)`` that lie in the same stages: written once, read by each of them."""

    start: int
    stop: int


def plan_stages(
    stages: int | None = None,
    keep: int | None = None,
    fractions: Sequence[float] | None = None,
    layout: str = "cumulative",
) -> StagePlan:
    """Validate the stage settings; ``keep`` defaults to all parts but the hardest.

    Example:
        >>> plan_stages().describe()["fractions"]
        [0.25, 0.5, 0.75]
    """
    if layout not in LAYOUTS:
        raise CurriculumError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if fractions is not None:
        return _plan_from_fractions(stages, keep, fractions, layout)
    stages = DEFAULT_STAGES if stages is None else stages
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise CurriculumError(f"--stages must be a positive integer, got {stages!r}")
    keep = max(stages - 1, 1) if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise CurriculumError(f"--keep must be a positive integer, got {keep!r}")
    if keep > stages:
        raise CurriculumError(f"--keep {keep} is larger than --stages {stages}: at most {stages} stages can be kept")
    return StagePlan(layout, stages, keep, None)


def _plan_from_fractions(stages: int | None, keep: int | None, fractions: Sequence[float], layout: str) -> StagePlan:
    if stages is not None:
        raise CurriculumError("give either --stages or --fractions, not both: fractions set the stage boundaries")
    cuts = tuple(_exact_fraction(f) for f in fractions)
    if not cuts:
        raise CurriculumError("--fractions is empty; give increasing boundaries such as 0.25,0.5,0.75")
    if any(not 0 < c <= 1 for c in cuts):
        raise CurriculumError(f"--fractions must lie in (0, 1], got {', '.join(str(float(c)) for c in cuts)}")
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise CurriculumError(f"--fractions must be strictly increasing, got {', '.join(str(float(c)) for c in cuts)}")
    if keep is not None and keep != len(cuts):
        raise CurriculumError(f"--keep {keep} disagrees with the {len(cuts)} boundaries given by --fractions")
    return StagePlan(layout, 0, len(cuts), cuts)


def _exact_fraction(value: float | str) -> Fraction:
    # Fraction of the decimal text, not of the binary float: 0.29 * 100 must give 29 rows.
    try:
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise CurriculumError(f"--fractions entry {value!r} is not a number") from None


def stage_bounds(n_valid: int, plan: StagePlan) -> list[tuple[int, int]]:
    """Half-open ``(start, stop)`` positions in easy-to-hard order of every kept stage.

    Example:
        >>> stage_bounds(10, plan_stages(4, 3))
        [(0, 2), (0, 4), (0, 6)]
    """
    ends = _part_ends(n_valid, plan)
    starts = [0] * len(ends) if plan.layout == "cumulative" else [0, *ends[:-1]]
    return list(zip(starts, ends))


def _part_ends(n_valid: int, plan: StagePlan) -> list[int]:
    if plan.fractions is None:
        size = n_valid // plan.stages
        if size == 0:
            raise CurriculumError(f"only {n_valid} rankable rows, fewer than the {plan.stages} stages: every stage would be empty")
        ends = [size * (s + 1) for s in range(plan.keep)]
        return ends[:-1] + [n_valid] if plan.keep == plan.stages else ends
    ends = [int(c * n_valid) for c in plan.fractions]  # exact floor of a Fraction
    for s, (before, end) in enumerate(zip([0, *ends], ends)):
        if end == before:
            raise CurriculumError(f"with {n_valid} rankable rows, stage {s} of --fractions would be empty; use fewer or wider stages")
    return ends


def stage_parts(bounds: Sequence[tuple[int, int]]) -> tuple[list[StagePart], list[list[int]]]:
    """The disjoint parts between all stage boundaries, and the parts of each stage, easiest first.

    Example:
        >>> parts, members = stage_parts([(0, 2), (0, 4), (0, 6)])
        >>> [(p.start, p.stop) for p in parts], members
        ([(0, 2), (2, 4), (4, 6)], [[0], [0, 1], [0, 1, 2]])
    """
    points = sorted({p for bound in bounds for p in bound})
    pieces = [(a, b) for a, b in zip(points, points[1:]) if any(start <= a and b <= stop for start, stop in bounds)]
    members = [[g for g, (a, b) in enumerate(pieces) if start <= a and b <= stop] for start, stop in bounds]
    return [StagePart(a, b) for a, b in pieces], members
