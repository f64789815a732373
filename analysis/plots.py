"""Figures (matplotlib, no pyplot state): one style and one colour per attention everywhere.

Every function takes pandas frames from :mod:`analysis.data` and writes ``<stem>.png`` and
``<stem>.pdf`` into a folder, returning the PNG's path (None when there is nothing to plot).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from analysis.data import setting_label, setting_order
from attention_zoo import list_attentions
from runners.efficiency import scaling_exponent

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
}

PALETTE = [mpl.colors.to_hex(c) for c in mpl.colormaps["tab20"].colors[::2]
           + mpl.colormaps["tab20"].colors[1::2]]


def attention_colour(name: str) -> str:
    """The colour of mechanism ``name`` (a label's hyperparameters are ignored): its position in
    the registry's sorted list picks a palette entry, so it is the same in every figure and every
    report; names outside the registry (flash-linear-attention kernels) hash into the palette."""
    mechanism = name.split("(", 1)[0].split(" ", 1)[0]
    names = list_attentions()
    if mechanism in names:
        return PALETTE[names.index(mechanism) % len(PALETTE)]
    digest = int(hashlib.sha256(mechanism.encode()).hexdigest(), 16)
    return PALETTE[digest % len(PALETTE)]


def new_figure(width: float = 6.4, height: float = 3.6) -> Figure:
    with mpl.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def save(figure: Figure, folder: Path, stem: str) -> Path:
    """Write ``stem.png`` and ``stem.pdf``; returns the PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(STYLE):
        figure.savefig(folder / f"{stem}.png")
        figure.savefig(folder / f"{stem}.pdf")
    return folder / f"{stem}.png"


P = ParamSpec("P")
R = TypeVar("R")


def _styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Run a plotting function under :data:`STYLE` (artists read rcParams when created)."""
    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with mpl.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def _plain_ticks(ax: Axes) -> None:
    """Tick labels as plain numbers (256, 0.5) on log axes, rather than powers."""
    plain = mpl.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_major_formatter(plain)
        low, high = sorted(limits)
        # A log axis spanning less than a decade may hold no major tick: label the minor ones.
        narrow = axis.get_scale() == "log" and low > 0 and high / low < 10
        axis.set_minor_formatter(plain if narrow else mpl.ticker.NullFormatter())


def _slope_label(label: str, x: Sequence[float], y: Sequence[float]) -> str:
    slope = scaling_exponent(list(x), list(y))
    return f"{label} (slope {slope:.2f})" if slope is not None else label


@_styled
def efficiency_plot(points: pd.DataFrame, folder: Path, stem: str, title: str) -> Path | None:
    """Forward+backward time and peak memory versus sequence length, log-log, one line per
    attention with the fitted slope of ``y ~ n^k`` in the legend; out-of-memory cells are marked
    with an ``x`` at the top of the panel, at their length."""
    if points.empty:
        return None
    figure = new_figure(10.0, 5.2)
    axes = figure.subplots(1, 2)
    panels = (("forward_backward_ms", "forward + backward time (ms)"),
              ("forward_backward_peak_mib", "forward + backward peak memory (MiB)"))
    for ax, (column, ylabel) in zip(axes, panels):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for label, line in points.groupby("label", sort=True):
            colour = attention_colour(label)
            ok = line[(line["status"] == "ok") & (line[column] > 0)].sort_values("length")
            if not ok.empty:
                ax.plot(ok["length"], ok[column], marker="o", color=colour,
                        label=_slope_label(label, ok["length"], ok[column]))
            oom = line[line["status"] == "oom"]
            if not oom.empty:
                ax.scatter(oom["length"], [0.97] * len(oom), marker="x", s=40, color=colour,
                           transform=top, clip_on=False,
                           label=None if not ok.empty else f"{label} (out of memory)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    if (points["status"] == "oom").any():
        figure.text(0.99, 0.01, "x: out of memory", ha="right", fontsize=7)
    figure.suptitle(title)
    return save(figure, folder, stem)


def _with_r_and_w(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with string columns ``r`` and ``w`` from its ``args`` (every hyperparameter)."""
    return frame.assign(r=[setting_label(a.get("r")) for a in frame["args"]],
                        w=[setting_label(a.get("w")) for a in frame["args"]])


@_styled
def sensitivity_plot(runs: pd.DataFrame, costs: pd.DataFrame, metric: str, direction: str | None,
                     folder: Path, stem: str, title: str) -> Path | None:
    """LAVO's r and w: the metric versus r (one line per w) and versus w (one line per r),
    training time versus r, and a heat map of the metric over both. ``runs`` holds one task's
    LAVO rows of :func:`analysis.data.run_metrics` for ``metric``; needs two or more (r, w)."""
    frame = _with_r_and_w(runs).dropna(subset=["value"])
    grid = frame.groupby(["r", "w"])["value"].mean().reset_index()
    if len(grid) < 2:
        return None
    cost = _with_r_and_w(costs).groupby(["r", "w"])["train_seconds"].mean().reset_index()
    r_values = sorted(grid["r"].unique(), key=setting_order)
    w_values = sorted(grid["w"].unique(), key=setting_order)
    position = {r: i for i, r in enumerate(r_values)}
    w_position = {w: i for i, w in enumerate(w_values)}
    figure = new_figure(10.0, 3.2)
    axes = figure.subplots(1, 4)
    better = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(direction or "", "")
    ylabel = f"{metric}{better}"
    shades = mpl.colormaps["viridis"](np.linspace(0.1, 0.85, max(len(w_values), len(r_values))))
    for i, w in enumerate(w_values):
        line = grid[grid["w"] == w].sort_values("r", key=lambda s: s.map(position))
        axes[0].plot(line["r"].map(position), line["value"], marker="o", color=shades[i], label=f"w={w}")
        spent = cost[cost["w"] == w].sort_values("r", key=lambda s: s.map(position))
        axes[2].plot(spent["r"].map(position), spent["train_seconds"], marker="o", color=shades[i],
                     label=f"w={w}")
    for i, r in enumerate(r_values):
        line = grid[grid["r"] == r].sort_values("w", key=lambda s: s.map(w_position))
        axes[1].plot(line["w"].map(w_position), line["value"], marker="o", color=shades[i], label=f"r={r}")
    for ax in (axes[0], axes[2]):
        ax.set_xticks(range(len(r_values)), [str(r) for r in r_values])
        ax.set_xlabel("r (orthogonal memory slots)")
        ax.legend()
    axes[0].set_ylabel(ylabel)
    axes[1].set_xticks(range(len(w_values)), w_values)
    axes[1].set_xlabel("w (local window)")
    axes[1].set_ylabel(ylabel)
    axes[1].legend()
    axes[2].set_ylabel("training time (s)")
    heat = grid.pivot(index="r", columns="w", values="value").reindex(index=r_values, columns=w_values)
    image = axes[3].imshow(heat.to_numpy(dtype=float), aspect="auto", origin="lower",
                           cmap="viridis" if direction != "lower" else "viridis_r")
    axes[3].set_xticks(range(len(w_values)), [str(w) for w in w_values])
    axes[3].set_yticks(range(len(r_values)), [str(r) for r in r_values])
    axes[3].set_xlabel("w")
    axes[3].set_ylabel("r")
    axes[3].grid(False)
    for (i, j), value in np.ndenumerate(heat.to_numpy(dtype=float)):
        if not math.isnan(value):
            axes[3].text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, ax=axes[3], label=metric)
    figure.suptitle(title)
    return save(figure, folder, stem)


