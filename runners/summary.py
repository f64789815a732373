"""The table at the end of a sweep: one per task, seeds aggregated, CAB's parameter rule checked."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.table import Table

from tasks.base import attention_label

PARAMETER_TOLERANCE = 0.10
"""CAB/LRA fairness: a mechanism may add at most 10% parameters over softmax."""

REFERENCE = "softmax"


@dataclass
class Row:
    """The records of one (task, settings, attention) group, over seeds."""

    task: str
    settings: str
    attention: str
    records: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "ok"]

    def parameters(self) -> int | None:
        counts = [r["parameters"] for r in self.ok]
        return max(counts) if counts else None


def settings_label(record: dict[str, Any]) -> str:
    """The task settings a run record was given (``key=value ...``, sorted; "" for defaults)."""
    overrides = record["cell"].get("overrides") or {}
    return " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))


SETTINGS_WIDTH = 60
"""Columns a settings summary may take on one line (the record keeps every setting)."""


def _task_defaults(task: str) -> dict[str, Any]:
    """The task's ``Config`` defaults (empty for a task that is not installed)."""
    import dataclasses

    from tasks.registry import get_task, list_tasks

    if task not in list_tasks():
        return {}
    fields = dataclasses.fields(get_task(task).Config)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def short_settings(task: str, settings: dict[str, Any] | None, width: int = SETTINGS_WIDTH) -> str:
    """The settings that differ from the task's defaults, ``key=value`` sorted, cut to ``width``
    columns with ``+N more`` (a line to read; the record and the grouping keep them all)."""
    defaults = _task_defaults(task)
    items = [f"{k}={v}" for k, v in sorted((settings or {}).items())
             if k not in defaults or defaults[k] != v]
    shown: list[str] = []
    for index, item in enumerate(items):
        rest = len(items) - index - 1
        tail = f" +{rest + 1} more" if rest + 1 else ""
        if len(" ".join([*shown, item])) + (len(f" +{rest} more") if rest else 0) > width:
            return " ".join([*shown, tail.strip()])
        shown.append(item)
    return " ".join(shown)


def group(records: Sequence[dict[str, Any]]) -> list[Row]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        cell = record["cell"]
        label = attention_label(cell["attention"], cell.get("attention_args"))
        groups[(cell["task"], settings_label(record), label)].append(record)
    return [Row(task, settings, label, rs) for (task, settings, label), rs in sorted(groups.items())]


def parameter_overhead(rows: Sequence[Row]) -> dict[tuple[str, str, str], float]:
    """Relative parameter increase over softmax at the same task and settings, per row."""
    reference = {(r.task, r.settings): r.parameters() for r in rows if r.attention == REFERENCE}
    overhead = {}
    for row in rows:
        base, count = reference.get((row.task, row.settings)), row.parameters()
        if base and count is not None:
            overhead[(row.task, row.settings, row.attention)] = (count - base) / base
    return overhead


def parameter_flags(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per mechanism that adds more than 10% parameters over softmax."""
    return [f"{task} [{settings or 'defaults'}]: {attention} has {share:+.1%} parameters over "
            f"{REFERENCE} (CAB's fairness rule allows at most +{PARAMETER_TOLERANCE:.0%})"
            for (task, settings, attention), share in sorted(parameter_overhead(group(records)).items())
            if share > PARAMETER_TOLERANCE]


TABLE_WIDTH = 100
"""The terminal tables fit this many columns; everything else is in the records and the report."""

PIPELINE_CHECK = "a pipeline check at smoke size: every cell trains and evaluates; this is no ranking"
"""The caption of a task whose smoke size does not rank mechanisms (one line, under 100 columns)."""


def mean_std(values: Sequence[float]) -> str:
    """``0.7077 ± 0.51``: the mean (4 significant digits) and sample standard deviation (2) of
    values over seeds; one value alone; ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def _count(value: int | None) -> str:
    """``1234567`` -> ``1.23M``: a parameter count short enough for a narrow column."""
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)


def declared_metrics(record: dict[str, Any]) -> list[dict[str, str]]:
    """A run record's metrics as its task declared them, in order: ``[{"name", "kind",
    "direction"}]``. Records written before kinds were recorded have only ``metric_directions``:
    their metrics count as quality metrics."""
    if record.get("declared_metrics"):
        return list(record["declared_metrics"])
    return [{"name": name, "kind": "quality", "direction": direction}
            for name, direction in (record.get("metric_directions") or {}).items()]


