"""Benchmark reporting shared by every suite: seed statistics, markdown tables and Agg-rendered plots.

Nothing here knows about training or compression: callers pass plain numbers and labels. Plots are
drawn with matplotlib's object API on an Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MARKERS = "osD^vP*Xph<>"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values to average: run at least one seed")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'12.34 ± 0.56': mean and sample standard deviation of values (just '12.34' for one value)."""
    mean, std = mean_std(values)
    text = f"{mean:,.{digits}f}"
    return f"{text} ± {std:,.{digits}f}" if len(values) > 1 else text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; columns whose cells all start with a digit or sign are right-aligned."""

    def numeric(column: int) -> bool:
        return all(row[column][:1].isdigit() or row[column][:1] in "-+" for row in rows)

    align = ["---:" if rows and numeric(i) else "---" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines) + "\n"


@dataclass(frozen=True)
class Point:
    """One labelled marker of a scatter plot, with an optional vertical error bar."""

    label: str
    x: float
    y: float
    yerr: float = 0.0


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def scatter_plot(
    path: str | Path, points: Sequence[Point], xlabel: str, ylabel: str, title: str, logx: bool = False
) -> None:
    """One marker (and legend entry) per point, error bars where ``yerr`` > 0; written as PNG."""
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    for i, p in enumerate(points):
        ax.errorbar(
            p.x, p.y, yerr=p.yerr or None, fmt=_MARKERS[i % len(_MARKERS)], ms=8, capsize=3, label=p.label
        )
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, Path(path))


def curve_plot(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    ylim_quantile: float | None = 0.1,
) -> None:
    """One line per label (x, y); the y range is clipped to hide the first steps' large values.

    ``ylim_quantile``: the top of the y axis sits at the value the curves pass after this fraction
    of their length (None: automatic).
    """
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, lw=1.2)
    shown = [ys for _, ys in curves.values() if len(ys)]
    if ylim_quantile is not None and shown:
        top = max(ys[min(len(ys) - 1, math.floor(len(ys) * ylim_quantile))] for ys in shown)
        low = min(min(ys) for ys in shown)
        margin = 0.05 * (top - low) or 0.05
        ax.set_ylim(low - margin, top + margin)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, Path(path))