@_styled
def curve_plot(curves: pd.DataFrame, folder: Path, stem: str, title: str, xlabel: str,
               log_x: bool = True) -> Path | None:
    """Perplexity curves (mean over seeds), one line per attention: length extrapolation or
    perplexity versus position. ``curves`` comes from :func:`analysis.data.extra_curves`."""
    if curves.empty:
        return None
    figure = new_figure(6.4, 3.8)
    ax = figure.subplots()
    for label, line in curves.groupby("label", sort=True):
        mean = line.groupby("x")["perplexity"].mean()
        ax.plot(mean.index, mean.values, marker="o", color=attention_colour(label), label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.legend()
    figure.suptitle(title)
    return save(figure, folder, stem)


def pareto_front(points: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """The points no other point beats on both cost (lower) and quality, sorted by cost."""
    ordered = points.sort_values(["cost", "quality"], ascending=[True, not higher_is_better])
    front, best = [], -math.inf
    for row in ordered.itertuples():
        score = row.quality if higher_is_better else -row.quality
        if score > best:
            front.append(row.Index)
            best = score
    return points.loc[front]


@_styled
def pareto_plot(points: pd.DataFrame, metric: str, higher_is_better: bool, cost_name: str,
                folder: Path, stem: str, title: str) -> Path | None:
    """Quality (``metric``) versus cost, one point per attention, the Pareto front drawn.
    ``points`` has columns ``label, quality, cost``."""
    points = points.dropna(subset=["quality", "cost"])
    if points.empty:
        return None
    figure = new_figure(6.0, 4.0)
    ax = figure.subplots()
    for row in points.itertuples():
        ax.scatter(row.cost, row.quality, color=attention_colour(row.label), s=36, zorder=3)
        ax.annotate(row.label, (row.cost, row.quality), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    front = pareto_front(points, higher_is_better)
    ax.step(front["cost"], front["quality"], where="post", color="0.4", linestyle="--", linewidth=1,
            label="Pareto front")
    ax.set_xscale("log")
    _plain_ticks(ax)
    ax.set_xlabel(cost_name)
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.legend()
    figure.suptitle(title)
    return save(figure, folder, stem)


@_styled
def setting_plot(curves: dict[str, list[tuple[float, float, float]]], folder: Path, stem: str,
                 title: str, xlabel: str, ylabel: str) -> Path | None:
    """A metric against a setting (width, length), one line per attention: mean over seeds with
    the standard deviation as error bars. ``curves``: label -> [(x, mean, std)]."""
    drawn = {label: points for label, points in curves.items() if points}
    if not drawn:
        return None
    figure = new_figure(6.4, 4.2)
    ax = figure.subplots()
    for label, points in sorted(drawn.items()):
        x, mean, std = zip(*points)
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=2, color=attention_colour(label),
                    label=label)
    ax.set_xscale("log", base=2)
    _plain_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(ncols=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title)
    return save(figure, folder, stem)
