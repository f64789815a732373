"""``attnbench report``: every table and figure from the records in ``results/``, into one folder
with an index page (``index.md`` and ``index.html``). Nothing is re-run.

Layout of the report folder::

    index.md, index.html      every table and figure, in order
    tables/<name>.md, .tex    the tables (Markdown and LaTeX)
    figures/<name>.png, .pdf  the figures
    paper/                    with ``--paper``: the LAVO paper's and CAB's layouts, the same way
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import paper, plots
from analysis.data import (
    EXTRAPOLATION_KEY,
    POSITION_KEY,
    efficiency_points,
    efficiency_records,
    extra_curves,
    failed_runs,
    primary_metric,
    record_problems,
    run_costs,
    run_metrics,
    run_records,
)
from analysis.tables import Table, index_table, leaderboard_tables, metric_summary, run_counts, task_tables
from attention_zoo import Pattern
from runners.records import RecordProblem


@dataclass
class Section:
    """Part of the index page: tables and figures (paths relative to the report folder)."""

    title: str
    tables: list[tuple[Table, str]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    folder: Path
    sections: list[Section]
    problems: list[RecordProblem] = field(default_factory=list)

    @property
    def figures(self) -> list[Path]:
        return [self.folder / f for s in self.sections for f in s.figures]

    @property
    def tables(self) -> list[Table]:
        return [t for s in self.sections for t, _ in s.tables]


def _write_table(table: Table, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{table.name}.md").write_text(table.markdown())
    (folder / f"{table.name}.tex").write_text(table.latex())
    return f"{folder.name}/{table.name}.md"


def _suffix(settings: str) -> str:
    """A short stable file-name suffix for a settings label ("" for the task's defaults)."""
    return f"_{hashlib.sha256(settings.encode()).hexdigest()[:8]}" if settings else ""


def _figure(path: Path | None, root: Path) -> list[str]:
    return [] if path is None else [str(path.relative_to(root))]


def _efficiency_sections(points: pd.DataFrame, out: Path, figures: Path) -> Section:
    section = Section("Efficiency: time and memory versus sequence length")
    if points.empty:
        section.notes.append("No efficiency records (`attnbench efficiency` writes them).")
        return section
    for (pattern, scope, device, dtype), frame in points.groupby(["pattern", "scope", "device", "dtype"]):
        first = frame.iloc[0]
        title = (f"{pattern}, {'attention core' if scope == 'core' else 'whole layer'}: "
                 f"batch {first['batch']}, {first['heads']} heads x {first['head_dim']}, {dtype}, {device}")
        stem = f"efficiency_{pattern}_{scope}_{device}_{dtype}".replace(":", "")
        section.figures += _figure(plots.efficiency_plot(frame, figures, stem, title), out)
    return section


def _sensitivity_section(metrics: pd.DataFrame, costs: pd.DataFrame, out: Path, figures: Path) -> Section:
    section = Section("LAVO: sensitivity to r and w")
    for (task, settings), frame in metrics[metrics["attention"] == "lavo"].groupby(["task", "settings"]):
        directed = frame.dropna(subset=["direction"])
        if directed.empty:
            continue
        metric = primary_metric(str(task), list(directed["metric"].unique()))
        chosen = directed[directed["metric"] == metric]
        cost = costs[(costs["task"] == task) & (costs["settings"] == settings)
                     & (costs["attention"] == "lavo")]
        stem = f"sensitivity_{task}{_suffix(settings)}"
        path = plots.sensitivity_plot(chosen, cost, metric, chosen["direction"].iloc[0], figures, stem,
                                      f"LAVO on {task}" + (f" [{settings}]" if settings else ""))
        section.figures += _figure(path, out)
    if not section.figures:
        section.notes.append("No task has LAVO runs at two or more (r, w) settings "
                             "(`attnbench run ... attention=lavo attention.r=16,32 attention.w=8,16`).")
    return section


def _lm_sections(records: list[dict], out: Path, figures: Path) -> tuple[Section, pd.DataFrame]:
    section = Section("Language modelling: length extrapolation and unbounded context")
    extrapolation = extra_curves(records, EXTRAPOLATION_KEY, "length")
    positions = extra_curves(records, POSITION_KEY, "position")
    for task, frame in extrapolation.groupby("task"):
        section.figures += _figure(plots.curve_plot(
            frame, figures, f"extrapolation_{task}", f"{task}: length extrapolation",
            "evaluation context length (tokens)"), out)
    for task, frame in positions.groupby("task"):
        section.figures += _figure(plots.curve_plot(
            frame, figures, f"perplexity_by_position_{task}", f"{task}: perplexity versus position",
            "position in the stream (tokens)"), out)
    if not section.figures:
        section.notes.append(f"No run record carries `extra[\"{EXTRAPOLATION_KEY}\"]` or "
                             f"`extra[\"{POSITION_KEY}\"]` (the LM task's curves; see results/README.md).")
    return section, extrapolation


def _pareto_section(summary: pd.DataFrame, costs: pd.DataFrame, out: Path, figures: Path) -> Section:
    section = Section("Quality versus cost (Pareto)")
    spent = costs.groupby(["task", "settings", "label"])["train_seconds"].mean().rename("cost")
    for (task, settings), frame in summary.dropna(subset=["direction"]).groupby(["task", "settings"]):
        metric = primary_metric(str(task), list(frame["metric"].unique()))
        chosen = frame[frame["metric"] == metric].set_index(["task", "settings", "label"])
        points = chosen[["mean"]].rename(columns={"mean": "quality"}).join(spent).reset_index()
        stem = f"pareto_{task}{_suffix(settings)}"
        section.figures += _figure(plots.pareto_plot(
            points, metric, chosen["direction"].iloc[0] == "higher", "training time (s, mean over seeds)",
            figures, stem, f"{task}: {metric} versus training time" + (f" [{settings}]" if settings else "")),
            out)
    return section


def _failures_section(records: list[dict], out: Path) -> Section:
    section = Section("Failures: cells that did not finish ok")
    failed = failed_runs(records)
    if failed.empty:
        section.notes.append("Every run record says ok.")
        return section
    header = ["task", "attention", "settings", "seed", "status", "error", "key"]
    table = Table(name="failures", header=header,
                  title=f"{len(failed)} failed cells (`attnbench run --retry-failed` runs them again)",
                  rows=[[r.task, r.label, r.settings or "defaults", str(r.seed), r.status, r.error, r.key]
                        for r in failed.itertuples()])
    section.tables.append((table, _write_table(table, out / "tables")))
    return section


def _problems_section(problems: list[RecordProblem]) -> Section:
    section = Section("Problems: files that are not valid records (ignored)")
    section.notes = [f"`{p.path}`: {p.reason}" for p in problems] or ["None."]
    return section


def build_report(results_dir: Path, out: Path, *, paper_layouts: bool = False) -> Report:
    """Read ``results_dir`` and write the report into ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    tables, figures = out / "tables", out / "figures"
    records = run_records(results_dir)
    metrics, costs = run_metrics(records), run_costs(records)
    summary = metric_summary(metrics)
    points = efficiency_points(efficiency_records(results_dir))

    sections = []
    per_task = Section("Per task: attention x metric")
    per_task.tables = [(t, _write_table(t, tables)) for t in task_tables(summary, run_counts(metrics))]
    if not per_task.tables:
        per_task.notes.append("No run records (`attnbench run` writes them).")
    sections.append(per_task)
    if not summary.empty:
        boards = Section("CAB leaderboards (per attention pattern) and compositional index")
        boards.tables = [(t, _write_table(t, tables)) for t in [*leaderboard_tables(summary),
                                                                 index_table(summary)]]
        boards.notes.append("A leaderboard holds the tasks whose roles exercise its pattern; CI is the "
                            "compositional index over those tasks.")
        sections.append(boards)
    sections.append(_efficiency_sections(points, out, figures))
    sections.append(_sensitivity_section(metrics, costs, out, figures))
    lm, extrapolation = _lm_sections(records, out, figures)
    sections.append(lm)
    sections.append(_pareto_section(summary, costs, out, figures))

    if paper_layouts:
        folder = out / "paper"
        layout = Section("Paper layouts: CAB's leaderboards and LAVO's tables (n/a: no result)")
        layout.tables = [(t, _write_table(t, folder)) for t in [
            *paper.cab_tables(summary), paper.extrapolation_table(extrapolation),
            paper.efficiency_table(points), paper.ablation_table(metrics)]]
        causal = points[(points["pattern"] == Pattern.CAUSAL_SELF.value) & (points["scope"] == "core")]
        layout.figures += _figure(plots.efficiency_plot(
            causal, folder, "lavo_efficiency", "causal self attention: time and memory"), out)
        if not layout.figures:
            layout.notes.append("LAVO's efficiency figure: n/a (no causal_self efficiency records).")
        sections.append(layout)

    sections.append(_failures_section(records, out))
    problems = record_problems(results_dir)
    sections.append(_problems_section(problems))
    report = Report(out, sections, problems)
    (out / "index.md").write_text(index_markdown(report, results_dir, len(records), len(points)))
    (out / "index.html").write_text(index_html(report, results_dir, len(records), len(points)))
    return report


def index_markdown(report: Report, results_dir: Path, runs: int, cells: int) -> str:
    lines = ["# attnbench report", "",
             f"From `{results_dir}`: {runs} run records, {cells} efficiency cells. Nothing was re-run.", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for table, path in section.tables:
            lines += [table.markdown(), f"([Markdown]({path}), [LaTeX]({path[:-3]}.tex))", ""]
        lines += [f"![{Path(f).stem}]({f})\n" for f in section.figures]
        lines += [f"{note}\n" for note in section.notes]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.notes)
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{body}</table>{notes}"


def index_html(report: Report, results_dir: Path, runs: int, cells: int) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>attnbench report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#555}</style>",
             "</head><body><h1>attnbench report</h1>",
             f"<p>From <code>{html.escape(str(results_dir))}</code>: {runs} run records, {cells} efficiency "
             "cells. Nothing was re-run.</p>"]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [_html_table(table) for table, _ in section.tables]
        parts += [f"<p><img src='{html.escape(f)}' alt='{html.escape(Path(f).stem)}'></p>"
                  for f in section.figures]
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in section.notes]
    parts.append("</body></html>\n")
    return "\n".join(parts)
