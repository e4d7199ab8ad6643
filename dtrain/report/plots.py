"""PNG plots for a task's table, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Every configuration (table row) has one colour; its seeds are drawn as separate lines in that colour.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import metrics
from .table import Row, TaskTable, mean_time_to_target
from .timemodel import LinkRate, parse_link_rate

_COLORS = [f"C{i}" for i in range(10)]
_LINESTYLES = ["-", "--", ":", "-."]  # after ten configurations the colours repeat with another line style
# The time-to-target curve spans this factor below the slowest and above the fastest requested rate.
_RATE_MARGIN = 10.0


@dataclass(frozen=True)
class Plot:
    title: str
    path: Path


def make_plots(table: TaskTable, rates: list[LinkRate], out: Path) -> list[Plot]:
    """All plots the task has data for, written to `out`."""
    plots = [
        _accuracy_vs_bytes(table, out),
        _loss_vs_step(table, out),
        _time_to_target(table, rates, out),
        _fpsa_iterations(table, out),
        _fpsa_token_iterations(table, out),
    ]
    return [plot for plot in plots if plot is not None]


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path, title: str) -> Plot:
    fig.savefig(path, dpi=110)
    return Plot(title, path)


def _style(i: int) -> dict[str, str]:
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": _LINESTYLES[i // len(_COLORS) % len(_LINESTYLES)]}


def _legend(ax: Axes) -> None:
    """Beside the axes, so that many configurations do not cover the lines."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _accuracy_vs_bytes(table: TaskTable, out: Path) -> Plot:
    fig, ax = _figure()
    for i, row in enumerate(table.rows):
        for j, run in enumerate(row.runs):
            # the log axis cannot show the evaluation before the first exchange (0 bytes)
            points = [
                (r[metrics.COMM_BYTES_CUM], r[metrics.VAL_ACC]) for r in run.eval_rows if r[metrics.COMM_BYTES_CUM] > 0
            ]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", markersize=3, **_style(i), label=row.label if j == 0 else None)
    ax.axhline(table.target_acc, color="grey", linestyle=":", label=f"target {table.target_acc:.3f}")
    ax.set_xscale("log")
    ax.set(
        xlabel="cumulative payload bytes sent per rank",
        ylabel="validation accuracy",
        title=f"{table.task}: accuracy vs bytes communicated",
    )
    _legend(ax)
    return _save(fig, out / f"{table.task}_accuracy_vs_bytes.png", "Accuracy vs cumulative bytes")


def _loss_vs_step(table: TaskTable, out: Path) -> Plot:
    fig, ax = _figure()
    for i, row in enumerate(table.rows):
        for j, run in enumerate(row.runs):
            steps = [r[metrics.STEP] for r in run.train_rows]
            losses = [r[metrics.TRAIN_LOSS] for r in run.train_rows]
            ax.plot(steps, losses, linewidth=1, **_style(i), label=row.label if j == 0 else None)
    ax.set(xlabel="step", ylabel="training loss", title=f"{table.task}: training loss")
    _legend(ax)
    return _save(fig, out / f"{table.task}_loss_vs_step.png", "Training loss vs step")


