"""A study's tables and figures, from its records alone (``attnbench report results/study``).

For every stage of every study found in the records (a record's ``preset`` is
``study-<name>/<stage>``), the stage's cells are expanded again from the study file, and a tuned
stage's choice is made again from the records (:func:`runners.study.choose`), so the tables show
exactly the cells the protocol reports: each combination at its chosen value, over its seeds.

Statistics: mean, sample standard deviation and n over seeds; a mechanism differs from the
reference (softmax, at the same settings) when Welch's unequal-variance t-test rejects equal
means at 5% after Holm's correction over the stage's comparisons. Where both groups have no
spread at all (every seed the same value), the test is undefined: equal values are "same",
unequal ones "differs (no spread)".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from analysis.tables import Table, number
from runners.matrix import Cell
from runners.study import Stage, Study, choose, load_study, seed_cells, stage_cells
from runners.summary import mean_std as seed_spread
from tasks.base import attention_label

REFERENCE = "softmax"
ALPHA = 0.05


@dataclass
class Group:
    """The records of one reported row: a combination at its (chosen) settings, over seeds."""

    task: str
    label: str
    settings: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    chosen: Any = None

    def values(self, metric: str) -> list[float]:
        return [float(r["metrics"][metric]) for r in self.records
                if r.get("status") == "ok" and metric in (r.get("metrics") or {})]

    def runs(self) -> int:
        return len(self.records)


@dataclass
class StageResult:
    """What a stage reports: its groups, and for a tuned stage the candidates' scores."""

    study: str
    stage: Stage
    groups: list[Group]
    tuning_scores: dict[str, dict[Any, float | None]] = field(default_factory=dict)
    expected: int = 0


def studies_in(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The study names that ``records`` come from, sorted."""
    names = {str(r.get("preset", "")).split("/", 1)[0] for r in records}
    return sorted(n.removeprefix("study-") for n in names if n.startswith("study-"))


def stage_result(study: Study, stage: Stage, by_key: Mapping[str, dict[str, Any]]) -> StageResult:
    """The stage's reported groups from the records ``by_key`` (cell key -> record)."""
    cells = stage_cells(stage)
    result = StageResult(study.name, stage, [])
    if stage.tuning is None:
        reported, result.expected = cells, len(cells)
    else:
        choices = choose(cells, by_key, stage.tuning)
        reported = [c.cell for c in choices] + seed_cells(choices, stage.tuning)
        result.expected = len(cells) // max(1, _candidates(cells, stage)) * (
            1 + len(stage.tuning.seeds))
        result.tuning_scores = {_row_label(c.cell, cells, stage): c.scores for c in choices}
    result.groups = _grouped(reported, cells, stage, by_key)
    if stage.tuning is not None:
        unfinished = {_row_label(c.cell, cells, stage) for c in choices if not c.complete}
        for group in result.groups:
            if group.label in unfinished:  # the best rate so far, not yet the protocol's choice
                group.label += " (sweep unfinished)"
    return result


def _candidates(cells: Sequence[Cell], stage: Stage) -> int:
    over = stage.tuning.over if stage.tuning else None
    return len({repr(c.settings.get(over)) for c in cells}) if over else 1


def _varying(cells: Sequence[Cell], stage: Stage) -> list[str]:
    """Settings that differ between the stage's cells, the tuned one excluded."""
    over = stage.tuning.over if stage.tuning else None
    keys = sorted({k for c in cells for k in c.settings} - {over})
    return [k for k in keys if len({repr(c.settings.get(k)) for c in cells}) > 1]


def _row_label(cell: Cell, cells: Sequence[Cell], stage: Stage) -> str:
    settings = " ".join(f"{k}={cell.settings[k]}" for k in _varying(cells, stage))
    return f"{attention_label(cell.attention, cell.attention_args)} {settings}".strip()


