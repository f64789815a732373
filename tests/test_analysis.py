"""`attnbench report` on a results folder with known numbers: every table value and CAB's
compositional index against hand-computed values, every figure produced, --paper's missing cells."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

import pandas as pd

from analysis import plots
from analysis.data import efficiency_points, efficiency_records, run_costs, run_metrics, run_records
from analysis.report import build_report
from analysis.tables import (
    compositional_index,
    cost_tables,
    index_table,
    leaderboard,
    leaderboard_tables,
    metric_summary,
    representatives,
    task_scores,
    task_tables,
)
from attention_zoo import Pattern, list_attentions
from runners import efficiency, sweep
from runners.cli import main
from runners.records import write_record

pytestmark = pytest.mark.analysis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SQRT_1_5 = math.sqrt(1.5)  # |z| of the outer of three equally spaced values (population std)


def run_record(task: str, attention: str, seed: int, metrics: dict[str, float] | None,
               directions: dict[str, str], *, args: dict[str, Any] | None = None,
               train_seconds: float = 10.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run record in the documented format (results/README.md); metrics None: a failed run."""
    args = args or {}
    key = f"{task}/{attention}{''.join(f'-{k}{v}' for k, v in sorted(args.items()))}-seed{seed}-0123456789ab"
    record: dict[str, Any] = {
        "schema": sweep.SCHEMA, "kind": sweep.KIND, "key": key, "preset": "test",
        "cell": {"task": task, "attention": attention, "attention_args": args, "overrides": {},
                 "settings": {}, "seed": seed, "timeout": 60},
        "roles": {"self": attention}, "seed": seed, "device": "cpu",
        "timings": {"train_seconds": train_seconds, "eval_seconds": 1.0, "total_seconds": train_seconds + 2},
        "provenance": {"attnbench": "test"},
    }
    if metrics is None:
        record.update(status="error", error="RuntimeError: diverged")
    else:
        record.update(status="ok", metrics=metrics, metric_directions=directions, parameters=1000,
                      attention_parameters=0, peak_memory_mib=50.0, process_peak_rss_mib=300.0,
                      extra=extra or {})
    return record


def efficiency_record(attention: str, length: int, ms: float | None) -> dict[str, Any]:
    """An efficiency record (results/README.md); ms None: out of memory."""
    record: dict[str, Any] = {
        "schema": efficiency.SCHEMA, "kind": "efficiency", "run_id": "20260101-000000-abcdef",
        "cell": {"attention": attention, "attention_args": {}, "pattern": "causal_self", "length": length,
                 "batch": 1, "heads": 2, "head_dim": 8, "dtype": "float32", "device": "cpu",
                 "scope": "core"},
        "settings": {"warmup": 1, "repeats": 3, "timer": "perf_counter"}, "provenance": {},
    }
    if ms is None:
        record.update(status="oom", error="OutOfMemoryError: out of memory")
    else:
        record.update(status="ok", metrics={"forward_ms": ms / 3, "forward_backward_ms": ms,
                                            "forward_peak_mib": ms, "forward_backward_peak_mib": 2 * ms,
                                            "parameters": 0})
    return record


