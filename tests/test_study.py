"""Studies: the file is checked before anything runs, a tuned stage chooses on the validation
metric from the records alone (failed candidates never chosen, nothing final until every
candidate has a record), the extra seeds run at the choice, and the report's statistics."""

from __future__ import annotations

import dataclasses
import math

import pytest

from runners.matrix import MatrixConfigError
from runners.study import choose, parse_study, run_stage, seed_cells, stage_cells

pytestmark = pytest.mark.runner

TINY = {"vocab_size": 32, "seq_len": 16, "kv_pairs": 2, "heldout": "32:4", "train_examples": 64,
        "test_examples": 20, "d_model": 16, "heads": 2, "steps": 5, "batch_size": 16}


def _study(**tune):
    return parse_study({"description": "d", "stages": [{
        "name": "tuned", "tune": {"over": "lr", "metric": "validation_accuracy", "seeds": [1, 2],
                                  **tune},
        "blocks": [{"task": "mqar", "attention": ["softmax", "linear"], "seed": 0,
                    "settings": {**TINY, "lr": [0.001, 0.01, 0.1]}}]}]}, name="t")


def _record(cell, value, status="ok"):
    return {"key": cell.key, "status": status, "metrics": {"validation_accuracy": value,
                                                           "accuracy": value}}


def test_a_tuned_stage_chooses_on_validation_and_skips_failed_candidates():
    stage = _study().stages[0]
    cells = stage_cells(stage)
    assert len(cells) == 6 and {c.seed for c in cells} == {0}
    scores = {("softmax", 0.001): 0.2, ("softmax", 0.01): 0.9, ("softmax", 0.1): 0.95,
              ("linear", 0.001): 0.3, ("linear", 0.01): 0.4, ("linear", 0.1): 0.99}
    records = {c.key: _record(c, scores[(c.attention, c.settings["lr"])]) for c in cells}
    linear_best = next(c for c in cells if c.attention == "linear" and c.settings["lr"] == 0.1)
    records[linear_best.key]["status"] = "error"  # diverged: never chosen
    chosen = {c.cell.attention: c.cell.settings["lr"] for c in choose(cells, records, stage.tuning)}
    assert chosen == {"softmax": 0.1, "linear": 0.01}
    extra = seed_cells(choose(cells, records, stage.tuning), stage.tuning)
    assert sorted((c.attention, c.seed, c.settings["lr"]) for c in extra) == [
        ("linear", 1, 0.01), ("linear", 2, 0.01), ("softmax", 1, 0.1), ("softmax", 2, 0.1)]


def test_no_extra_seeds_until_every_candidate_has_a_record():
    stage = _study().stages[0]
    cells = stage_cells(stage)
    records = {c.key: _record(c, 0.5) for c in cells[:2]}  # softmax: two of three lrs
    choices = choose(cells, records, stage.tuning)
    assert choices and not any(c.complete for c in choices)
    assert seed_cells(choices, stage.tuning) == []


def test_lower_is_better_flips_the_choice():
    stage = _study(lower_is_better=True).stages[0]
    cells = stage_cells(stage)
    records = {c.key: _record(c, c.settings["lr"]) for c in cells}
    assert {c.cell.settings["lr"] for c in choose(cells, records, stage.tuning)} == {0.001}


def test_run_stage_resumes_to_the_same_choice(tmp_path, monkeypatch):
    stage = _study().stages[0]
    records: dict[str, dict] = {}
    ran: list[list] = []

    def runner(cells, label):
        todo = [c for c in cells if c.key not in records]
        ran.append(todo)
        for cell in todo:
            records[cell.key] = _record(cell, cell.settings["lr"] if cell.attention == "linear"
                                        else 1 - cell.settings["lr"])

    monkeypatch.setattr("runners.study.stage_records", lambda folder, cells: {
        c.key: records[c.key] for c in cells if c.key in records})
    first = run_stage(stage, "t", tmp_path, runner)
    again = run_stage(stage, "t", tmp_path, runner)
    assert [len(batch) for batch in ran] == [6, 4, 0, 0]
    assert {c.key for c in first} == {c.key for c in again}
    stage_result = pytest.importorskip("analysis.study").stage_result  # the analysis extra
    result = stage_result(_study(), stage, records)
    assert {g.label: g.chosen for g in result.groups} == {"linear": 0.1, "softmax": 0.001}
    assert all(g.runs() == 3 for g in result.groups)