def _grouped(reported: Sequence[Cell], cells: Sequence[Cell], stage: Stage,
             by_key: Mapping[str, dict[str, Any]]) -> list[Group]:
    groups: dict[str, Group] = {}
    over = stage.tuning.over if stage.tuning else None
    for cell in reported:
        label = _row_label(cell, cells, stage)
        group = groups.setdefault(label, Group(cell.task, label, dict(cell.settings),
                                               chosen=cell.settings.get(over) if over else None))
        if cell.key in by_key:
            group.records.append(by_key[cell.key])
    return sorted(groups.values(), key=lambda g: g.label)


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's two-sided p-value for equal means; NaN where undefined (n < 2, or no spread)."""
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (NaN stays NaN, and does not count as a comparison)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(a: Sequence[float], b: Sequence[float], raw: float, adjusted: float) -> str:
    """Whether ``a`` differs from the reference ``b`` beyond seed noise (see module doc): the
    decision is Holm's; the raw p-value is shown beside it."""
    if len(a) < 2 or len(b) < 2:
        return "n < 2"
    if math.isnan(adjusted):
        return "same" if np.mean(a) == np.mean(b) else "differs (no spread)"
    direction = "higher" if np.mean(a) > np.mean(b) else "lower"
    shown = f"p={raw:.2g}, Holm {adjusted:.2g}"
    return f"{direction} ({shown})" if adjusted < ALPHA else f"no evidence ({shown})"


def mean_std(values: Sequence[float]) -> str:
    """``0.91 ± 0.03 (3)``: :func:`runners.summary.mean_std` with n; n/a for none."""
    return f"{seed_spread(values)} ({len(values)})" if values else "n/a"


def _reference(group: Group, groups: Sequence[Group], over: str | None) -> Group | None:
    """The softmax group at the same settings as ``group`` (the tuned one aside)."""
    def base(g: Group) -> dict[str, Any]:
        return {k: v for k, v in g.settings.items() if k != over}

    return next((other for other in groups if other is not group
                 and other.label.split(" ", 1)[0] == REFERENCE and base(other) == base(group)), None)


def stage_table(result: StageResult, metrics: Sequence[str], primary: str) -> Table:
    """One row per group: the chosen value, each metric's mean ± std (n), and the primary
    metric against softmax (Welch, Holm-adjusted over the stage's rows)."""
    tuning = result.stage.tuning
    header = ["attention", *([f"chosen {tuning.over}"] if tuning else []),
              *(f"{m} ↑" for m in metrics), f"{primary} vs {REFERENCE}"]
    over = tuning.over if tuning else None
    references = [_reference(g, result.groups, over) for g in result.groups]
    raw = [welch(g.values(primary), ref.values(primary)) if ref else math.nan
           for g, ref in zip(result.groups, references)]
    adjusted = holm(raw)
    rows, values = [], []
    for group, ref, p, q in zip(result.groups, references, raw, adjusted):
        compared = verdict(group.values(primary), ref.values(primary), p, q) if ref else "n/a"
        rows.append([group.label, *([number(group.chosen)] if tuning else []),
                     *(mean_std(group.values(m)) for m in metrics), compared])
        values.append([None, *([None] if tuning else []),
                       *(_mean(group.values(m)) for m in metrics), None])
    notes = [_stage_note(result)]
    return Table(f"{result.study}_{result.stage.name}", f"{result.study}: {result.stage.description}",
                 header, rows, notes=notes, values=values)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _stage_note(result: StageResult) -> str:
    have = sum(g.runs() for g in result.groups)
    tuning = result.stage.tuning
    text = (f"{have} runs reported of {result.expected} the protocol asks for. Mean ± sample "
            "standard deviation (n seeds). Against softmax: Welch's t-test, Holm-adjusted over "
            f"the rows, at {ALPHA:.0%}.")
    if tuning:
        text += (f" {tuning.over} chosen per row by {tuning.metric} on seed 0 (never the test), "
                 f"then seeds {', '.join(map(str, tuning.seeds))} at it.")
    return text