TS = {"mse": "lower", "mae": "lower"}
PC = {"cd_l1": "lower", "cd_l2": "lower", "f_score": "higher"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """time_series: softmax (2 seeds), lavo (1 ok, 1 failed), linear; point_cloud: softmax and
    lavo; fixture_lm (not installed: directions from the records) with its curves; toy: LAVO at
    three of the four (r, w) pairs; efficiency: softmax and lavo (out of memory at 1024)."""
    root = tmp_path_factory.mktemp("results")
    records = [
        run_record("time_series", "softmax", 0, {"mse": 1.0, "mae": 0.5}, TS, train_seconds=10.0),
        run_record("time_series", "softmax", 1, {"mse": 3.0, "mae": 0.7}, TS, train_seconds=12.0),
        run_record("time_series", "lavo", 0, {"mse": 4.0, "mae": 0.9}, TS, train_seconds=4.0),
        run_record("time_series", "lavo", 1, None, TS),
        run_record("time_series", "linear", 0, {"mse": 3.0, "mae": 0.3}, TS, train_seconds=5.0),
        run_record("point_cloud", "softmax", 0, {"cd_l1": 1.0, "cd_l2": 2.0, "f_score": 0.5}, PC),
        run_record("point_cloud", "lavo", 0, {"cd_l1": 3.0, "cd_l2": 4.0, "f_score": 0.7}, PC),
        run_record("fixture_lm", "softmax", 0, {"ppl": 10.0}, {"ppl": "lower"},
                   extra={"extrapolation": {"512": 10.0, "1024": 12.0, "2048": 30.0},
                          "perplexity_by_position": [{"position": 512, "perplexity": 11.0},
                                                     {"position": 4096, "perplexity": 40.0}]}),
        run_record("fixture_lm", "lavo", 0, {"ppl": 20.0}, {"ppl": "lower"},
                   extra={"extrapolation": [{"length": 512, "perplexity": 20.0},
                                            {"length": 2048, "perplexity": 21.0}]}),
        run_record("toy", "lavo", 0, {"acc": 0.5}, {"acc": "higher"}, args={"r": 8, "w": 4}),
        run_record("toy", "lavo", 0, {"acc": 0.6}, {"acc": "higher"}, args={"r": 8, "w": 8}),
        run_record("toy", "lavo", 0, {"acc": 0.7}, {"acc": "higher"}, args={"r": 16, "w": 4}),
    ]
    for record in records:
        write_record(root / "runs" / f"{record['key']}.json", record)
    for attention, timings in (("softmax", {256: 1.0, 512: 4.0, 1024: 16.0}),
                               ("lavo", {256: 1.0, 512: 2.0, 1024: None})):
        for length, ms in timings.items():
            write_record(root / "efficiency" / "20260101-000000-abcdef" / f"{attention}-L{length}.json",
                         efficiency_record(attention, length, ms))
    return root


@pytest.fixture(scope="module")
def summary(results: Path):
    return metric_summary(run_metrics(run_records(results)))


def value(summary, task: str, label: str, metric: str, column: str) -> float:
    row = summary[(summary.task == task) & (summary.label == label) & (summary.metric == metric)]
    assert len(row) == 1, (task, label, metric)
    return float(row[column].iloc[0])


def test_task_table_means_spreads_and_counts(summary) -> None:
    assert value(summary, "time_series", "softmax", "mse", "mean") == pytest.approx(2.0)
    assert value(summary, "time_series", "softmax", "mse", "std") == pytest.approx(math.sqrt(2.0))
    assert value(summary, "time_series", "softmax", "mae", "mean") == pytest.approx(0.6)
    assert value(summary, "time_series", "softmax", "mae", "std") == pytest.approx(math.sqrt(0.02))
    assert value(summary, "time_series", "softmax", "mse", "n") == 2
    assert value(summary, "time_series", "lavo", "mse", "mean") == pytest.approx(4.0)
    assert math.isnan(value(summary, "time_series", "lavo", "mse", "std"))
    assert value(summary, "time_series", "lavo", "mse", "n") == 1
    assert value(summary, "time_series", "lavo", "mse", "runs") == 2  # the failed seed counts
    assert value(summary, "point_cloud", "lavo", "f_score", "mean") == pytest.approx(0.7)

    table = next(t for t in task_tables(summary) if t.name == "task_time_series")
    assert table.header == ["attention", "ok/runs", "mse ↓", "mae ↓"]  # the task's declared order
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["softmax"] == ["2/2", "2 ± 1.4 (2)", "0.6 ± 0.14 (2)"]
    assert rows["lavo"] == ["1/2", "4 (1)", "0.9 (1)"]
    assert rows["linear"] == ["1/1", "3 (1)", "0.3 (1)"]
    assert "\\pm" in table.latex() and "mse $\\downarrow$" in table.latex()


def test_compositional_index_matches_hand_computation(summary) -> None:
    # time_series, mse means 2, 4, 3 and mae means 0.6, 0.9, 0.3: z = -+1.22 / +-1.22 / 0,
    # negated (lower is better), averaged over the two metrics.
    scores = task_scores(summary).set_index(["task", "label"])["score"]
    assert scores[("time_series", "softmax")] == pytest.approx((SQRT_1_5 + 0.0) / 2)
    assert scores[("time_series", "lavo")] == pytest.approx((-SQRT_1_5 - SQRT_1_5) / 2)
    assert scores[("time_series", "linear")] == pytest.approx((0.0 + SQRT_1_5) / 2)
    # point_cloud, two attentions: z = +-1; cd_l1 and cd_l2 favour softmax, f_score lavo.
    assert scores[("point_cloud", "softmax")] == pytest.approx(1 / 3)
    assert scores[("point_cloud", "lavo")] == pytest.approx(-1 / 3)
    assert scores[("fixture_lm", "softmax")] == pytest.approx(1.0)  # directions from the lm records
    # toy: acc 0.5, 0.6, 0.7 across three LAVO settings (higher is better).
    assert scores[("toy", "lavo(r=16,w=4)")] == pytest.approx(SQRT_1_5)

    index = compositional_index(summary).set_index("label")
    assert index.loc["softmax", "index"] == pytest.approx((SQRT_1_5 / 2 + 1 / 3 + 1.0) / 3)
    assert index.loc["lavo", "index"] == pytest.approx((-SQRT_1_5 - 1 / 3 - 1.0) / 3)
    assert index.loc["linear", "index"] == pytest.approx(SQRT_1_5 / 2)
    assert index.loc["linear", "tasks"] == 1
    assert list(compositional_index(summary, ["point_cloud"])["label"]) == ["softmax", "lavo"]


def test_index_table_takes_one_configuration_per_mechanism(summary) -> None:
    # toy has LAVO at three (r, w), one run each, none the defaults: the first label stands for
    # lavo there, alone, so its z-score is 0; the sweep does not enter as three attentions.
    chosen = representatives(summary)
    toy = chosen[chosen.task == "toy"]
    assert list(toy["label"]) == ["lavo"] and list(toy["mean"]) == [pytest.approx(0.7)]
    table = index_table(summary)
    rows = {row[0]: row[1:] for row in table.rows}
    assert set(rows) == {"softmax", "lavo", "linear"}
    # CAB's rule: the index runs over the tasks every attention has (linear: time_series only).
    assert "over the tasks every attention has (time_series)" in table.title
    scores = task_scores(chosen).set_index(["label", "task"])["score"]
    assert rows["lavo"][:2] == [f"{scores[('lavo', 'time_series')] + 0.0:.3f}", "1"]
    assert rows["linear"] == [f"{SQRT_1_5 / 2:.3f}", "1", "n/a", "n/a", f"{SQRT_1_5 / 2:.3f}", "n/a"]


def test_pattern_leaderboards_hold_the_tasks_of_each_pattern(summary) -> None:
    # point_cloud exercises no causal pattern; time_series no causal cross; fixture_lm is not installed.
    causal = leaderboard(summary, Pattern.CAUSAL_SELF)
    assert {task for task, _ in causal.columns} == {"time_series", "CI"}
    assert causal.loc["lavo", ("time_series", "mse")] == pytest.approx(4.0)
    assert causal.loc["softmax", ("CI", "")] == pytest.approx(SQRT_1_5 / 2)
    noncausal = leaderboard(summary, Pattern.NONCAUSAL_SELF)
    assert {task for task, _ in noncausal.columns} == {"time_series", "point_cloud", "CI"}
    assert noncausal.loc["softmax", ("CI", "")] == pytest.approx((SQRT_1_5 / 2 + 1 / 3) / 2)
    # linear lacks point_cloud: as in CAB's boards, no CI from a subset of the pattern's tasks.
    assert math.isnan(noncausal.loc["linear", ("CI", "")])
    assert leaderboard(summary, Pattern.CAUSAL_CROSS).empty


def test_efficiency_keeps_out_of_memory_cells_and_fits_slopes(results: Path) -> None:
    points = efficiency_points(efficiency_records(results))
    assert len(points) == 6
    lavo = points[points.label == "lavo"].set_index("length")
    assert lavo.loc[1024, "status"] == "oom"
    assert plots._slope_label("softmax", [256, 512, 1024], [1.0, 4.0, 16.0]) == "softmax (slope 2.00)"


def test_colours_are_one_per_attention_and_stable() -> None:
    names = list_attentions()
    colours = [plots.attention_colour(n) for n in names]
    assert len(set(colours)) == min(len(names), len(plots.PALETTE))
    assert plots.attention_colour("lavo(r=8,w=4)") == plots.attention_colour("lavo")


def test_report_writes_every_table_and_figure(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out), "--paper"]) == 0
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {
        "efficiency_causal_self_core_cpu_float32.png", "sensitivity_toy.png", "extrapolation_fixture_lm.png",
        "perplexity_by_position_fixture_lm.png", "pareto_time_series.png", "pareto_point_cloud.png",
        "pareto_fixture_lm.png", "pareto_toy.png"}
    for png in [*(out / "figures").glob("*.png"), out / "paper" / "lavo_efficiency.png"]:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    for name in ("task_time_series", "leaderboard_causal_self", "compositional_index"):
        assert (out / "tables" / f"{name}.md").read_text().startswith("### ")
        assert "\\begin{tabular}" in (out / "tables" / f"{name}.tex").read_text()
    index = (out / "index.md").read_text()
    assert "figures/sensitivity_toy.png" in index and "12 run records, 6 efficiency cells" in index
    page = (out / "index.html").read_text()
    # One self-contained page: every figure inline, nothing loaded from beside it.
    assert page.count("<img src='data:image/png;base64,") == 9 and "src='figures/" not in page
    assert "<table class='sortable'>" in page and "<script>" in page and "<style>" in page


