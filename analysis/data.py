"""The records of ``results/`` as pandas data frames (reading only; nothing is re-run).

Two frames feed every table and plot:

- :func:`run_metrics`: one row per (run record, metric), from ``results/runs``.
- :func:`efficiency_points`: one row per efficiency record, from ``results/efficiency``.

Metric directions and kinds come from the record (``declared_metrics``: name, kind, direction in
the task's declared order), else from the installed task's declaration (``Task.metrics``), else
from the record's ``metric_directions`` (older records: every directed metric counts as quality).
A scalar the declarations do not name (an extra measurement of the task) has kind ``extra`` and
no direction; the metrics of a record with no declarations at all are shown as quality metrics
without a direction (never ranked). Only ``quality`` metrics enter the leaderboards and the
compositional index; ``cost`` metrics (throughput) go to the cost tables, ``diagnostic`` ones
beside the quality metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from attention_zoo import AttentionConfigError, Pattern, attention_spec
from runners.records import RecordProblem, read_records, scan_records
from runners.summary import declared_metrics as declared_metrics_of
from runners.summary import settings_label
from tasks.base import attention_label

RUN_KIND = "run"
EFFICIENCY_KIND = "efficiency"

EXTRAPOLATION_KEY = "extrapolation"
"""``extra["extrapolation"]`` of an LM run record: perplexity at each evaluation context length,
either ``{"<length>": perplexity}`` or ``[{"length": n, "perplexity": p}, ...]``."""

POSITION_KEY = "perplexity_by_position"
"""``extra["perplexity_by_position"]`` of an LM run record: perplexity of the tokens at each
position of an unbounded stream (the end of each bucket of positions), either
``{"<position>": perplexity}`` or ``[{"position": n, "perplexity": p}, ...]``."""

RUN_COLUMNS = ["key", "task", "settings", "attention", "label", "args", "seed", "status",
               "metric", "value", "direction", "kind", "order"]

EXTRA_ORDER = 1000
"""The ``order`` of an undeclared metric (declared ones count from 0 in declared order)."""


@cache
def _declared(task: str) -> tuple[tuple[str, str, str], ...] | None:
    """``((metric, direction, kind), ...)`` as the installed task declares them; None if the task
    is not installed."""
    from tasks.registry import get_task

    try:
        task_class = get_task(task)
    except AttentionConfigError:
        return None
    return tuple((m.name, "higher" if m.higher_is_better else "lower", m.kind) for m in task_class.metrics)


def declared_metrics(task: str) -> dict[str, str] | None:
    """``{metric: "higher" | "lower"}`` as the installed task declares it; None if not installed."""
    declared = _declared(task)
    return None if declared is None else {name: direction for name, direction, _ in declared}


def record_metric_declarations(record: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``[(metric, direction, kind)]`` of a run record, in declared order (see the module's
    docstring for where they come from)."""
    if not record.get("declared_metrics"):
        installed = _declared(record["cell"]["task"])
        if installed is not None:
            return list(installed)
    return [(m["name"], m["direction"], m["kind"]) for m in declared_metrics_of(dict(record))]


@cache
def task_patterns(task: str) -> frozenset[Pattern] | None:
    """The attention patterns a task's roles exercise; None if the task is not installed."""
    from tasks.registry import get_task

    try:
        return frozenset(get_task(task).roles.values())
    except AttentionConfigError:
        return None


def primary_metric(task: str, metrics: Sequence[str]) -> str | None:
    """The metric a figure or table shows for ``task``: the first quality metric the task
    declares among ``metrics``, else the first of ``metrics`` in sorted order (None if empty)."""
    declared = [name for name, _, kind in _declared(task) or () if kind == "quality" and name in metrics]
    return declared[0] if declared else min(metrics, default=None)


def setting_label(value: object) -> str:
    """A hyperparameter value as a tick label: ``default`` where the mechanism's default (None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "default"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def setting_order(label: str) -> tuple[int, float, str]:
    """Sort key of :func:`setting_label` labels: numbers in numeric order, then the rest."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def hyperparameter_defaults(attention: str) -> dict[str, Any]:
    """A registered mechanism's hyperparameter defaults ({} for an unknown name)."""
    try:
        return {hp.name: hp.default for hp in attention_spec(attention).hyperparameters}
    except AttentionConfigError:
        return {}


def run_records(results_dir: Path) -> list[dict[str, Any]]:
    """The run records under ``results_dir/runs`` (none if the folder is absent)."""
    folder = Path(results_dir) / "runs"
    return read_records(folder, kind=RUN_KIND) if folder.is_dir() else []


def record_problems(results_dir: Path) -> list[RecordProblem]:
    """Every file under ``results_dir/runs`` and ``results_dir/efficiency`` that is not a valid
    record of its folder's kind, with the reason (the report lists them; nothing reads them)."""
    problems = []
    for kind, name in ((RUN_KIND, "runs"), (EFFICIENCY_KIND, "efficiency")):
        folder = Path(results_dir) / name
        if folder.is_dir():
            problems += scan_records(folder, kind=kind)[1]
    return problems


