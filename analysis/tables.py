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

from analysis.data import task_patterns
from attention_zoo import Pattern

MISSING = "n/a"
"""What a table shows where no result exists."""


@dataclass
class Table:
    """A titled table of strings; ``name`` is its file stem in the report.

    ``values`` (optional, the shape of ``rows``) holds the number behind each cell, for sorting;
    ``best`` the (row, column) cells holding the best value of their column (bold in Markdown,
    highlighted on the HTML page).
    """

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    values: list[list[float | None]] | None = None
    best: set[tuple[int, int]] = field(default_factory=set)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(self._marked(i, j, cell.replace("|", "\\|"))
                                    for j, cell in enumerate(row)) + " |" for i, row in enumerate(self.rows)]
        lines += ["", *(f"{note}" for note in self.notes)] if self.notes else []
        return "\n".join(lines) + "\n"

    def _marked(self, row: int, column: int, text: str) -> str:
        return f"**{text}**" if (row, column) in self.best else text

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
    """Four significant digits (whole numbers from 10,000, with separators); :data:`MISSING` for
    NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value + 0.0:.4g}"  # + 0.0: no "-0" for a negative zero


def arrow(direction: str | None) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(direction or "", "")


def best_cells(values: list[list[float | None]], directions: dict[int, str | None]) -> set[tuple[int, int]]:
    """The (row, column) cells holding the best value of each column with a direction (``higher``
    or ``lower``); ties are all marked, a column with a single value is not."""
    best = set()
    for column, direction in directions.items():
        if direction not in ("higher", "lower"):
            continue
        cells = [(row, v[column]) for row, v in enumerate(values)
                 if v[column] is not None and not math.isnan(v[column])]
        if len(cells) < 2:
            continue
        target = (max if direction == "higher" else min)(value for _, value in cells)
        best |= {(row, column) for row, value in cells if value == target}
    return best


def metric_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (task, settings, label, metric): ``mean``, ``std`` (sample standard deviation over
    seeds, NaN for a single run), ``n`` (ok runs with the metric), ``runs`` (every record of the
    group, failed ones included), the metric's ``direction``, ``kind`` and declared ``order``."""
    columns = ["task", "settings", "label", "metric", "direction", "kind", "order",
               "mean", "std", "n", "runs"]
    if metrics.empty:
        return pd.DataFrame(columns=columns)
    runs = metrics.groupby(["task", "settings", "label"])["key"].nunique().rename("runs")
    ok = metrics.dropna(subset=["metric"])
    if ok.empty:
        return pd.DataFrame(columns=columns)
    summary = (ok.groupby(["task", "settings", "label", "metric"])
               .agg(direction=("direction", "first"), kind=("kind", "first"), order=("order", "min"),
                    mean=("value", "mean"), std=("value", "std"), n=("value", "count"))
               .reset_index())
    summary = summary.join(runs, on=["task", "settings", "label"])
    return summary[columns].sort_values(["task", "settings", "label", "metric"]).reset_index(drop=True)


def task_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """CAB's per-task score of each attention: for every (task, settings, quality metric),
    the z-score of each attention's mean across the attentions that have it (population standard
    deviation; 0 where all are equal), negated where lower is better; then the average over the
    task's quality metrics and settings. Columns ``task, label, score``."""
    directed = summary[summary["kind"] == "quality"].dropna(subset=["direction"]).copy()
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
    spread = number(row["std"]) if abs(row["std"]) >= 1e4 else f"{row['std']:.2g}"
    return f"{number(row['mean'])} ± {spread}"


def _cell(by_metric: pd.DataFrame, metric: str) -> tuple[str, float | None]:
    """``mean ± std (n)`` and the mean, or :data:`MISSING` and None."""
    if metric not in by_metric.index:
        return MISSING, None
    row = by_metric.loc[metric]
    return f"{_mean_spread(row)} ({int(row['n'])})", float(row["mean"])


def primary_metrics(summary: pd.DataFrame) -> dict[str, str]:
    """Each task's primary metric: its first declared quality metric (by ``order``, then name)."""
    quality = summary[summary["kind"] == "quality"].sort_values(["order", "metric"])
    return quality.drop_duplicates("task").set_index("task")["metric"].to_dict()


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