def tuning_table(result: StageResult) -> Table | None:
    """The candidates' validation scores per row of a tuned stage (the choice, bold)."""
    tuning = result.stage.tuning
    if tuning is None or not result.tuning_scores:
        return None
    candidates = sorted({v for scores in result.tuning_scores.values() for v in scores})
    rows, best = [], set()
    for i, (label, scores) in enumerate(sorted(result.tuning_scores.items())):
        row = [label, *(number(scores.get(v)) if scores.get(v) is not None else "failed"
                        for v in candidates)]
        chosen = next((g.chosen for g in result.groups if g.label == label), None)
        best |= {(i, j + 1) for j, v in enumerate(candidates) if v == chosen}
        rows.append(row)
    return Table(f"{result.study}_{result.stage.name}_tuning",
                 f"{result.study} {result.stage.name}: {tuning.metric} of seed 0 per {tuning.over}",
                 ["attention", *(f"{tuning.over}={number(v)}" for v in candidates)], rows,
                 best=best, notes=[f"Bold: the chosen {tuning.over}."])


def width_curves(results: Sequence[StageResult], setting: str, metric: str) -> dict[str, list]:
    """label -> [(setting value, mean, std)] over the tuned stages that differ in ``setting``."""
    curves: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for result in results:
        if result.stage.tuning is None:
            continue
        for group in result.groups:
            values = group.values(metric)
            if values and setting in group.settings:
                curves[group.label].append((float(group.settings[setting]), float(np.mean(values)),
                                            float(np.std(values, ddof=1)) if len(values) > 1 else 0.0))
    return {label: sorted(points) for label, points in curves.items()}


def load_results(records: Sequence[Mapping[str, Any]]) -> list[StageResult]:
    """Every stage of every study present in ``records``."""
    by_key = {r["key"]: dict(r) for r in records}
    results = []
    for name in studies_in(records):
        study = load_study(name)
        results += [stage_result(study, stage, by_key) for stage in study.stages]
    return results


def shown_metrics(result: StageResult) -> tuple[list[str], str]:
    """The metrics a stage's table shows (validation ones left out) and its primary metric."""
    names = {m for g in result.groups for r in g.records for m in (r.get("metrics") or {})}
    shown = sorted((m for m in names if not m.startswith("validation")),
                   key=lambda m: (m != "accuracy", len(m), m))
    return shown, (shown[0] if shown else "accuracy")


def _provenance(records: Sequence[Mapping[str, Any]]) -> str:
    """Commits and machines the records were made on."""
    commits = sorted({str(((r.get("provenance") or {}).get("git") or {}).get("commit"))[:7]
                      for r in records})
    machines = sorted({str((r.get("provenance") or {}).get("device_name", "?")).split(" (")[0]
                       for r in records})
    return f"commits {', '.join(commits)}; machines {', '.join(machines)}"


def study_markdown(results: Sequence[StageResult], figures: Mapping[str, str],
                   records: Sequence[Mapping[str, Any]], command: str) -> str:
    """The generated page: every stage's table and tuning table, then the figures."""
    lines = ["# Study results (generated)", "",
             f"Written by `{command}` from {len(records)} records ({_provenance(records)}). "
             "Regenerate rather than edit; the verdicts are in [README.md](README.md).", ""]
    for result in results:
        metrics, primary = shown_metrics(result)
        lines += [stage_table(result, metrics, primary).markdown(), ""]
        if (tuning := tuning_table(result)) is not None:
            lines += [tuning.markdown(), ""]
    for title, path in figures.items():
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines)


def build_study_report(records: Sequence[Mapping[str, Any]], out: Path, command: str) -> Path:
    """Write ``out/results.md`` and ``out/figures/`` for the studies in ``records``."""
    from analysis import plots

    results = load_results(records)
    figures = {}
    for study in studies_in(records):
        mine = [r for r in results if r.study == study]
        curves = width_curves(mine, "d_model", "accuracy")
        if len({x for points in curves.values() for x, _, _ in points}) < 2:
            continue  # one width: nothing to draw against
        path = plots.setting_plot(curves, out / "figures", f"{study}_width",
                                  f"{study}: accuracy against model width (chosen lr, 3 seeds)",
                                  "d_model", "accuracy")
        if path is not None:
            figures[f"{study}: accuracy against width"] = str(path.relative_to(out))
    page = out / "results.md"
    out.mkdir(parents=True, exist_ok=True)
    page.write_text(study_markdown(results, figures, records, command))
    return page


__all__ = ["Group", "StageResult", "build_study_report", "holm", "load_results", "mean_std", "stage_result",
           "stage_table", "studies_in", "tuning_table", "verdict", "welch", "width_curves"]