def failed_runs(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run record that is not ``ok``: ``task, settings, label, seed, status, error,
    key`` (``error``: the line of the error that names its cause)."""
    from runners.summary import error_line

    rows = [{"task": r["cell"]["task"], "settings": settings_label(dict(r)),
             "label": attention_label(r["cell"]["attention"], r["cell"].get("attention_args")),
             "seed": r.get("seed", r["cell"].get("seed")),
             "status": r["status"], "error": error_line(str(r.get("error") or "")), "key": r["key"]}
            for r in records if r.get("status") != "ok"]
    return pd.DataFrame(rows, columns=["task", "settings", "label", "seed", "status", "error", "key"])


def efficiency_records(results_dir: Path) -> list[dict[str, Any]]:
    """The efficiency records under ``results_dir/efficiency`` (none if absent)."""
    folder = Path(results_dir) / "efficiency"
    return read_records(folder, kind=EFFICIENCY_KIND) if folder.is_dir() else []


def run_metrics(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (record, metric) of the ``ok`` records, plus one row with metric None and
    value NaN for each failed record (so that the number of runs counts failures too).

    Columns: ``key, task, settings, attention`` (the mechanism), ``label`` (with its non-default
    hyperparameters), ``args`` (every hyperparameter, defaults filled in), ``seed, status,
    metric, value, direction`` (``higher``, ``lower`` or None).
    """
    rows = []
    for record in records:
        cell = record["cell"]
        task = cell["task"]
        base = {
            "key": record["key"], "task": task, "settings": settings_label(dict(record)),
            "attention": cell["attention"],
            "label": attention_label(cell["attention"], cell.get("attention_args")),
            "args": {**hyperparameter_defaults(cell["attention"]), **(cell.get("attention_args") or {})},
            "seed": record.get("seed", cell.get("seed")), "status": record.get("status"),
        }
        if record.get("status") != "ok":
            rows.append({**base, "metric": None, "value": math.nan, "direction": None, "kind": None,
                         "order": EXTRA_ORDER})
            continue
        declared = {name: (direction, kind, order) for order, (name, direction, kind)
                    in enumerate(record_metric_declarations(record))}
        # A record that declares nothing: its metrics are shown as the task's, with no direction.
        undeclared = (None, "extra" if declared else "quality", EXTRA_ORDER)
        for metric, value in record["metrics"].items():
            direction, kind, order = declared.get(metric, undeclared)
            rows.append({**base, "metric": metric, "value": float(value), "direction": direction,
                         "kind": kind, "order": order})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def run_costs(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per ``ok`` run record with its cost: ``train_seconds``, ``total_seconds``,
    ``peak_mib`` (the task's peak memory, else the process's peak RSS) and ``parameters``."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            continue
        cell, timings = record["cell"], record.get("timings") or {}
        rows.append({
            "key": record["key"], "task": cell["task"], "settings": settings_label(dict(record)),
            "attention": cell["attention"],
            "label": attention_label(cell["attention"], cell.get("attention_args")),
            "args": {**hyperparameter_defaults(cell["attention"]), **(cell.get("attention_args") or {})},
            "seed": record.get("seed"),
            "train_seconds": timings.get("train_seconds", math.nan),
            "total_seconds": timings.get("total_seconds", math.nan),
            "peak_mib": record.get("peak_memory_mib") or record.get("process_peak_rss_mib") or math.nan,
            "parameters": record.get("parameters", math.nan),
        })
    return pd.DataFrame(rows, columns=["key", "task", "settings", "attention", "label", "args", "seed",
                                       "train_seconds", "total_seconds", "peak_mib", "parameters"])


def efficiency_points(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per efficiency cell; where several runs measured the same cell, the latest run
    (the greatest ``run_id``, which starts with its UTC time) wins.

    Columns: ``run_id, attention, label, pattern, scope, length, batch, heads, head_dim, dtype,
    device, status, forward_ms, forward_backward_ms, forward_peak_mib, forward_backward_peak_mib``.
    """
    rows = []
    for record in records:
        cell, metrics = record["cell"], record.get("metrics") or {}
        rows.append({
            "run_id": record.get("run_id", ""), "attention": cell["attention"],
            "label": attention_label(cell["attention"], cell.get("attention_args")),
            "pattern": cell["pattern"],
            "scope": cell.get("scope", "core"), "length": int(cell["length"]),
            "batch": cell.get("batch"), "heads": cell.get("heads"), "head_dim": cell.get("head_dim"),
            "dtype": cell.get("dtype"), "device": cell.get("device"), "status": record.get("status"),
            **{m: float(metrics.get(m, math.nan)) for m in (
                "forward_ms", "forward_backward_ms", "forward_peak_mib", "forward_backward_peak_mib")},
        })
    frame = pd.DataFrame(rows, columns=[
        "run_id", "attention", "label", "pattern", "scope", "length", "batch", "heads", "head_dim",
        "dtype", "device", "status", "forward_ms", "forward_backward_ms", "forward_peak_mib",
        "forward_backward_peak_mib"])
    identity = ["label", "pattern", "scope", "length", "batch", "heads", "head_dim", "dtype", "device"]
    return (frame.sort_values("run_id").drop_duplicates(identity, keep="last")
            .sort_values(["pattern", "label", "length"]).reset_index(drop=True))


def curve(value: Any, x_name: str) -> list[tuple[float, float]]:
    """A curve from a record's ``extra`` in either documented form, sorted by x; [] if malformed."""
    points: list[tuple[float, float]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = [(p.get(x_name), p.get("perplexity")) for p in value if isinstance(p, Mapping)]
    else:
        return []
    for x, y in items:
        try:
            points.append((float(x), float(y)))
        except (TypeError, ValueError):
            return []
    return sorted(points)


def extra_curves(records: Sequence[Mapping[str, Any]], key: str, x_name: str) -> pd.DataFrame:
    """Rows ``task, settings, label, seed, x, perplexity`` from ``extra[key]`` of ok run records
    (empty when no record carries it)."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            continue
        cell = record["cell"]
        label = attention_label(cell["attention"], cell.get("attention_args"))
        for x, y in curve((record.get("extra") or {}).get(key), x_name):
            rows.append({"task": cell["task"], "settings": settings_label(dict(record)),
                         "label": label, "seed": record.get("seed"), "x": x, "perplexity": y})
    return pd.DataFrame(rows, columns=["task", "settings", "label", "seed", "x", "perplexity"])
