"""The LAVO paper's and CAB's table layouts, filled from whatever results exist.

A layout fixes the rows (every registered attention that supports the pattern) and columns
(the papers' tasks and metrics, lengths, r and w values); a cell without a result shows
:data:`analysis.tables.MISSING` instead of failing.
"""

from __future__ import annotations

import pandas as pd

from analysis.data import declared_metrics, primary_metric, setting_label, setting_order, task_patterns
from analysis.tables import MISSING, Table, arrow, compositional_index, number, representatives
from attention_zoo import Pattern, list_attentions

CAB_TASKS = ("tts_fastspeech2", "tts_transformer", "summarization", "time_series", "point_cloud", "lm")
"""CAB's tasks in its tables' column order (text-to-speech with FastSpeech 2 and Transformer-TTS,
summarization, long time-series forecasting, point-cloud completion, language modelling)."""

LAVO_EXTRAPOLATION_FACTORS = (1, 1.5, 2, 4, 8)
"""LAVO's extrapolation table: evaluation at 1 to 8 times the training context (1.5x and 2x are
CAB's multiples, 4x and 8x ours)."""


def cab_columns(pattern: Pattern) -> list[tuple[str, str]]:
    """``(task, metric)`` columns of CAB's leaderboard for ``pattern``."""
    columns = []
    for task in CAB_TASKS:
        patterns = task_patterns(task)  # the task's spec (None: a task not registered here)
        if patterns is not None and pattern in patterns:
            columns += [(task, m) for m in declared_metrics(task) or {}]
    return columns


def cab_tables(summary: pd.DataFrame) -> list[Table]:
    """CAB's four leaderboards: every registered attention supporting the pattern, the papers'
    task and metric columns, and the compositional index over the pattern's tasks at hand."""
    tables = []
    summary = representatives(summary)
    for pattern in Pattern:
        columns = cab_columns(pattern)
        tasks = sorted({t for t, _ in columns})
        means = summary.groupby(["label", "task", "metric"])["mean"].mean()
        index = compositional_index(summary, tasks).set_index("label")["index"]
        directions = {t: declared_metrics(t) or {} for t in tasks}
        rows = []
        for name in list_attentions(pattern):
            rows.append([name, *(number(means.get((name, t, m), float("nan"))) for t, m in columns),
                         number(index.get(name, float("nan")))])
        tables.append(Table(
            name=f"cab_{pattern.value}", title=f"CAB {pattern.value} leaderboard ({MISSING}: no result)",
            header=["attention", *(f"{t} {m}{arrow(directions[t].get(m))}" for t, m in columns), "CI"],
            rows=rows))
    return tables


def extrapolation_table(curves: pd.DataFrame) -> Table:
    """LAVO's length extrapolation table: LM perplexity per causal attention at each evaluated
    context (the records' lengths, else 1x..8x of the training context)."""
    lengths = sorted(curves["x"].unique()) if not curves.empty else []
    header = ["attention", *([f"{int(n)}" for n in lengths] if lengths
                             else [f"{f}L" for f in LAVO_EXTRAPOLATION_FACTORS])]
    means = (curves.groupby(["label", "x"])["perplexity"].mean() if not curves.empty
             else pd.Series(dtype=float))
    rows = [[name, *(number(means.get((name, n), float("nan"))) for n in lengths)] if lengths
            else [name, *([MISSING] * len(LAVO_EXTRAPOLATION_FACTORS))]
            for name in list_attentions(Pattern.CAUSAL_SELF)]
    return Table(name="lavo_extrapolation",
                 title=f"LM perplexity at each evaluation context length ({MISSING}: no result)",
                 header=header, rows=rows)


def efficiency_table(points: pd.DataFrame) -> Table:
    """LAVO's efficiency comparison (causal self attention): forward+backward time and peak
    memory of each attention at each measured length."""
    causal = points[(points["pattern"] == Pattern.CAUSAL_SELF.value) & (points["scope"] == "core")]
    lengths = sorted(causal["length"].unique())
    by = causal.set_index(["label", "length"])
    rows = []
    for name in list_attentions(Pattern.CAUSAL_SELF):
        cells = []
        for n in lengths:
            if (name, n) not in by.index:
                cells.append(MISSING)
                continue
            row = by.loc[(name, n)]
            cells.append(row["status"].upper() if row["status"] != "ok" else
                         f"{row['forward_backward_ms']:.3g} ms / {row['forward_backward_peak_mib']:.3g} MiB")
        rows.append([name, *cells] if lengths else [name, MISSING])
    return Table(name="lavo_efficiency",
                 title=f"causal self attention, forward+backward time / peak memory "
                       f"({MISSING}: not measured)",
                 header=["attention", *(f"L={n}" for n in lengths)] if lengths else ["attention", "L"],
                 rows=rows)


def ablation_table(runs: pd.DataFrame) -> Table:
    """LAVO's ablation over r and w: the first declared metric of each task with LAVO runs, per
    (r, w) pair present; combinations not run show as missing."""
    lavo = runs[(runs["attention"] == "lavo") & runs["metric"].notna() & runs["direction"].notna()]
    rows = []
    r_values: list[str] = []
    w_values: list[str] = []
    grid: dict[tuple[str, str, str], list[float]] = {}
    for task, frame in lavo.groupby("task"):
        metric = primary_metric(str(task), list(frame["metric"].unique()))
        chosen = frame[frame["metric"] == metric]
        for args, value in zip(chosen["args"], chosen["value"]):
            r, w = setting_label(args.get("r")), setting_label(args.get("w"))
            r_values += [r] if r not in r_values else []
            w_values += [w] if w not in w_values else []
            label = f"{task} {metric}{arrow(chosen['direction'].iloc[0])}"
            grid.setdefault((label, r, w), []).append(value)
    labels = sorted({label for label, _, _ in grid})
    w_values.sort(key=setting_order)
    r_values.sort(key=setting_order)
    for label in labels:
        for r in r_values:
            rows.append([label, r, *(number(sum(v) / len(v)) if (v := grid.get((label, r, w))) else MISSING
                                     for w in w_values)])
    return Table(name="lavo_ablation", title=f"LAVO: r (slots) x w (window) ({MISSING}: not run)",
                 header=["task metric", "r", *(f"w={w}" for w in w_values)],
                 rows=rows or [[MISSING, MISSING]])