@pytest.mark.parametrize(("data", "message"), [
    ({"stages": []}, "no stages"),
    ({"stages": [{"name": "a", "blocks": [{"task": "mqar"}]}] * 2}, "stage names repeat"),
    ({"stages": [{"name": "a", "tune": {"over": "lr"}, "blocks": [{"task": "mqar"}]}]},
     "tune needs"),
    ({"stages": [{"name": "a", "blocks": [{"task": "mqar"}], "seeds": 3}]}, "unknown key 'seeds'"),
    ({"stages": [{"name": "a", "tune": {"over": "lr", "metric": "m", "sedes": [1]},
                  "blocks": [{"task": "mqar"}]}]}, "unknown key 'sedes'"),
])
def test_bad_study_files_are_refused_naming_the_problem(data, message):
    with pytest.raises(MatrixConfigError, match=message):
        parse_study(data, name="bad")


def test_tuning_a_setting_the_task_lacks_is_refused():
    study = parse_study({"stages": [{"name": "a", "tune": {"over": "learning_rate", "metric": "m"},
                                     "blocks": [{"task": "mqar", "attention": "softmax"}]}]},
                        name="bad")
    with pytest.raises(MatrixConfigError, match="tunes 'learning_rate'"):
        stage_cells(study.stages[0])


def test_welch_and_holm():
    study = pytest.importorskip("analysis.study")  # the analysis extra (scipy, pandas)
    holm, mean_std, verdict, welch = study.holm, study.mean_std, study.verdict, study.welch
    assert welch([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3
    assert welch([1.0, 1.0], [1.0, 1.0]) != welch([1.0, 1.0], [1.0, 1.0])  # NaN: no spread
    assert holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06],
                                                              nan_ok=True)
    assert verdict([0.9, 0.8, 0.85], [0.1, 0.2, 0.15], 0.0005, 0.001).startswith("higher")
    assert "no evidence (p=0.01, Holm 0.09)" in verdict([0.9, 0.8], [0.1, 0.2], 0.01, 0.09)
    assert verdict([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], math.nan, math.nan) == "differs (no spread)"
    assert verdict([1.0], [0.5, 0.5], 0.5, 0.5) == "n < 2"
    assert mean_std([0.5, 0.7]) == "0.6 ± 0.14 (2)"


def test_the_shipped_mqar_study_covers_every_causal_mechanism_at_two_widths():
    from attention_zoo import list_attentions
    from runners.study import load_study, study_names

    assert "mqar" in study_names()
    study = load_study("mqar")
    causal = set(list_attentions(pattern="causal_self"))
    for stage in study.stages:
        cells = stage_cells(stage)
        if stage.tuning is not None:
            assert {c.attention for c in cells} == causal
            assert len({c.settings["lr"] for c in cells}) >= 3
            assert {c.settings["d_model"] for c in cells} in ({64}, {128})
            assert stage.tuning.metric == "validation_accuracy" and len(stage.tuning.seeds) == 2
    with pytest.raises(MatrixConfigError, match=r"unknown study 'mqr'; shipped: .*mqar"):
        load_study("mqr")


def test_ties_go_to_the_lower_tie_break_then_to_the_file_order():
    stage = _study(tie_break="final_train_loss").stages[0]
    cells = stage_cells(stage)
    records = {c.key: {**_record(c, 1.0 if c.settings["lr"] < 0.1 else 0.5),
                       "extra": {"final_train_loss": 0.3 if c.settings["lr"] == 0.001 else 0.01}}
               for c in cells}
    assert {c.cell.settings["lr"] for c in choose(cells, records, stage.tuning)} == {0.01}
    plain = _study().stages[0]  # no tie-break: the first candidate of the file
    assert {c.cell.settings["lr"] for c in choose(cells, records, plain.tuning)} == {0.001}


def test_the_study_page_reports_the_protocols_cells_from_records(tmp_path):
    """attnbench report's study page: a tuned stage's row holds the chosen rate's seeds, and
    the page says how many of the protocol's runs it has."""
    report = pytest.importorskip("analysis.study")
    from runners.study import load_study

    stage = load_study("mqar").stages[0]
    cells = [c for c in stage_cells(stage) if c.attention in ("softmax", "lavo")]
    records = []
    for cell in cells:  # softmax best at the middle rate, lavo at the first
        best = cell.settings["lr"] == (0.00215 if cell.attention == "softmax" else 0.000464)
        records.append({**_record(cell, 0.9 if best else 0.2), "preset": "study-mqar/width64",
                        "cell": cell.to_json()})
    chosen = [c for c in cells if records[cells.index(c)]["metrics"]["accuracy"] == 0.9]
    for cell in chosen:
        for seed in (1, 2):
            extra = dataclasses.replace(cell, seed=seed)
            records.append({**_record(extra, 0.8 + 0.05 * seed), "preset": "study-mqar/width64",
                            "cell": extra.to_json()})
    page = report.build_study_report(records, tmp_path, command="attnbench report x")
    text = page.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| softmax | 0.00215"))
    assert "(3)" in row  # three seeds at the chosen rate
    assert "| lavo | 0.000464 |" in text
    assert "runs reported of" in text and "Bold: the chosen lr." in text
