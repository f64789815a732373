"""``attnbench report``: every table and figure from the records in ``results/``, into one folder
with an index page (``index.md`` and ``index.html``). Nothing is re-run.

Layout of the report folder::

    index.html                one self-contained page (styles, sorting, figures inline)
    index.md                  the same tables and figures in Markdown
    tables/<name>.md, .tex    the tables (Markdown and LaTeX)
    figures/<name>.png, .pdf  the figures
    paper/                    with ``--paper``: the LAVO paper's and CAB's layouts, the same way
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Sequence
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
from analysis.tables import (
    Table,
    cost_tables,
    index_table,
    leaderboard_tables,
    metric_summary,
    run_counts,
    task_tables,
)
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
    warning: str = ""
    """Said at the top of the page (smoke-sized records that rank nothing)."""

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
    counts = run_counts(metrics)
    if not summary.empty:
        boards = Section("Leaderboards: CAB's attention patterns and compositional index")
        boards.tables = [(t, _write_table(t, tables)) for t in [*leaderboard_tables(summary),
                                                                 index_table(summary)]]
        boards.notes.append("A leaderboard holds the tasks whose roles exercise its pattern, each by its "
                            "primary quality metric (mean ± std over seeds, ok runs in brackets; over "
                            "settings too where a task ran several); CI is CAB's compositional index "
                            "over those tasks' quality metrics. Time, memory and throughput are in the "
                            "cost tables.")
        sections.append(boards)
    per_task = Section("Per task: quality")
    per_task.tables = [(t, _write_table(t, tables)) for t in task_tables(summary, counts)]
    if not per_task.tables:
        per_task.notes.append("No run records (`attnbench run` writes them).")
    sections.append(per_task)
    if not costs.empty:
        cost = Section("Per task: cost")
        cost.tables = [(t, _write_table(t, tables)) for t in cost_tables(summary, costs, counts)]
        sections.append(cost)
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
    report = Report(out, sections, problems, smoke_warning(records, metrics))
    (out / "index.md").write_text(index_markdown(report, results_dir, len(records), len(points)))
    (out / "index.html").write_text(index_html(report, results_dir, len(records), len(points)))
    return report


SMOKE_WARNING = ("These records are smoke-sized ({why}): they check that every cell trains and "
                 "evaluates, and rank nothing. A ranking needs seeds and budgets that separate "
                 "mechanisms beyond seed noise (docs/study/ holds such a study).")


def smoke_warning(records: Sequence[dict], metrics: pd.DataFrame) -> str:
    """The page's top warning when every record is of the smoke preset or every comparison has
    one seed (empty otherwise)."""
    if not records:
        return ""
    reasons = []
    if all(r.get("preset") == "smoke" for r in records):
        reasons.append("the smoke preset's pipeline budgets")
    ok = metrics.dropna(subset=["metric"])
    if not ok.empty and ok.groupby(["task", "settings", "label", "metric"])["seed"].nunique().max() <= 1:
        reasons.append("one seed per comparison")
    return SMOKE_WARNING.format(why=", ".join(reasons)) if reasons else ""


def index_markdown(report: Report, results_dir: Path, runs: int, cells: int) -> str:
    lines = ["# attnbench report", "",
             f"From `{results_dir}`: {runs} run records, {cells} efficiency cells. Nothing was re-run.", ""]
    if report.warning:
        lines += [f"> **{report.warning}**", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for table, path in section.tables:
            lines += [table.markdown(), f"([Markdown]({path}), [LaTeX]({path[:-3]}.tex))", ""]
        lines += [f"![{Path(f).stem}]({f})\n" for f in section.figures]
        lines += [f"{note}\n" for note in section.notes]
    return "\n".join(lines)


STYLE = """
:root{--ink:#1d2433;--muted:#5b6475;--line:#dde1e8;--head:#f3f5f8;--best:#e3f4e8;--accent:#2456a6}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);margin:0;
 background:#fbfbfd}
main{max-width:1240px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:40px 0 8px;padding-top:8px;
 border-top:2px solid var(--line)}h3{font-size:15px;margin:22px 0 6px}
nav{columns:2 260px;font-size:14px;margin:12px 0 0;padding:10px 16px;background:#fff;
 border:1px solid var(--line);border-radius:8px}
nav a{color:var(--accent);text-decoration:none;display:block;padding:1px 0;break-inside:avoid}
.meta,.note{color:var(--muted);font-size:13px;margin:4px 0}
.warn{background:#fff4d6;border:1px solid #e9c46a;border-radius:6px;padding:8px 12px;font-weight:600}
.scroll{overflow-x:auto;max-width:100%;background:#fff;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;font-size:13px;width:max-content;min-width:100%}
th,td{padding:5px 10px;text-align:right;white-space:nowrap;border-bottom:1px solid var(--line)}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:inherit}
thead th:first-child{background:var(--head);z-index:1}
thead th{background:var(--head);cursor:pointer;user-select:none;position:sticky;top:0}
thead th:after{content:" \\2195";color:#aab}thead th.asc:after{content:" \\25B2"}
thead th.desc:after{content:" \\25BC"}
tbody tr{background:#fff}tbody tr:nth-child(even){background:#f8f9fb}
td.best{background:var(--best);font-weight:600}td.text{text-align:left}
figure{margin:14px 0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{color:var(--muted);font-size:12px;text-align:center}
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var ascending = !th.classList.contains('asc');
      table.querySelectorAll('thead th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(ascending ? 'asc' : 'desc');
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var key = function (row) {
        var cell = row.cells[column], value = cell.dataset.value;
        return value === undefined || value === '' ? cell.textContent : parseFloat(value);
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), order;
        if (typeof x === 'number' && typeof y === 'number') { order = x - y; }
        else if (typeof x === 'number') { order = -1; } else if (typeof y === 'number') { order = 1; }
        else { order = String(x).localeCompare(String(y)); }
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


_NUMBER = re.compile(r"^(n/a|[-+]?[\d.,/]+(e[-+]?\d+)?%?)( |$)")
"""A cell that reads as a number (right-aligned); anything else is text (left-aligned)."""


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _html_table(table: Table) -> str:
    """A sortable table: each cell carries its number (``data-value``); best cells are marked."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        values = table.values[i] if table.values else [None] * len(row)
        cells = []
        for j, text in enumerate(row):
            value = values[j] if j < len(values) else None
            data = "" if value is None else f" data-value='{json.dumps(value)}'"
            classes = " ".join(c for c, on in (("best", (i, j) in table.best),
                                               ("text", not _NUMBER.match(text))) if on)
            cells.append(f"<td{data}{f' class={classes!r}' if classes else ''}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.notes)
    return (f"<h3 id='{_anchor(table.name)}'>{html.escape(table.title)}</h3><div class='scroll'>"
            f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table></div>{notes}")


def _html_figure(folder: Path, relative: str) -> str:
    """A figure embedded in the page (a PNG as a data URI), so that the page stands alone."""
    data = base64.b64encode((folder / relative).read_bytes()).decode()
    caption = html.escape(Path(relative).stem.replace("_", " "))
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{caption}'>"
            f"<figcaption>{caption} ({html.escape(relative)})</figcaption></figure>")


def index_html(report: Report, results_dir: Path, runs: int, cells: int) -> str:
    """The report as one self-contained HTML page: styles, sorting and figures inline."""
    contents = "".join(f"<a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>" for s in report.sections)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>attnbench report</title><style>{STYLE}</style></head><body><main>",
             "<h1>attnbench report</h1>",
             f"<p class='meta'>From <code>{html.escape(str(results_dir))}</code>: {runs} run records, "
             f"{cells} efficiency cells. Nothing was re-run. Cells read mean ± standard deviation over "
             "seeds with the number of ok runs in brackets; the best value of each column is "
             "highlighted; click a column's header to sort by it.</p>",
             *([f"<p class='warn'>{html.escape(report.warning)}</p>"] if report.warning else []),
             f"<nav>{contents}</nav>"]
    for section in report.sections:
        parts.append(f"<h2 id='{_anchor(section.title)}'>{html.escape(section.title)}</h2>")
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in section.notes]
        parts += [_html_table(table) for table, _ in section.tables]
        parts += [_html_figure(report.folder, f) for f in section.figures]
    parts.append(f"</main><script>{SORT_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)
