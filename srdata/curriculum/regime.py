"""Which regime a run is in: can the teacher do the part SRD would drop? (``srdata report`` / ``export``).

SRD drops the student's hardest rows. That pays where those rows are beyond the teacher too,
or their references are wrong (the paper's regime); it costs quality where the teacher can
do them (the rows KD would have taught). After ``srdata teach`` a run has
``teacher_ce_loss``; this module compares the part a cut drops with the part it keeps:

* **teachable share** of the dropped part: the share of dropped rows whose ``teacher_ce_loss``
  is at most the kept part's 90th percentile (:data:`KEPT_QUANTILE`), i.e. rows the teacher
  finds as easy as the rows it is trusted on;
* the median ``teacher_ce_loss`` of the dropped part over the kept part's.

When the teachable share reaches :data:`WARN_SHARE` the dropped part is *mostly teachable*
and a :class:`RegimeWarning` says so, with what dropping it cost on the testbed
(:data:`EVIDENCE`, benchmarks/repro PLAN.md and results-*.json) and what to use instead.
Measure, quantile and threshold are those of the pre-registered two-regime comparison.

Example:
    >>> import polars as pl
    >>> positions = pl.Series(range(1, 9))
    >>> teacher = pl.Series([0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 0.2, 5.0])
    >>> statement = regime_statement(positions, teacher, kept_rows=6)
    >>> statement["dropped_rows"], statement["teachable_share"], statement["mostly_teachable"]
    (2, 0.5, True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import polars as pl

__all__ = ["KEPT_QUANTILE", "WARN_SHARE", "EVIDENCE", "REGIME_FIGURE", "RegimeWarning", "RegimeSection", "regime_statement",
           "statement_text", "warning_text", "warn_if_teachable", "regime_of_cut", "tell_regime", "report_section", "plot_regime"]

TEACHER_COLUMN = "teacher_ce_loss"
REGIME_FIGURE = "student_vs_teacher.png"
#: A dropped row is "teachable" when its teacher CE is at most this quantile of the kept part's.
KEPT_QUANTILE = 0.9
#: The dropped part is "mostly teachable" from this teachable share on: the midpoint of the two-regime
#: comparison's mean shares (benchmarks/repro/results-regimes.json: teachable regime 0.62 / 0.63 / 0.62
#: on its 3 seeds, paper regime 0.25 / 0.23 / 0.27), as its pre-registered plan (PLAN.md) set it.
WARN_SHARE = 0.44
#: What the two-regime comparison measured (benchmarks/repro/results-*.json), quoted by the warning.
EVIDENCE: dict[str, Any] = {
    "source": "benchmarks/repro: PLAN.md, results-regimes.json, results-teachable.json, results.json",
    "teachable_regime_srd_minus_full_kd_em": -2.4,  # points, mean of 3 seeds x (fkl, rkl), 600 pairs; 5 of 6 pairs lower
    "teachable_regime_teachable_ranking_minus_full_kd_em": -2.2,
    "first_comparison_srd_minus_full_kd_em": {"fkl": -38.4, "rkl": -15.7},  # 2,000 pairs, benchmarks/repro/results.json
    "text": ("On the testbed where the dropped part was this teachable (benchmarks/repro, 'teachable' regime), SRD lost to "
             "full-data KD: -2.4 exact-match points at 600 pairs (5 of 6 seed/loss pairs lower), -38 (fkl) and -16 (rkl) at "
             "2,000 pairs; --rank-by teachable lost as much (-2.2), because it still drops a quarter. Train on every row "
             "instead (full-data KD; from the teacher's cached top-K, `srdata teach --top-k 32` then `srd-distill "
             "--teacher-logits`, the same quality in 0.44x the training time there), or keep every part (`srdata export "
             "--keep` = `--stages`)."),
}


class RegimeWarning(UserWarning):
    """The part a cut drops is mostly rows the teacher can do: dropping them is likely to cost quality."""


def regime_statement(positions: pl.Series, teacher_ce: pl.Series, kept_rows: int) -> Optional[dict[str, Any]]:
    """How much of the dropped part the teacher can do, for a cut that keeps positions ``1..kept_rows``.

    ``positions`` are the easy-to-hard positions the cut is made on (difficulty or stratified
    ranks; null = not ranked, left out) and ``teacher_ce`` the rows' ``teacher_ce_loss`` in
    the same order. Returns ``None`` when nothing is dropped or no teacher figure exists.

    Example:
        >>> regime_statement(pl.Series([1, 2]), pl.Series([0.1, 0.2]), kept_rows=2) is None
        True
    """
    frame = pl.DataFrame({"position": positions, "teacher": teacher_ce}).drop_nulls()
    kept = frame.filter(pl.col("position") <= kept_rows)["teacher"]
    dropped = frame.filter(pl.col("position") > kept_rows)["teacher"]
    if kept.len() == 0 or dropped.len() == 0:
        return None
    threshold = float(kept.quantile(KEPT_QUANTILE, interpolation="linear"))
    share = float((dropped <= threshold).mean())
    kept_median, dropped_median = float(kept.median()), float(dropped.median())
    return {
        "kept_rows": kept.len(),
        "dropped_rows": dropped.len(),
        "kept_quantile": KEPT_QUANTILE,
        "threshold": threshold,
        "teachable_share": share,
        "teachable_rows": int((dropped <= threshold).sum()),
        "kept_median_teacher_ce": kept_median,
        "dropped_median_teacher_ce": dropped_median,
        "median_ratio": dropped_median / kept_median if kept_median > 0 else None,
        "warn_share": WARN_SHARE,
        "mostly_teachable": share >= WARN_SHARE,
    }


def statement_text(statement: dict[str, Any]) -> str:
    """One paragraph for the report and the export's output.

    Example:
        >>> statement_text(regime_statement(pl.Series(range(1, 9)), pl.Series([0.1] * 6 + [5.0, 6.0]), 6))[:40]
        'The teacher can do 0% of the part this c'
    """
    s = statement
    ratio = f"{s['median_ratio']:.2f}x" if s["median_ratio"] is not None else "n/a"
    looks = ("the dropped part is mostly rows the teacher can do (the regime where SRD lost to full-data KD on the testbed)"
             if s["mostly_teachable"] else
             "the dropped part is mostly rows the teacher cannot do or whose reference it disagrees with (the regime SRD was built for)")
    return (f"The teacher can do {s['teachable_share']:.0%} of the part this cut drops: {s['teachable_rows']} of its "
            f"{s['dropped_rows']} rows have a teacher cross-entropy within the kept part's (at most its "
            f"{s['kept_quantile'] * 100:.0f}th percentile, {s['threshold']:.3g} nats/token); the dropped part's median teacher "
            f"cross-entropy is {ratio} the kept part's ({s['dropped_median_teacher_ce']:.3g} vs {s['kept_median_teacher_ce']:.3g}). "
            f"So {looks}; warned from {s['warn_share']:.0%} on.")


def warning_text(statement: dict[str, Any]) -> str:
    """The warning: what is dropped, what it cost on the testbed, and what to use instead."""
    measured = EVIDENCE.get("text", "")
    return (f"the part this cut drops is mostly teachable ({statement['teachable_share']:.0%} of its {statement['dropped_rows']} rows "
            f"are as easy for the teacher as the kept rows): dropping them removes what KD would teach. {measured}".rstrip())


def warn_if_teachable(statement: Optional[dict[str, Any]], command: str = "srdata") -> None:
    """Raise a :class:`RegimeWarning` when the statement says the dropped part is mostly teachable.

    Shown as ``srdata report: RegimeWarning: ...`` (no source line) by Python's default display.

    Example:
        >>> warn_if_teachable(None)   # no teacher pass: nothing to say
    """
    if statement is not None and statement["mostly_teachable"]:
        warnings.warn_explicit(warning_text(statement), RegimeWarning, filename=command, lineno=0)


def _has_teacher_pass(annotated: Path) -> bool:
    try:
        return TEACHER_COLUMN in pl.read_parquet_schema(annotated)
    except (OSError, pl.exceptions.PolarsError):  # a remote or unreadable run: the export/report says so itself
        return False


def regime_of_cut(annotated: Path, positions: pl.Series, kept_rows: int) -> Optional[dict[str, Any]]:
    """:func:`regime_statement` of a cut of ``annotated`` (positions in file order); ``None`` without a teacher pass.

    Example:
        >>> regime_of_cut(Path("runs/dolly/annotated.parquet"), ranks["difficulty_rank"], 7500)   # doctest: +SKIP
    """
    if not _has_teacher_pass(annotated):
        return None
    teacher = pl.read_parquet(annotated, columns=[TEACHER_COLUMN])[TEACHER_COLUMN]  # file order, as the positions
    return regime_statement(positions, teacher, kept_rows)


def tell_regime(statement: Optional[dict[str, Any]], echo: Optional[Callable[[str], None]], command: str = "srdata export") -> None:
    """Say the statement (and the warning) through ``echo``; without ``echo``, only the warning, as a :class:`RegimeWarning`."""
    if statement is None:
        return
    if echo is None:
        warn_if_teachable(statement, command)
        return
    echo(statement_text(statement))
    if statement["mostly_teachable"]:
        echo(f"warning: {warning_text(statement)}")


@dataclass
class RegimeSection:
    """The report's regime section: its blocks, its figure's writer and the statement."""

    blocks: list[tuple]
    draw: dict[str, Callable[[Path], Any]]
    statement: dict[str, Any]


def report_section(annotated: Path, staged: pl.DataFrame, position_column: str, kept_rows: int,
                   id_column: str = "srd_id") -> Optional[RegimeSection]:
    """The report's section on the run's regime, or ``None`` without a teacher pass or a dropped part.

    Example:
        >>> report_section(run.annotated, staged, "difficulty_rank", 7500)   # doctest: +SKIP
    """
    if not _has_teacher_pass(annotated):
        return None
    teacher = pl.read_parquet(annotated, columns=[id_column, TEACHER_COLUMN])
    rows = staged.select(id_column, position_column).join(teacher, on=id_column, how="left")
    statement = regime_statement(rows[position_column], rows[TEACHER_COLUMN], kept_rows)
    if statement is None:
        return None
    blocks: list[tuple] = [("h2", "Regime: can the teacher do the dropped part?"), ("p", statement_text(statement))]
    if statement["mostly_teachable"]:
        blocks.append(("p", f"Warning: {warning_text(statement)}"))
    blocks.append(("img", REGIME_FIGURE, "Student difficulty against teacher cross-entropy, the cut drawn"))
    draw = {REGIME_FIGURE: lambda path: plot_regime(rows[position_column], rows[TEACHER_COLUMN], statement, path)}
    return RegimeSection(blocks, draw, statement)


def plot_regime(position: pl.Series, teacher_ce: pl.Series, statement: dict[str, Any], path: Path) -> Path:
    """Student difficulty (position, easy to hard) against teacher cross-entropy, the cut and the threshold drawn."""
    from srdata.curriculum.plots import DROPPED_COLOUR, SCATTER_POINTS, new_figure

    frame = pl.DataFrame({"position": position, "teacher": teacher_ce}).drop_nulls()
    if frame.height > SCATTER_POINTS:
        frame = frame.sample(SCATTER_POINTS, seed=0)
    kept = statement["kept_rows"]
    figure = new_figure(7, 5)
    axis = figure.subplots()
    inside = frame.filter(pl.col("position") <= kept)
    outside = frame.filter(pl.col("position") > kept)
    axis.scatter(inside["position"], inside["teacher"], s=8, alpha=0.6, color="#4477aa", label="kept")
    axis.scatter(outside["position"], outside["teacher"], s=10, marker="x", color=DROPPED_COLOUR, label="dropped")
    axis.axvline(kept + 0.5, color="black", linewidth=1, label=f"cut (keep {kept} rows)")
    axis.axhline(statement["threshold"], color="#cc6677", linestyle="--", linewidth=1,
                 label=f"kept part's {statement['kept_quantile'] * 100:.0f}th percentile")
    if frame["teacher"].min() > 0:
        axis.set_yscale("log")
    axis.set_xlabel("student difficulty (position in the ranking, easy to hard)")
    axis.set_ylabel("teacher cross-entropy (nats/token)")
    axis.set_title(f"The teacher can do {statement['teachable_share']:.0%} of the dropped part")
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")  # the name may be a temp file's
    return path
