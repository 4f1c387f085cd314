"""The report's figures (matplotlib, no display needed): score histograms, scores by stage, stage sizes.

Each function draws one PNG from plain values and returns its path. ``staged`` frames
hold the score columns and ``part`` (the row's stage, ``n_stages`` for the dropped part).

Example:
    >>> plot_stage_sizes([10, 20, 30], dropped=11, invalid_rows=2, layout="cumulative", path=Path("sizes.png"))   # doctest: +SKIP
    PosixPath('sizes.png')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

SCATTER_POINTS = 20_000  # enough to see the shape; more only slows the plot down
DPI = 100
DROPPED_COLOUR, INVALID_COLOUR = "#999999", "#cc6677"
LABELS = {
    "rouge_l": "ROUGE-L F1",
    "ce_loss": "cross-entropy (nats/token)",
    "ifd": "IFD (loss with prompt / without)",
    "pmi": "PMI (loss without prompt - with, nats/token)",
    "teacher_ce_loss": "teacher cross-entropy (nats/token)",
    "excess_ce_loss": "student - teacher cross-entropy (nats/token)",
}


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas: no pyplot, no global backend, works without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def plot_histograms(valid: pl.DataFrame, score_columns: Sequence[str], path: Path) -> Path:
    """Histograms of the scores of the ranked rows, two per row of panels (ROUGE-L, cross-entropy, then the ranking's others)."""
    rows = max(1, -(-len(score_columns) // 2))
    figure = new_figure(10, 4 * rows)
    axes = np.atleast_1d(figure.subplots(rows, 2)).ravel()
    for axis in axes[len(score_columns):]:
        axis.set_visible(False)
    for axis, column in zip(axes, score_columns):
        values = valid[column].drop_nulls().to_numpy()
        axis.hist(values, bins=50, color="#4477aa")
        axis.set_xlabel(LABELS.get(column, column))
        axis.set_ylabel("rows")
        axis.set_title(f"{column} ({len(values)} rows)")
    figure.tight_layout()
    figure.savefig(path, format="png")  # the name may be a temp file's
    return path


def plot_scatter(
    staged: pl.DataFrame, n_stages: int, path: Path, x: tuple[str, bool] = ("rouge_l", True), y: tuple[str, bool] = ("ce_loss", False)
) -> Path:
    """Two scores against each other, coloured by stage, the dropped part marked in grey (a sample of large runs).

    ``x`` and ``y`` are ``(column, higher_is_easier)``: ROUGE-L against cross-entropy by default, the
    ranking's first two scores in a report.
    """
    figure = new_figure(7, 6)
    axis = figure.subplots()
    shown = staged.sample(SCATTER_POINTS, seed=0) if staged.height > SCATTER_POINTS else staged
    colours = stage_colours(n_stages)
    for part in range(n_stages):
        rows = shown.filter(pl.col("part") == part)
        axis.scatter(rows[x[0]], rows[y[0]], s=8, alpha=0.6, color=colours[part], label=f"stage {part}")
    dropped = shown.filter(pl.col("part") == n_stages)
    axis.scatter(dropped[x[0]], dropped[y[0]], s=10, marker="x", color=DROPPED_COLOUR, label="dropped (hardest)")
    axis.set_xlabel(f"{LABELS.get(x[0], x[0])} ({'higher' if x[1] else 'lower'} = easier)")
    axis.set_ylabel(f"{LABELS.get(y[0], y[0])} ({'higher' if y[1] else 'lower'} = easier)")
    sampled = f", {shown.height} of {staged.height} rows shown" if shown.height < staged.height else ""
    axis.set_title(f"{x[0]} and {y[0]} by curriculum stage{sampled}")
    axis.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")  # the name may be a temp file's
    return path


def plot_stage_sizes(sizes: Sequence[int], dropped: int, invalid_rows: int, layout: str, path: Path) -> Path:
    """Bars of the rows per stage file, dropped rows and invalid rows."""
    labels = [f"stage {s}" for s in range(len(sizes))] + ["dropped", "invalid"]
    values = [*sizes, dropped, invalid_rows]
    colours = [*stage_colours(len(sizes)), DROPPED_COLOUR, INVALID_COLOUR]
    figure = new_figure(7, 4)
    axis = figure.subplots()
    bars = axis.bar(labels, values, color=colours)
    axis.bar_label(bars)
    axis.set_ylabel("rows")
    axis.set_title(f"Rows per stage ({layout} layout)")
    figure.tight_layout()
    figure.savefig(path, format="png")  # the name may be a temp file's
    return path


def stage_colours(count: int) -> list[Any]:
    """One viridis colour per stage, easiest darkest."""
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.1, 0.9, max(count, 1))]