def shown_metrics(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``[(metric, arrow)]`` for a task's terminal table: its declared quality metrics and
    diagnostics, in declared order; cost metrics and undeclared extras stay in the records and
    the report."""
    shown: list[tuple[str, str]] = []
    for record in records:
        if record.get("status") != "ok":
            continue
        for metric in declared_metrics(record):
            if metric["kind"] == "cost" or any(metric["name"] == name for name, _ in shown):
                continue
            arrow = ("" if metric["kind"] == "diagnostic"
                     else "↑" if metric["direction"] == "higher" else "↓")
            shown.append((metric["name"], arrow))
    return shown


def summary_tables(records: Sequence[dict[str, Any]], *, pipeline_check: Sequence[str] = ()) -> list[Table]:
    """One table per task and settings, within :data:`TABLE_WIDTH` columns: each shown metric's
    mean ± standard deviation over seeds, ok/runs, parameters (with their overhead over softmax,
    flagged beyond 10%) and training time. Tasks in ``pipeline_check`` get a caption saying that
    their numbers check the pipeline and do not rank mechanisms."""
    rows = group(records)
    overhead = parameter_overhead(rows)
    tables = []
    for task, settings in sorted({(r.task, r.settings) for r in rows}):
        task_rows = [r for r in rows if (r.task, r.settings) == (task, settings)]
        metrics = shown_metrics([record for row in task_rows for record in row.records])
        shown = short_settings(task, task_rows[0].records[0]["cell"].get("overrides"))
        title = f"{task}" + (f" [{shown}]" if shown else "") + ": mean ± std over seeds"
        table = Table(title=escape(title), caption=PIPELINE_CHECK if task in pipeline_check else None,
                      min_width=min(len(title), TABLE_WIDTH), title_justify="left", caption_justify="left")
        for column in ("attention", "ok/runs", *(f"{m} {arrow}".strip() for m, arrow in metrics),
                       "params", "train s"):
            # Long mechanism labels fold; numbers and headers stay whole.
            table.add_column(column, justify="left" if column == "attention" else "right",
                             overflow="fold", no_wrap=column != "attention",
                             min_width=14 if column == "attention" else None)
        for row in task_rows:
            ok = row.ok
            share = overhead.get((row.task, row.settings, row.attention))
            failed = sorted({r["status"] for r in row.records if r.get("status") != "ok"})
            table.add_row(
                escape(row.attention),
                f"{len(ok)}/{len(row.records)}" + (f" {','.join(failed)}" if failed else ""),
                *(mean_std([r["metrics"][m] for r in ok if m in r["metrics"]]) for m, _ in metrics),
                _count(row.parameters()) + ("" if share is None or abs(share) < 0.0005 else f" {share:+.1%}")
                + (" FLAG" if share is not None and share > PARAMETER_TOLERANCE else ""),
                mean_std([r["timings"].get("train_seconds", 0.0) for r in ok]),
            )
        tables.append(table)
    return tables


def describe_cell(cell: dict[str, Any]) -> str:
    """``lm lavo(r=32) [seq_len=512] seed 0``: a cell named by what it runs, not by its hash."""
    settings = short_settings(cell["task"], cell.get("overrides"))
    label = attention_label(cell["attention"], cell.get("attention_args"))
    return (f"{cell['task']} {label}" + (f" [{settings}]" if settings else "")
            + f" seed {cell.get('seed')}")


def error_line(error: str) -> str:
    """What a (multi-line) error says went wrong: its first line, and the last exception line
    below it when it has one (a library's log tail, fairseq's or ESPnet's, ends with its
    exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines[1:] if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    first = lines[0] if lines else ""
    return f"{first} ... {causes[-1]}" if causes else first


def failures(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per failed cell: what it ran (task, attention, hyperparameters, settings, seed),
    its status, the line of its error that names the cause, and its key."""
    return [f"{describe_cell(r['cell'])}: {r['status']}: {error_line(r.get('error') or '')} ({r['key']})"
            for r in records if r.get("status") != "ok"]
