"""Comparison tables: per task (mean, spread over seeds, number of runs), CAB's four pattern
leaderboards, and CAB's compositional index, each rendered to Markdown and LaTeX.

The numbers live in pandas frames (:func:`metric_summary`, :func:`compositional_index`,
:func:`leaderboard`); :class:`Table` is only their text form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.data import declared_metrics, task_patterns
from attention_zoo import Pattern

MISSING = "n/a"
"""What a table shows where no result exists."""


@dataclass
class Table:
    """A titled table of strings; ``name`` is its file stem in the report."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        lines += ["", *(f"{note}" for note in self.notes)] if self.notes else []
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        spec = "l" + "r" * (len(self.header) - 1)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(self.title)}}}",
                 f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(latex_escape(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(latex_escape(cell) for cell in row) + " \\\\" for row in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and typeset the arrows and ±)."""
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                    "^": r"\textasciicircum{}", "±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$"}
    return "".join(replacements.get(c, c) for c in text)


def number(value: float) -> str:
    """Four significant digits; :data:`MISSING` for NaN."""
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def arrow(direction: str | None) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(direction or "", "")


def metric_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (task, settings, label, metric): ``mean``, ``std`` (sample standard deviation over
    seeds, NaN for a single run), ``n`` (ok runs with the metric), ``runs`` (every record of the
    group, failed ones included) and the metric's ``direction``."""
    columns = ["task", "settings", "label", "metric", "direction", "mean", "std", "n", "runs"]
    if metrics.empty:
        return pd.DataFrame(columns=columns)
    runs = metrics.groupby(["task", "settings", "label"])["key"].nunique().rename("runs")
    ok = metrics.dropna(subset=["metric"])
    if ok.empty:
        return pd.DataFrame(columns=columns)
    summary = (ok.groupby(["task", "settings", "label", "metric"])
               .agg(direction=("direction", "first"), mean=("value", "mean"),
                    std=("value", "std"), n=("value", "count"))
               .reset_index())
    summary = summary.join(runs, on=["task", "settings", "label"])
    return summary[columns].sort_values(["task", "settings", "label", "metric"]).reset_index(drop=True)


def task_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """CAB's per-task score of each attention: for every (task, settings, metric) with a
    direction, the z-score of each attention's mean across the attentions that have it
    (population standard deviation; 0 where all are equal), negated where lower is better; then
    the average over the task's metrics and settings. Columns ``task, label, score``."""
    directed = summary.dropna(subset=["direction"]).copy()
    if directed.empty:
        return pd.DataFrame(columns=["task", "label", "score"])
    grouped = directed.groupby(["task", "settings", "metric"])["mean"]
    spread = grouped.transform(lambda v: v.std(ddof=0))
    centred = directed["mean"] - grouped.transform("mean")
    z = (centred / spread).where(spread > 0, 0.0)
    directed["z"] = z.where(directed["direction"] == "higher", -z)
    return directed.groupby(["task", "label"])["z"].mean().rename("score").reset_index()


def compositional_index(summary: pd.DataFrame, tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """CAB's compositional index per attention: its task scores (:func:`task_scores`) averaged
    over the tasks (``tasks``, or all) in which it has results. Columns ``label, index, tasks``
    (how many tasks entered), best first."""
    scores = task_scores(summary)
    if tasks is not None:
        scores = scores[scores["task"].isin(list(tasks))]
    if scores.empty:
        return pd.DataFrame(columns=["label", "index", "tasks"])
    index = scores.groupby("label")["score"].agg(index="mean", tasks="count").reset_index()
    return index.sort_values(["index", "label"], ascending=[False, True]).reset_index(drop=True)


def representatives(summary: pd.DataFrame) -> pd.DataFrame:
    """One configuration per mechanism in each (task, settings), relabelled by the mechanism's
    name, for the leaderboards and the index (so that a sweep over LAVO's r and w does not enter
    them as separate attentions): the configuration with the most ok runs, then the defaults,
    then the first label in sorted order."""
    if summary.empty:
        return summary
    frame = summary.assign(attention=summary["label"].str.split("(", n=1).str[0])
    runs = frame.groupby(["task", "settings", "attention", "label"])["n"].max().reset_index()
    runs["default"] = runs["label"] == runs["attention"]
    chosen = (runs.sort_values(["n", "default", "label"], ascending=[False, False, True])
              .drop_duplicates(["task", "settings", "attention"])[["task", "settings", "label"]])
    kept = frame.merge(chosen, on=["task", "settings", "label"])
    return kept.assign(label=kept["attention"]).drop(columns="attention")


def pattern_tasks(tasks: Sequence[str]) -> dict[Pattern, list[str]]:
    """For each pattern, the installed tasks among ``tasks`` whose roles exercise it."""
    return {pattern: [t for t in sorted(tasks) if pattern in (task_patterns(t) or ())] for pattern in Pattern}


def _mean_spread(row: pd.Series) -> str:
    if math.isnan(row["std"]):
        return number(row["mean"])
    return f"{row['mean']:.4g} ± {row['std']:.2g}"


def run_counts(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (task, settings, label): ``ok`` and ``runs`` (records, failed ones included) and
    ``failed`` (the statuses of the failed ones, e.g. ``timeout, error``)."""
    columns = ["task", "settings", "label", "ok", "runs", "failed"]
    if metrics.empty:
        return pd.DataFrame(columns=columns)
    records = metrics.drop_duplicates("key")
    rows = []
    for (task, settings, label), group in records.groupby(["task", "settings", "label"], sort=True):
        failed = sorted(set(group.loc[group["status"] != "ok", "status"].astype(str)))
        rows.append([task, settings, label, int((group["status"] == "ok").sum()), len(group),
                     ", ".join(failed)])
    return pd.DataFrame(rows, columns=columns)


def task_tables(summary: pd.DataFrame, counts: pd.DataFrame | None = None) -> list[Table]:
    """One table per task: attentions x metrics, ``mean ± std (n)`` and the runs per row. With
    ``counts`` (:func:`run_counts`), every configuration that ran appears, failed ones too:
    ``ok/runs`` with the failures' statuses, ``n/a`` where no run gave the metric."""
    if counts is None:
        counts = summary.groupby(["task", "settings", "label"]).agg(
            ok=("n", "max"), runs=("runs", "first")).reset_index().assign(failed="")
    tables = []
    for task, frame in counts.groupby("task", sort=True):
        results = summary[summary["task"] == task]
        declared = list(declared_metrics(str(task)) or [])
        metrics = sorted(results["metric"].unique(),
                         key=lambda m: (m not in declared, declared.index(m) if m in declared else 0, m))
        directions = results.groupby("metric")["direction"].first()
        with_settings = (frame["settings"] != "").any()
        header = ["attention", *(["settings"] if with_settings else []), "ok/runs",
                  *(f"{m}{arrow(directions[m])}" for m in metrics)]
        rows = []
        for row in frame.sort_values(["settings", "label"]).itertuples():
            by_metric = results[(results["settings"] == row.settings)
                                & (results["label"] == row.label)].set_index("metric")
            cells = [f"{_mean_spread(by_metric.loc[m])} ({int(by_metric.loc[m, 'n'])})"
                     if m in by_metric.index else MISSING for m in metrics]
            runs = f"{int(row.ok)}/{int(row.runs)}" + (f" ({row.failed})" if row.failed else "")
            rows.append([row.label, *([row.settings or "defaults"] if with_settings else []), runs, *cells])
        tables.append(Table(name=f"task_{task}", title=f"{task}: mean ± std over seeds (ok runs)",
                            header=header, rows=rows))
    return tables


def leaderboard(summary: pd.DataFrame, pattern: Pattern) -> pd.DataFrame:
    """CAB's leaderboard of one pattern: rows attentions, columns ``(task, metric)`` means (over
    settings too) of the tasks exercising the pattern, and the compositional ``index`` over those
    tasks. Empty when no task at hand exercises the pattern."""
    summary = representatives(summary)
    tasks = pattern_tasks(summary["task"].unique()).get(pattern, [])
    frame = summary[summary["task"].isin(tasks)]
    if frame.empty:
        return pd.DataFrame()
    table = frame.pivot_table(index="label", columns=["task", "metric"], values="mean", aggfunc="mean")
    index = compositional_index(summary, tasks).set_index("label")["index"]
    table[("CI", "")] = index
    return table.sort_values(("CI", ""), ascending=False)


def leaderboard_tables(summary: pd.DataFrame) -> list[Table]:
    """The four pattern leaderboards that have results (CAB's layout)."""
    tables = []
    directions = summary.groupby(["task", "metric"])["direction"].first().to_dict()
    for pattern in Pattern:
        board = leaderboard(summary, pattern)
        if board.empty:
            continue
        header = ["attention", *(f"{t} {m}{arrow(directions.get((t, m)))}" if t != "CI" else "CI"
                                 for t, m in board.columns)]
        rows = [[label, *(number(v) for v in values)] for label, values in zip(board.index, board.values)]
        tables.append(Table(name=f"leaderboard_{pattern.value}", title=f"{pattern.value} leaderboard",
                            header=header, rows=rows))
    return tables


def index_table(summary: pd.DataFrame) -> Table:
    """The compositional index over every task at hand, with each task's score."""
    summary = representatives(summary)
    scores = task_scores(summary)
    index = compositional_index(summary)
    tasks = sorted(scores["task"].unique())
    by = scores.set_index(["label", "task"])["score"]
    rows = [[row.label, f"{row.index:.3f}", str(int(row.tasks)),
             *(f"{by[(row.label, t)]:.3f}" if (row.label, t) in by.index else MISSING for t in tasks)]
            for row in index.itertuples()]
    return Table(name="compositional_index", title="CAB compositional index (all tasks)",
                 header=["attention", "CI", "tasks", *tasks], rows=rows,
                 notes=["Each mechanism at one configuration per task (the one with the most runs). "
                        "Per metric: z-score of each attention's mean across the attentions at hand, "
                        "negated where lower is better; averaged within a task (its metrics and "
                        "settings), then across the tasks in which the attention has results."])

