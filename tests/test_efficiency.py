"""The efficiency benchmark's measurement: interleaving, spread, load, a quiet profiler."""

from __future__ import annotations

import json

from runners import efficiency
from runners.cli import main
from runners.efficiency import EfficiencyCell, measure_group, spread


def test_spread_reports_median_minimum_and_interquartile_range():
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "min": 1.0, "iqr": 2.0}
    assert spread([7.0]) == {"median": 7.0, "min": 7.0, "iqr": 0.0}


def test_cells_of_one_group_take_turns_call_by_call(monkeypatch):
    calls: list[tuple[str, str]] = []

    def fake_prepare(cell):
        def record(kind):
            return lambda: calls.append((cell.attention, kind))
        return efficiency._Prepared(record("forward"), record("forward_backward"), [], [])

    monkeypatch.setattr(efficiency, "prepare", fake_prepare)
    monkeypatch.setattr(efficiency, "peak_mib", lambda fn, device: 0.0)
    cells = [EfficiencyCell(attention=name, pattern="causal_self", length=8)
             for name in ("a", "b", "c")]
    results = measure_group(cells, warmup=1, repeats=3)
    forward = [name for name, kind in calls if kind == "forward"]
    # Four rounds (1 warm-up + 3 timed), each cell once per round, the first cell rotating.
    assert forward == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [name for name, kind in calls if kind == "forward_backward"] == forward
    for result in results:
        assert len(result["forward_ms_repeats"]) == 3
        assert result["forward_ms_min"] <= result["forward_ms"]
        assert len(result["load_average"]["before"]) == 3


def test_a_failing_cell_is_recorded_and_the_others_go_on(monkeypatch):
    def fake_prepare(cell):
        def call():
            if cell.attention == "broken":
                raise RuntimeError("boom")
        return efficiency._Prepared(call, call, [], [])

    monkeypatch.setattr(efficiency, "prepare", fake_prepare)
    monkeypatch.setattr(efficiency, "peak_mib", lambda fn, device: 0.0)
    cells = [EfficiencyCell(attention=name, pattern="causal_self", length=8)
             for name in ("broken", "fine")]
    broken, fine = measure_group(cells, warmup=0, repeats=2)
    assert isinstance(broken, RuntimeError)
    assert len(fine["forward_backward_ms_repeats"]) == 2


def test_records_carry_spread_and_load_and_the_profiler_stays_quiet(tmp_path, capfd):
    code = main(["efficiency", "--attention", "lavo,softmax", "--patterns", "causal_self",
                 "--lengths", "16", "--heads", "2", "--head-dim", "8", "--repeats", "3",
                 "--warmup", "1", "--device", "cpu", "--results-dir", str(tmp_path)])
    assert code == 0
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert {r["cell"]["attention"] for r in records} == {"lavo", "softmax"}
    for record in records:
        metrics = record["metrics"]
        assert metrics["forward_backward_ms_min"] <= metrics["forward_backward_ms"]
        assert metrics["forward_backward_ms_iqr"] >= 0
        assert record["settings"]["interleaved"] is True
        assert len(record["load_average"]["after"]) == 3 and "load_average" not in metrics
    output = capfd.readouterr()
    assert "USDT" not in output.out and "profiler_start" not in output.err


def test_gpu_suite_commands_parse_and_it_refuses_to_start_without_cuda(tmp_path, monkeypatch, capsys):
    from runners import gpu_suite
    from runners.cli import build_parser

    parsed = build_parser().parse_args(gpu_suite.efficiency_arguments(tmp_path, gpu_suite.SUITE_LENGTHS))
    assert parsed.attention == "lavo,sdpa" and parsed.lengths[-1] == 131072 and parsed.compare_fla
    assert parsed.attention_args == [f"lavo:{v}" for v in gpu_suite.LAVO_VARIANTS]
    assert "lavo:memory=kv,backend=triton" in parsed.attention_args
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_suite.main(["--out", str(tmp_path / "figures.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "figures.md").exists()


def test_variants_of_one_mechanism_are_measured_side_by_side(tmp_path):
    code = main(["efficiency", "--attention", "lavo", "--attention-args", "lavo:memory=kv,backend=torch",
                 "--attention-args", "lavo:memory=kv,backend=chunked", "--patterns", "causal_self",
                 "--lengths", "16", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu", "--results-dir", str(tmp_path)])
    assert code == 0
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert sorted(r["cell"]["attention_args"]["backend"] for r in records) == ["chunked", "torch"]


def test_a_length_bound_hyperparameter_follows_the_timed_length():
    from runners.efficiency import default_cells, length_bound

    assert length_bound("cosformer") == ("max_length",) and length_bound("softmax") == ()
    shape = {"heads": 1, "head_dim": 4}
    cells = default_cells(["cosformer"], ["causal_self"], [8, 16], **shape)
    assert [c.built_args for c in cells] == [{"max_length": 8}, {"max_length": 16}]
    assert all(c.attention_args == {} for c in cells)  # one row in the table, not one per length
    # set by the user, it stays as set, and a longer cell fails saying why
    fixed = default_cells(["cosformer"], ["causal_self"], [8, 16],
                          attention_args={"cosformer": [{"max_length": 8}]}, **shape)
    assert [c.built_args for c in fixed] == [{"max_length": 8}, {"max_length": 8}]
    short, long = (measure_group([cell], warmup=0, repeats=1)[0] for cell in fixed)
    assert isinstance(short, dict) and "exceeds max_length=8" in str(long)


def _record(name: str, args: dict, length: int, ms: float | None) -> dict:
    cell = {"attention": name, "attention_args": args, "pattern": "causal_self", "length": length,
            "scope": "core", "follows_length": ["max_length"] if name == "cosformer" else []}
    if ms is None:
        return {"cell": cell, "status": "error",
                "error": f"ValueError: {name}: a causal sequence of {length} tokens is too long"}
    metrics = {"forward_ms": ms, "forward_backward_ms": 3 * ms, "forward_backward_ms_iqr": ms / 9,
               "forward_backward_peak_mib": ms / 2}
    return {"cell": cell, "status": "ok", "metrics": metrics}


def test_the_table_names_every_variant_in_full_within_100_columns():
    from rich.console import Console

    from runners.commands.efficiency import summary_table

    lengths = [512, 1024, 2048, 4096, 8192, 16384, 32768]
    variants = [("softmax", {}), ("gated_deltanet", {}), ("cosformer", {}),
                ("lavo", {"memory": "kv", "backend": "chunked"}), ("lavo", {"memory": "input"})]
    records = [_record(name, args, n, None if name == "gated_deltanet" and n > 8192 else 300.0 * 2.1**i)
               for name, args in variants for i, n in enumerate(lengths)]
    console = Console(width=100, record=True, soft_wrap=True)  # as make_console's
    console.print(summary_table(records, lengths))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text and "forward+backward median ms, ± its IQR" in text
    for label in ("lavo(backend=chunked,memory=kv)", "lavo(memory=input)", "gated_deltanet"):
        assert label in text
    assert "[1] lavo(backend=chunked,memory=kv)" in text and "lavo [2]" in text
    assert "ERROR [a]" in text and "[a] gated_deltanet L=16384: ValueError" in text
    assert "cosformer: max_length = the timed length L" in text
