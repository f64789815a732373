"""The table at the end of a sweep: one per task, seeds aggregated, CAB's parameter rule checked."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

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


def attention_label(cell: dict[str, Any]) -> str:
    """``lavo(r=32,w=16)``: a cell's mechanism with its non-default hyperparameters, sorted."""
    args = ",".join(f"{k}={v}" for k, v in sorted((cell.get("attention_args") or {}).items()))
    return cell["attention"] + (f"({args})" if args else "")


def group(records: Sequence[dict[str, Any]]) -> list[Row]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        cell = record["cell"]
        groups[(cell["task"], settings_label(record), attention_label(cell))].append(record)
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


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def summary_tables(records: Sequence[dict[str, Any]]) -> list[Table]:
    """One table per task: each metric's mean ± standard deviation over seeds, parameters and
    their overhead over softmax (flagged beyond 10%), training time and peak memory."""
    rows = group(records)
    overhead = parameter_overhead(rows)
    tables = []
    for task in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task]
        metrics: list[str] = []
        directions: dict[str, str] = {}
        for row in task_rows:
            for record in row.ok:
                directions.update(record.get("metric_directions", {}))
                metrics.extend(m for m in record["metrics"] if m not in metrics)
        table = Table(title=f"{task}: mean ± std over seeds")
        for column in ("attention", "settings", "ok/runs",
                       *(f"{m} {'↑' if directions.get(m) == 'higher' else '↓' if m in directions else ''}"
                         .strip() for m in metrics),
                       "params", "vs softmax", "train s", "peak MiB"):
            table.add_column(column, justify="left" if column in ("attention", "settings") else "right")
        for row in task_rows:
            ok = row.ok
            share = overhead.get((row.task, row.settings, row.attention))
            failures = sorted({r["status"] for r in row.records if r.get("status") != "ok"})
            peaks = [r.get("peak_memory_mib") or r.get("process_peak_rss_mib") for r in ok]
            table.add_row(
                row.attention, row.settings or "-",
                f"{len(ok)}/{len(row.records)}" + (f" ({', '.join(failures)})" if failures else ""),
                *(_mean_std([r["metrics"][m] for r in ok if m in r["metrics"]]) for m in metrics),
                f"{row.parameters():,}" if row.parameters() is not None else "-",
                "-" if share is None else f"{share:+.1%}" + (" FLAG" if share > PARAMETER_TOLERANCE else ""),
                _mean_std([r["timings"].get("train_seconds", 0.0) for r in ok]),
                _mean_std([p for p in peaks if p is not None]),
            )
        tables.append(table)
    return tables


def describe_cell(cell: dict[str, Any]) -> str:
    """``lm lavo(r=32) [seq_len=512] seed 0``: a cell named by what it runs, not by its hash."""
    settings = " ".join(f"{k}={v}" for k, v in sorted((cell.get("overrides") or {}).items()))
    return (f"{cell['task']} {attention_label(cell)}" + (f" [{settings}]" if settings else "")
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