def _counts_from(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`run_counts` as far as a summary tells it (ok runs only: no failed configuration)."""
    return summary.groupby(["task", "settings", "label"]).agg(
        ok=("n", "max"), runs=("runs", "first")).reset_index().assign(failed="")


def _metric_table(name: str, title: str, frame: pd.DataFrame, metrics: list[str],
                  counts: pd.DataFrame) -> Table:
    """One row per configuration in ``counts`` (failed ones too) x ``metrics`` of ``frame``:
    ``mean ± std (n)`` with ok/runs (and the failures' statuses), the best per column marked."""
    directions = frame.groupby("metric")["direction"].first()
    kinds = frame.groupby("metric")["kind"].first()
    with_settings = (counts["settings"] != "").any()
    offset = 3 if with_settings else 2
    header = ["attention", *(["settings"] if with_settings else []), "ok/runs",
              *(f"{m}{arrow(directions[m] if kinds[m] != 'diagnostic' else None)}" for m in metrics)]
    rows, values = [], []
    for row in counts.sort_values(["settings", "label"]).itertuples():
        mine = (frame["settings"] == row.settings) & (frame["label"] == row.label)
        by_metric = frame[mine].set_index("metric")
        cells = [_cell(by_metric, m) for m in metrics]
        runs = f"{int(row.ok)}/{int(row.runs)}" + (f" ({row.failed})" if row.failed else "")
        rows.append([row.label, *([row.settings or "defaults"] if with_settings else []), runs,
                     *(text for text, _ in cells)])
        values.append([None] * (offset - 1) + [row.ok / row.runs, *(value for _, value in cells)])
    marked = {offset + i: directions[m] for i, m in enumerate(metrics) if kinds[m] != "diagnostic"}
    return Table(name=name, title=title, header=header, rows=rows, values=values,
                 best=best_cells(values, marked))


def task_tables(summary: pd.DataFrame, counts: pd.DataFrame | None = None) -> list[Table]:
    """One table per task: attentions x its quality metrics and diagnostics, ``mean ± std (n)``
    and ok/runs, the best mean per metric marked; then, where the task measured more (undeclared
    extras), a second table of those. With ``counts`` (:func:`run_counts`), every configuration
    that ran appears, failed ones too, ``n/a`` where no run gave the metric."""
    counts = _counts_from(summary) if counts is None else counts
    tables = []
    for task, task_counts in counts.groupby("task", sort=True):
        frame = summary[summary["task"] == task]
        ordered = frame.sort_values(["order", "metric"])["metric"].drop_duplicates().tolist()
        kinds = frame.groupby("metric")["kind"].first()
        shown = [m for m in ordered if kinds[m] in ("quality", "diagnostic")]
        extras = [m for m in ordered if kinds[m] == "extra"]
        tables.append(_metric_table(f"task_{task}", f"{task}: mean ± std over seeds (ok runs)",
                                    frame, shown, task_counts))
        if extras:
            tables.append(_metric_table(f"task_{task}_extra", f"{task}: further measurements",
                                        frame, extras, task_counts))
    return tables


def cost_tables(summary: pd.DataFrame, costs: pd.DataFrame,
                counts: pd.DataFrame | None = None) -> list[Table]:
    """One table per task: training and total time, peak memory, parameters and the task's cost
    metrics (throughput), ``mean ± std (n)`` over the ok runs, the best (least time and memory,
    most throughput) marked."""
    measured = {"train_seconds": ("train s", "lower"), "total_seconds": ("total s", "lower"),
                "peak_mib": ("peak MiB", "lower"), "parameters": ("parameters", None)}
    long = costs.melt(id_vars=["task", "settings", "label"], value_vars=list(measured),
                      var_name="metric", value_name="value").dropna(subset=["value"])
    frame = (long.groupby(["task", "settings", "label", "metric"])["value"]
             .agg(mean="mean", std="std", n="count").reset_index())
    frame["direction"] = frame["metric"].map(lambda m: measured[m][1])
    # Time, memory and parameters first, then the task's own cost metrics in declared order.
    frame["kind"], frame["order"] = "cost", frame["metric"].map(list(measured).index) - len(measured)
    throughput = summary[summary["kind"] == "cost"]
    frame = pd.concat([frame, throughput[frame.columns.intersection(throughput.columns)]], ignore_index=True)
    frame["metric"] = frame["metric"].map(lambda m: measured[m][0] if m in measured else m)
    counts = _counts_from(summary) if counts is None else counts
    tables = []
    for task, group in frame.groupby("task", sort=True):
        metrics = group.sort_values(["order", "metric"])["metric"].drop_duplicates().tolist()
        tables.append(_metric_table(f"cost_{task}", f"{task}: cost, mean ± std over seeds (ok runs)",
                                    group, metrics, counts[counts["task"] == task]))
    return tables


def leaderboard(summary: pd.DataFrame, pattern: Pattern) -> pd.DataFrame:
    """CAB's leaderboard of one pattern: rows attentions, columns ``(task, primary metric)`` means
    (over settings too) of the tasks exercising the pattern, and the compositional index ``CI``
    over those tasks (all their quality metrics). Cost is in the cost tables, never here. Empty
    when no task at hand exercises the pattern."""
    summary = representatives(summary)
    tasks = pattern_tasks(summary["task"].unique()).get(pattern, [])
    primary = primary_metrics(summary)
    frame = summary[summary["task"].isin(tasks)
                    & (summary["metric"] == summary["task"].map(primary))]
    if frame.empty:
        return pd.DataFrame()
    table = frame.pivot_table(index="label", columns=["task", "metric"], values="mean", aggfunc="mean")
    index = compositional_index(summary, tasks).set_index("label")
    # As CAB: a mechanism missing one of the pattern's tasks gets no CI ("-" in CAB's boards).
    table[("CI", "")] = index["index"].where(index["tasks"] == len(tasks))
    return table.sort_values(("CI", ""), ascending=False)


def leaderboard_tables(summary: pd.DataFrame) -> list[Table]:
    """The four pattern leaderboards that have results (CAB's layout): each task's primary quality
    metric as ``mean ± std (n)`` and the compositional index, the best per column marked."""
    tables = []
    chosen = representatives(summary).set_index(["task", "label", "metric"]).sort_index()
    directions = summary.groupby(["task", "metric"])["direction"].first().to_dict()
    for pattern in Pattern:
        board = leaderboard(summary, pattern)
        if board.empty:
            continue
        header = ["attention", *(f"{t} {m}{arrow(directions.get((t, m)))}" if t != "CI" else "CI ↑"
                                 for t, m in board.columns)]
        rows, values = [], []
        for label, means in zip(board.index, board.values):
            cells = [number(v) if t == "CI" or (t, label, m) not in chosen.index
                     else _spread_of(chosen.loc[[(t, label, m)]]) for (t, m), v in zip(board.columns, means)]
            rows.append([label, *cells])
            values.append([None, *(None if math.isnan(v) else float(v) for v in means)])
        marked = {j + 1: ("higher" if t == "CI" else directions.get((t, m)))
                  for j, (t, m) in enumerate(board.columns)}
        tables.append(Table(name=f"leaderboard_{pattern.value}", title=f"{pattern.value} leaderboard",
                            header=header, rows=rows, values=values, best=best_cells(values, marked)))
    return tables


def _spread_of(rows: pd.DataFrame) -> str:
    """``mean ± std (n)`` of one leaderboard cell (the mean of its settings' means where the task
    ran several settings, with their run counts summed)."""
    if len(rows) == 1:
        row = rows.iloc[0]
        return f"{_mean_spread(row)} ({int(row['n'])})"
    return f"{number(rows['mean'].mean())} ({int(rows['n'].sum())})"


def common_tasks(scores: pd.DataFrame) -> list[str]:
    """The tasks in which every attention of ``scores`` (``task_scores``) has a result."""
    per_label = [set(tasks) for tasks in scores.groupby("label")["task"].agg(list)]
    return sorted(set.intersection(*per_label)) if per_label else []


def index_table(summary: pd.DataFrame) -> Table:
    """The compositional index over the tasks every attention has (CAB's rule: a mean over
    different task sets compares nothing), with each task's score shown."""
    summary = representatives(summary)
    scores = task_scores(summary)
    tasks = sorted(scores["task"].unique())
    common = common_tasks(scores)
    index = compositional_index(summary, common) if common else compositional_index(summary)
    by = scores.set_index(["label", "task"])["score"]
    rows = [[row.label, f"{row.index + 0.0:.3f}", str(int(row.tasks)),
             *(f"{by[(row.label, t)] + 0.0:.3f}" if (row.label, t) in by.index else MISSING for t in tasks)]
            for row in index.itertuples()]
    scope = (f"over the tasks every attention has ({', '.join(common)})"
             if common else "over each attention's own tasks: no task is shared by all, so these "
                            "indices are not comparable")
    if common == tasks:
        scope = f"over every task ({', '.join(tasks)})"
    return Table(name="compositional_index", title=f"CAB compositional index, {scope}",
                 header=["attention", "CI", "tasks", *tasks], rows=rows,
                 notes=["Each mechanism at one configuration per task (the one with the most runs). "
                        "Per metric: z-score of each attention's mean across the attentions at hand, "
                        "negated where lower is better; averaged within a task (its metrics and "
                        "settings), then across the tasks in the index. Per-task scores outside "
                        "the index are shown but do not enter it."])