def test_tables_mark_the_best_value_of_each_column(summary) -> None:
    table = next(t for t in task_tables(summary) if t.name == "task_time_series")
    rows = [row[0] for row in table.rows]
    # mse: softmax 2 < linear 3 < lavo 4; mae: linear 0.3 is least (columns 2 and 3).
    assert table.best == {(rows.index("softmax"), 2), (rows.index("linear"), 3)}
    assert table.values[rows.index("lavo")][2:] == [4.0, 0.9]
    assert "| softmax | 2/2 | **2 ± 1.4 (2)** |" in table.markdown()
    board = next(t for t in leaderboard_tables(summary) if t.name == "leaderboard_causal_self")
    assert board.header == ["attention", "time_series mse ↓", "CI ↑"]
    labels = [row[0] for row in board.rows]
    softmax, linear = labels.index("softmax"), labels.index("linear")
    assert board.rows[softmax][1] == "2 ± 1.4 (2)" and (softmax, 1) in board.best
    assert {(softmax, 2), (linear, 2)} <= board.best  # equal CI (sqrt(1.5) / 2): both marked


def test_cost_metrics_stay_out_of_leaderboards_and_the_index() -> None:
    declared = [{"name": "accuracy", "kind": "quality", "direction": "higher"},
                {"name": "tokens_per_second", "kind": "cost", "direction": "higher"},
                {"name": "length_ratio", "kind": "diagnostic", "direction": "lower"}]
    records = []
    for attention, accuracy, speed in (("softmax", 0.9, 100.0), ("lavo", 0.8, 900.0)):
        record = run_record("time_series", attention, 0, {"accuracy": accuracy, "tokens_per_second": speed,
                                                           "length_ratio": 1.0, "other": 5.0}, {})
        record["declared_metrics"] = declared
        records.append(record)
    summary = metric_summary(run_metrics(records))
    assert dict(zip(summary.metric, summary.kind)) == {
        "accuracy": "quality", "tokens_per_second": "cost", "length_ratio": "diagnostic", "other": "extra"}
    # The index ranks by accuracy alone (z = +-1), although lavo is nine times faster.
    scores = task_scores(summary).set_index("label")["score"].to_dict()
    assert scores == pytest.approx({"lavo": -1.0, "softmax": 1.0})
    board = leaderboard(summary, Pattern.NONCAUSAL_SELF)
    assert list(board.columns) == [("time_series", "accuracy"), ("CI", "")]
    quality, extra = task_tables(summary)
    assert quality.header == ["attention", "ok/runs", "accuracy ↑", "length_ratio"]
    assert extra.header == ["attention", "ok/runs", "other"]
    (cost,) = cost_tables(summary, run_costs(records))
    assert cost.header == ["attention", "ok/runs", "train s ↓", "total s ↓", "peak MiB ↓", "parameters",
                           "tokens_per_second ↑"]
    speeds = [row[-1] for row in cost.rows]
    assert speeds == ["900 (1)", "100 (1)"] and (0, 6) in cost.best  # lavo (sorted first) is fastest