def _time_to_target(table: TaskTable, rates: list[LinkRate], out: Path) -> Plot | None:
    reached = [(i, row) for i, row in enumerate(table.rows) if row.steps_to_target is not None]
    if not reached:
        return None
    lowest = min(rate.bits_per_s for rate in rates) / _RATE_MARGIN
    highest = max(rate.bits_per_s for rate in rates) * _RATE_MARGIN
    curve = [LinkRate("", bits) for bits in np.geomspace(lowest, highest, 60)]
    fig, ax = _figure()
    for i, row in reached:
        if row.link_rate is None:
            ax.plot(
                [r.bits_per_s for r in curve],
                [mean_time_to_target(row.runs, table.target_acc, r) for r in curve],
                **_style(i),
                label=row.label,
            )
        else:  # measured on a shaped link: its own time, to hold against the curves at that rate
            ax.plot(
                [parse_link_rate(row.link_rate).bits_per_s],
                [row.measured_time_to_target_s],
                marker="*",
                markersize=12,
                linestyle="none",
                color=_style(i)["color"],
                label=f"{row.label} (measured)",
            )
    for rate in rates:
        ax.axvline(rate.bits_per_s, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            rate.label,
            (rate.bits_per_s, 0.02),
            xycoords=("data", "axes fraction"),
            fontsize="small",
            ha="right",
            va="bottom",
            rotation=90,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(
        xlabel="link rate (bit/s)",
        ylabel=f"seconds to val acc {table.target_acc:.3f}",
        title=f"{table.task}: time to target vs link rate (lines: time model, stars: measured)",
    )
    _legend(ax)
    return _save(fig, out / f"{table.task}_time_to_target.png", "Time to target vs link rate")


def _as_number(difficulty: str) -> float | str:
    """Numeric difficulties (depth, length) become numbers so that they sort and space by value."""
    try:
        return float(difficulty)
    except ValueError:
        return difficulty


def _mean_by_difficulty(row: Row, key: str) -> dict[float | str, float]:
    """{difficulty: mean over the row's seeds} of the summary dict `key` ({} when no run has it), sorted."""
    by_difficulty: dict[float | str, list[float]] = {}
    for run in row.runs:
        for difficulty, iters in run.summary.get(key, {}).items():
            by_difficulty.setdefault(_as_number(str(difficulty)), []).append(float(iters))
    ordered = sorted(by_difficulty, key=lambda d: (isinstance(d, str), d))
    return {d: statistics.fmean(by_difficulty[d]) for d in ordered}


def token_iterations_by_difficulty(row: Row) -> dict[float | str, float]:
    """{token difficulty: FPSA iterations per token}, mean over the row's seeds (fpsa/iters_by_token_difficulty
    of each run's final evaluation); {} for runs without it."""
    return _mean_by_difficulty(row, metrics.TOKEN_ITERS_BY_DIFFICULTY)


def _fpsa_iterations(table: TaskTable, out: Path) -> Plot | None:
    fig, ax = _figure()
    drawn = False
    for i, row in enumerate(table.rows):
        by_difficulty = _mean_by_difficulty(row, metrics.EXAMPLE_ITERS_BY_DIFFICULTY)
        if by_difficulty:
            ax.plot(list(by_difficulty), list(by_difficulty.values()), marker="o", **_style(i), label=row.label)
            drawn = True
    if not drawn:
        return None
    ax.set(
        xlabel="example difficulty",
        ylabel="mean FPSA iterations per example (mean over seeds)",
        title=f"{table.task}: fixed-point iterations per example vs example difficulty",
    )
    _legend(ax)
    return _save(fig, out / f"{table.task}_fpsa_iterations.png", "FPSA iterations per example vs task difficulty")


# what Task.token_difficulty counts, for the axis label
_TOKEN_DIFFICULTY = {
    "s5": "non-identity tokens up to and including the token",
    "a5": "non-identity tokens up to and including the token",
    "parity": "ones up to and including the token",
    "listops": "nesting depth of the token",
}


def _fpsa_token_iterations(table: TaskTable, out: Path) -> Plot | None:
    """Iterations per token against the token's own difficulty: every sequence of the held-out split has the
    same length, so this separates adaptivity from length (the per-example plot mixes them)."""
    fig, ax = _figure()
    drawn = False
    for i, row in enumerate(table.rows):
        by_difficulty = token_iterations_by_difficulty(row)
        if by_difficulty:
            slopes = [float(r.summary.get(metrics.FINAL_TOKEN_ITERS_SLOPE, math.nan)) for r in row.runs]
            slopes = [s for s in slopes if math.isfinite(s)]
            label = row.label + (f" (slope {statistics.fmean(slopes):+.3f})" if slopes else "")
            ax.plot(list(by_difficulty), list(by_difficulty.values()), marker="o", **_style(i), label=label)
            drawn = True
    if not drawn:
        return None
    ax.set(
        xlabel="per-token difficulty: " + _TOKEN_DIFFICULTY.get(table.task, "the task's token_difficulty"),
        ylabel="FPSA iterations per token\n(mean over tokens, layers and seeds)",
        title=f"{table.task}: iterations per token vs per-token difficulty, at a fixed sequence length",
    )
    _legend(ax)
    return _save(
        fig,
        out / f"{table.task}_fpsa_token_iterations.png",
        "FPSA iterations per token vs per-token difficulty (fixed sequence length)",
    )