def rows_of(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines[1:])}


def test_paper_layouts_mark_missing_cells(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    build_report(results, out, paper_layouts=True)
    paper = out / "paper"
    cab = rows_of((paper / "cab_causal_self.md").read_text())
    header = (paper / "cab_causal_self.md").read_text().splitlines()[2]
    assert "lm perplexity" in header and "tts_transformer mcd" in header  # with no records: n/a columns
    assert set(cab) == set(list_attentions(Pattern.CAUSAL_SELF))
    assert "n/a" in cab["softmax"] and "4" in cab["lavo"]
    assert all(cell == "n/a" for cell in cab["cosformer"])
    extrapolation = rows_of((paper / "lavo_extrapolation.md").read_text())
    assert extrapolation["softmax"] == ["10", "12", "30"]
    assert extrapolation["lavo"] == ["20", "n/a", "21"]
    assert extrapolation["linear"] == ["n/a", "n/a", "n/a"]
    timing = rows_of((paper / "lavo_efficiency.md").read_text())
    assert timing["softmax"][2] == "16 ms / 32 MiB"
    assert timing["lavo"][2] == "OOM"
    assert timing["linear"] == ["n/a"] * 3
    assert "| toy acc ↑ | 8 | 0.5 | 0.6 |" in (paper / "lavo_ablation.md").read_text()
    assert "| toy acc ↑ | 16 | 0.7 | n/a |" in (paper / "lavo_ablation.md").read_text()


def test_empty_results_report_says_so(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    report = build_report(tmp_path / "results", tmp_path / "out", paper_layouts=True)
    assert report.figures == []
    text = (tmp_path / "out" / "index.md").read_text()
    assert "No run records" in text and "No efficiency records" in text
    assert "n/a" in (tmp_path / "out" / "paper" / "lavo_extrapolation.md").read_text()


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = pd.DataFrame({"label": ["a", "b", "c", "d"], "cost": [1.0, 2.0, 3.0, 4.0],
                           "quality": [0.9, 0.5, 0.7, 0.4]})
    assert list(plots.pareto_front(points, higher_is_better=False)["label"]) == ["a", "b", "d"]
    assert list(plots.pareto_front(points, higher_is_better=True)["label"]) == ["a"]


def test_report_of_a_missing_folder_names_it(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert re.search(r"no results folder .*nowhere", capsys.readouterr().err)


def test_report_refuses_a_folder_without_records(tmp_path: Path, capsys) -> None:
    from runners.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no records" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_one_seed_smoke_records_are_said_to_rank_nothing(results: Path) -> None:
    from analysis.report import smoke_warning

    records = run_records(results)
    metrics = run_metrics(records)
    assert smoke_warning(records, metrics) == ""  # softmax has two seeds on time_series
    smoke = [{**r, "preset": "smoke"} for r in records]
    assert "rank nothing" in smoke_warning(smoke, metrics)
    one_seed = metrics[metrics["seed"] == 0]
    assert "one seed per comparison" in smoke_warning(records, one_seed)


def test_cell_lines_show_settings_that_differ_from_the_defaults_within_a_width() -> None:
    from runners.summary import describe_cell, short_settings

    assert short_settings("mqar", {"d_model": 64, "lr": 0.003}) == ""  # both are the defaults
    many = {"d_model": 128, "lr": 0.01, "vocab_size": 256, "heldout": "128:16,256:32,512:64",
            "steps": 5, "batch_size": 7, "seq_len": 32, "kv_pairs": 4}
    text = short_settings("mqar", many)
    assert len(text) <= 60 and text.endswith("more")
    cell = {"task": "mqar", "attention": "lavo", "attention_args": {"memory": "kv"},
            "overrides": many, "seed": 0}
    assert len(describe_cell(cell)) <= 85
