"""The matrix runner: presets and overrides expand and validate before anything runs; every cell
writes one record; failures are recorded and the sweep goes on; a killed sweep resumes without
recomputing or losing anything; submitit's (local) executor writes the same records.

The cells run a small real task, next-value regression of sine waves with one attention layer,
installed for the test as a distribution with an ``attnbench.tasks`` entry point."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attention_zoo import AttentionConfigError
from runners.cli import main
from runners.matrix import Cell, MatrixConfigError, load_preset, plan, preset_names
from runners.records import read_records
from runners.summary import parameter_flags
from runners.sweep import record_path, run_local

pytestmark = pytest.mark.runner

TASK_SOURCE = '''
"""Next-value regression: predict x[t+1] from x[<=t] for sine waves of random phase and frequency."""

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from attention_zoo import MultiHeadAttention, Pattern
from tasks.base import Metric, Task


@dataclass(frozen=True)
class NextValueConfig:
    steps: int = field(default=30, metadata={"min": 1})
    seq_len: int = field(default=16, metadata={"min": 2})
    d_model: int = field(default=16, metadata={"min": 1})
    heads: int = field(default=2, metadata={"min": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    lr: float = 0.01


def waves(n, config, generator, device):
    t = torch.arange(config.seq_len + 1, dtype=torch.float32)
    frequency = 0.2 + 0.6 * torch.rand(n, 1, generator=generator)
    phase = 6.28 * torch.rand(n, 1, generator=generator)
    x = torch.sin(frequency * t + phase)[..., None]  # [n, L + 1, 1]
    return x[:, :-1].to(device), x[:, 1:].to(device)


class Model(nn.Module):
    def __init__(self, config, choice):
        super().__init__()
        self.embed = nn.Linear(1, config.d_model)
        self.layer = MultiHeadAttention(config.d_model, config.heads, choice.name, pattern="causal_self",
                                        attention_args=dict(choice.args))
        self.head = nn.Linear(config.d_model, 1)

    def forward(self, x):
        h = self.embed(x)  # [B, L, E]
        return self.head(h + self.layer(h))  # [B, L, 1]


class NextValue(Task):
    name = "next_value"
    roles = {"self": Pattern.CAUSAL_SELF}
    metrics = (Metric("mse", higher_is_better=False), Metric("initial_mse", higher_is_better=False))
    Config = NextValueConfig

    def prepare(self, config, run):
        return waves(64, config, run.generator(), run.device)

    def build(self, config, attention, data, run):
        model = Model(config, attention["self"]).to(run.device)
        with torch.no_grad():
            run.extra["initial_mse"] = torch.mean((model(data[0]) - data[1]) ** 2).item()
        return model

    def train(self, model, config, data, run):
        generator = run.generator()
        optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
        for _ in range(config.steps):
            x, y = waves(config.batch_size, config, generator, run.device)
            loss = torch.mean((model(x) - y) ** 2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        log = os.environ.get("ATTNBENCH_TEST_LOG")
        if log:
            with open(log, "a") as stream:
                stream.write(f"done {run.attention['self'].label()} seed={run.seed} steps={config.steps}\\n")

    @torch.no_grad()
    def evaluate(self, model, config, data, run):
        return {"mse": torch.mean((model(data[0]) - data[1]) ** 2).item(),
                "initial_mse": run.extra["initial_mse"]}
'''


@pytest.fixture
def task_installed(tmp_path, monkeypatch):
    """The test task as an installed distribution: a module and a dist-info with entry points,
    on sys.path here and on PYTHONPATH for the processes the runner starts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "attnbench_test_task.py").write_text(TASK_SOURCE)
    info = site / "attnbench_test_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnbench-test-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnbench.tasks]\nnext_value = attnbench_test_task:NextValue\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("ATTNBENCH_TEST_LOG", str(tmp_path / "executions.log"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the cells are tiny: one thread each is fastest
    yield tmp_path
    sys.modules.pop("attnbench_test_task", None)


def write_preset(path: Path, **overrides) -> Path:
    preset = {
        "description": "test matrix",
        "defaults": {"seed": [0], "timeout": 120},
        "blocks": [
            {"task": "next_value", "attention": ["softmax", "lavo"], "attention_args": {"r": 4, "w": 4},
             "settings": {"steps": 5}},
            {"task": "not_installed_task"},
        ],
        **overrides,
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def records_of(results: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_records(results / "runs", kind="run")}


# Expansion and validation ---------------------------------------------------------------------


def test_overrides_sweep_and_deduplicate(task_installed):
    preset = write_preset(task_installed / "p.yaml")
    expansion = plan(preset, ["attention=lavo,softmax", "attention.r=4,8", "seed=1,2", "steps=3,7"])
    cells = expansion.cells
    # lavo: 2 r x 2 seeds x 2 steps; softmax has no r, so its copies collapse: 2 seeds x 2 steps.
    assert len(cells) == 8 + 4
    assert len({c.key for c in cells}) == len(cells)
    lavo = [c for c in cells if c.attention == "lavo"]
    assert sorted({c.attention_args["r"] for c in lavo}) == [4, 8]
    assert all(c.attention_args["w"] == 4 for c in lavo)  # from the preset, typed
    assert all(c.attention_args == {} for c in cells if c.attention == "softmax")
    assert {c.settings["steps"] for c in cells} == {3, 7}  # typed by the task's Config
    assert all(c.settings["seq_len"] == 16 for c in cells)  # the full resolved config
    assert any("skipped task 'not_installed_task': not installed" in n for n in expansion.notices)


def test_task_scoped_settings_and_all_attentions(task_installed):
    preset = write_preset(task_installed / "p.yaml")
    cells = plan(preset, ["attention=all", "next_value.seq_len=8"]).cells
    from attention_zoo import list_attentions

    assert sorted({c.attention for c in cells}) == list_attentions("causal_self")
    assert {c.settings["seq_len"] for c in cells} == {8}


def test_settings_variants_are_swept_each_on_its_own(task_installed):
    preset = write_preset(task_installed / "v.yaml", blocks=[{
        "task": "next_value", "attention": "softmax",
        "settings": [{"seq_len": 8, "steps": [1, 2]}, {"seq_len": 12}]}])
    shapes = sorted((c.settings["seq_len"], c.settings["steps"]) for c in plan(preset).cells)
    assert shapes == [(8, 1), (8, 2), (12, 30)]
    shapes = sorted((c.settings["seq_len"], c.settings["steps"]) for c in plan(preset, ["steps=5"]).cells)
    assert shapes == [(8, 5), (12, 5)]
    # Two blocks of one task (say, different seeds per dataset) both survive task=.
    two = write_preset(task_installed / "two.yaml", blocks=[
        {"task": "next_value", "attention": "softmax", "seed": [0, 1], "settings": {"seq_len": 8}},
        {"task": "next_value", "attention": "softmax", "seed": 2, "settings": {"seq_len": 12}}])
    cells = plan(two, ["task=next_value"]).cells
    assert sorted((c.settings["seq_len"], c.seed) for c in cells) == [(8, 0), (8, 1), (12, 2)]


def test_key_is_derived_from_the_resolved_config(task_installed):
    preset = write_preset(task_installed / "p.yaml")
    default, explicit = (plan(preset, extra).cells[0] for extra in ([], ["seq_len=16"]))
    assert default.key == explicit.key  # seq_len=16 is the default: the same cell
    lavo = [plan(preset, ["attention=lavo", *extra]).cells[0] for extra in ([], ["attention.bases=fixed"])]
    assert lavo[0].key == lavo[1].key and lavo[0].attention_args == {"r": 4, "w": 4}
    other = plan(preset, ["seq_len=12"]).cells[0]
    assert other.key != default.key and other.key.startswith("next_value/softmax-seed0-")
    assert Cell.from_json(json.loads(json.dumps(default.to_json()))).key == default.key


@pytest.mark.parametrize(("overrides", "message"), [
    (["stepz=3"], r"unknown override key 'stepz'.*next_value: steps, seq_len, d_model, heads, "
                  r"batch_size, lr"),
    (["steps=abc"], r"cannot read 'abc' as 'steps' \(int\)"),
    (["steps=0"], r"'steps' must be >= 1"),
    (["attention=lavoo"], r"unknown attention 'lavoo'; known: .*lavo.*softmax"),
    (["attention.q=1"], r"attention hyperparameter\(s\) q declared by none of the selected mechanisms "
                        r"\(lavo, softmax\); valid: backend, bases, combine, memory, position, r, w"),
    (["attention.w=wide"], r"cannot read 'wide' as 'w' \(int\)"),
    (["task=nope"], r"task=nope: not installed; installed: .*next_value"),
    (["nope.steps=1"], r"unknown task 'nope'; installed: .*next_value"),
    (["seed=x"], r"seed must be an integer, got 'x'"),
    (["timeout=-1"], r"timeout must be a positive finite number"),
    (["timeout=nan"], r"timeout must be a positive finite number of seconds or none, got 'nan'"),
    (["timeout=inf"], r"timeout must be a positive finite number"),
    (["seed=-1"], r"seed must be in 0 \.\. 2\*\*32 - 1 \(numpy's range\), got -1"),
    (["seed=1", "seed=2"], r"override seed is given twice \(seed=1 and seed=2\); give it once, "
                           r"with every value: seed=1,2"),
    (["steps"], r"override 'steps' is not KEY=VALUE"),
])
def test_bad_overrides_name_the_valid_choices(task_installed, overrides, message):
    preset = write_preset(task_installed / "p.yaml")
    with pytest.raises(AttentionConfigError, match=message):
        plan(preset, overrides)


def test_a_mechanism_lacking_every_task_pattern_is_refused(task_installed, scratch_registry):
    from attention_zoo import Pattern
    from attention_zoo.mechanisms.softmax import SoftmaxAttention

    @scratch_registry.register_attention("bidirectional_only")
    class BidirectionalOnly(SoftmaxAttention):
        """Non-causal self attention only."""

        patterns = frozenset({Pattern.NONCAUSAL_SELF})
        decoding = False

    preset = write_preset(task_installed / "p.yaml")
    assert "bidirectional_only" not in {c.attention for c in plan(preset, ["attention=all"]).cells}
    with pytest.raises(MatrixConfigError, match=r"'bidirectional_only' supports the roles of none of the "
                       r"selected tasks; skipped bidirectional_only for next_value: .*role 'self' needs "
                       r"causal_self attention"):
        plan(preset, ["attention=bidirectional_only,softmax"])


def test_bad_presets_name_the_valid_choices(task_installed):
    with pytest.raises(MatrixConfigError, match=r"unknown preset 'smok'; shipped: paper, smoke"):
        load_preset("smok")
    bad = write_preset(task_installed / "bad.yaml", blocks=[{"task": "next_value", "setings": {}}])
    with pytest.raises(MatrixConfigError,
                       match=r"block 1: unknown key 'setings'; valid: task, preset, settings"):
        load_preset(bad)
    typo = write_preset(task_installed / "typo.yaml",
                        blocks=[{"task": "next_value", "settings": {"lr": "x"}}])
    with pytest.raises(MatrixConfigError, match=r"cannot read 'x' as 'lr' \(float\)"):
        plan(typo)


def test_shipped_presets_validate_against_the_installed_tasks():
    """Every block of every shipped preset expands (settings, attentions, hyperparameters all
    valid for the installed tasks) or is skipped because its task is not installed."""
    assert {"smoke", "paper"} <= set(preset_names())
    for name in preset_names():
        expansion = plan(name)
        _, blocks = load_preset(name)
        covered = {c.task for c in expansion.cells}
        for block in blocks:
            assert block.task in covered or any(f"'{block.task}': not installed" in n
                                                for n in expansion.notices)


def test_errors_stop_the_run_before_any_cell(task_installed, capsys):
    preset = write_preset(task_installed / "p.yaml")
    results = task_installed / "results"
    assert main(["run", str(preset), "--results-dir", str(results), "seed=0", "stepz=1"]) == 2
    assert "unknown override key 'stepz'" in capsys.readouterr().err
    assert not results.exists()


# Running ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_cells_are_recorded_and_the_sweep_goes_on(task_installed, capsys):
    preset = write_preset(task_installed / "p.yaml")
    results = task_installed / "results"
    # heads=3 does not divide the width of 16: those cells fail inside the task.
    code = main(["run", str(preset), "attention=lavo", "heads=2,3", "steps=25", "--jobs", "2",
                 "--results-dir", str(results)])
    assert code == 1
    records = records_of(results)
    assert len(records) == 2
    for record in records.values():
        assert record["schema"] == "attnbench.run/1" and record["provenance"]["torch"]
        if record["cell"]["settings"]["heads"] == 3:
            assert record["status"] == "error"
            assert "not divisible by num_heads=3" in record["error"] and "Traceback" in record["traceback"]
        else:
            assert record["status"] == "ok", record.get("error")
            metrics = record["metrics"]
            assert math.isfinite(metrics["mse"]) and metrics["mse"] < metrics["initial_mse"]  # it learned
            assert record["parameters"] > record["attention_parameters"] >= 0
            assert record["timings"]["train_seconds"] > 0 and record["process_peak_rss_mib"] > 0
    out = capsys.readouterr().out
    assert "next_value [" in out and "mean ± std over seeds" in out and "failed" in out
    assert "skipped task 'not_installed_task'" in out


@pytest.mark.slow
def test_a_cell_past_its_timeout_is_stopped_and_recorded(task_installed):
    cell = plan(write_preset(task_installed / "p.yaml"), ["attention=softmax", "steps=1000000",
                                                           "timeout=1"]).cells[0]
    seen = []
    run_local([cell], task_installed / "results", on_done=lambda c, status, s: seen.append(status))
    record = json.loads(record_path(task_installed / "results", cell).read_text())
    assert seen == ["timeout"] and record["status"] == "timeout"
    assert "timeout of 1 s" in record["error"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_recomputing_or_losing(task_installed):
    preset = write_preset(task_installed / "p.yaml")
    results = task_installed / "results"
    log = task_installed / "executions.log"
    command = [sys.executable, "-m", "runners.cli", "run", str(preset), "seed=0,1", "steps=100",
               "--results-dir", str(results)]
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list((results / "runs").rglob("*.json")) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the coordinator and its cell processes, at once
        first.wait()
    before = {p: p.read_bytes() for p in (results / "runs").rglob("*.json")}
    assert 1 <= len(before) < 4, "the sweep should have been killed part-way"

    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(before)} already finished" in second.stdout
    after = {p: p.read_bytes() for p in (results / "runs").rglob("*.json")}
    assert len(after) == 4  # nothing lost
    assert all(after[p] == content for p, content in before.items())  # nothing rewritten
    finished = [line for line in log.read_text().splitlines() if line.startswith("done ")]
    assert len(finished) == len(set(finished)) == 4  # each cell computed to the end exactly once

    third = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "4 already finished" in third.stdout and "0 to run" in third.stdout
    assert len(log.read_text().splitlines()) == len(finished)


@pytest.mark.slow
def test_submitit_local_executor_writes_the_same_records(task_installed, capsys):
    preset = write_preset(task_installed / "p.yaml")
    results = task_installed / "results"
    base = ["run", str(preset), "--executor", "submitit-local", "--results-dir", str(results),
            "--slurm", "timeout_min=5"]
    # Followed to the end: the table comes back.
    assert main([*base, "attention=softmax"]) == 0
    assert "next_value [steps=5]: mean ± std over seeds" in capsys.readouterr().out
    # Submitted without waiting, then asked for again at once: not submitted twice.
    assert main([*base, "attention=lavo", "--no-wait"]) == 0
    assert main([*base, "attention=lavo", "--no-wait"]) == 0
    again = " ".join(capsys.readouterr().out.split())
    assert "1 cells were submitted earlier and have no record yet" in again or "1 already finished" in again
    deadline = time.time() + 90
    # The job drops its note once its record is written: wait for both.
    while ((len(records_of(results)) < 2 or list((results / "runs").rglob("*.submitted")))
           and time.time() < deadline):
        time.sleep(0.2)
    records = records_of(results)
    assert sorted(r["cell"]["attention"] for r in records.values()) == ["lavo", "softmax"]
    for record in records.values():
        assert record["status"] == "ok" and record["metrics"]["mse"] < record["metrics"]["initial_mse"]
        # Each ran in a submitit job process of its own, not in this one.
        assert "submitit" in " ".join(record["provenance"]["argv"])
    assert list((results / "logs" / "submitit").rglob("*_log.out"))
    assert not list((results / "runs").rglob("*.submitted"))
    log = (task_installed / "executions.log").read_text().splitlines()
    assert sorted(line.split()[1] for line in log) == ["lavo(r=4,w=4)", "softmax"]


def test_parameter_overhead_beyond_ten_percent_is_flagged():
    def record(attention, parameters):
        return {"key": attention, "status": "ok", "parameters": parameters, "metrics": {},
                "cell": {"task": "t", "attention": attention, "attention_args": {}, "overrides": {}}}

    flags = parameter_flags([record("softmax", 1000), record("lavo", 1099), record("big", 1101)])
    assert len(flags) == 1 and flags[0].startswith("t [defaults]: big has +10.1% parameters")


def test_summary_tables_fit_100_columns_and_show_quality_metrics_only():
    from rich.console import Console

    from runners.summary import summary_tables

    declared = [{"name": f"rouge{n}", "kind": "quality", "direction": "higher"} for n in (1, "L")]
    declared += [{"name": "decode_tokens_per_second", "kind": "cost", "direction": "higher"},
                 {"name": "length_ratio", "kind": "diagnostic", "direction": "lower"}]
    records = []
    for attention in ("softmax", "performer", "longshort"):
        for seed in (0, 1):
            records.append({
                "key": f"{attention}{seed}", "status": "ok", "parameters": 1_234_567 + seed,
                "cell": {"task": "summarization", "attention": attention, "overrides": {"beam": 3},
                         "attention_args": {"window": 16, "rank": 16} if attention == "longshort" else {}},
                "metrics": {**{m["name"]: 10.0 + seed for m in declared}, "greedy_rouge1": 9.9,
                            "source_tokens": 412.0},
                "declared_metrics": declared, "timings": {"train_seconds": 44.0 + seed}})
    records.append({**records[0], "key": "failed", "status": "timeout"})
    console = Console(width=100, record=True)
    for table in summary_tables(records, pipeline_check=["summarization"]):
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "summarization [beam=3]: mean ± std over seeds" in text and "pipeline check" in text
    header = next(line for line in text.splitlines() if "attention" in line)
    assert [h in header for h in ("rouge1 ↑", "rougeL ↑", "length_ratio", "params", "train s")] == [True] * 5
    assert "tokens_per_second" not in text and "greedy" not in text and "source_tokens" not in text
    assert "2/3" in text and "timeout" in text and "10.5 ± 0.71" in text  # the failed run counts


def test_dry_run_of_the_smoke_preset_covers_every_task_or_says_why_not(capsys):
    assert main(["run", "smoke", "--dry-run", "--results-dir", "unused"]) == 0
    out = capsys.readouterr().out
    _, blocks = load_preset("smoke")
    for block in blocks:
        assert f"skipped task '{block.task}': not installed" in out or f" {block.task}/" in out
    assert not Path("unused").exists()


# Efficiency benchmark -------------------------------------------------------------------------


def efficiency_records(results: Path) -> list[dict]:
    return read_records(results / "efficiency", kind="efficiency")


def test_efficiency_cab_preset_and_whole_layer(tmp_path, capsys):
    code = main(["efficiency", "--preset", "cab", "--attention", "softmax", "--lengths", "16",
                 "--heads", "2", "--head-dim", "8", "--layer", "--repeats", "1", "--warmup", "1",
                 "--device", "cpu", "--results-dir", str(tmp_path)])
    assert code == 0
    records = efficiency_records(tmp_path)
    # CAB's batch of 4 and its four patterns; the flags given override the preset's shape.
    assert sorted(r["cell"]["pattern"] for r in records) == sorted(
        ["causal_self", "noncausal_self", "causal_cross", "noncausal_cross"])
    width = 2 * 8
    for record in records:
        assert record["cell"]["batch"] == 4 and record["cell"]["scope"] == "layer"
        assert record["status"] == "ok" and record["settings"]["timer"] == "perf_counter"
        # The layer's four projections with biases (softmax itself has no parameters).
        assert record["metrics"]["parameters"] == 4 * (width * width + width)
    out = capsys.readouterr().out
    assert "noncausal_self, whole layer" in out and " softmax " in out
    # Every line fits 100 columns but the records' path, which is the user's and stays whole.
    assert max(len(line.rstrip()) for line in out.splitlines() if "records:" not in line) <= 100


def test_efficiency_measures_mechanisms_that_read_the_layer_input(tmp_path):
    """gla computes its gates from the layer input: core scope gives it one (its gate
    parameters are timed and counted), layer scope gets it from MultiHeadAttention."""
    for scope in ([], ["--layer"]):
        code = main(["efficiency", "--attention", "gla", "--lengths", "16", "--patterns",
                     "causal_self", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                     "--warmup", "1", "--device", "cpu", "--results-dir", str(tmp_path), *scope])
        assert code == 0
    records = {r["cell"]["scope"]: r for r in efficiency_records(tmp_path)}
    assert all(r["status"] == "ok" for r in records.values()), records
    width, rank = 2 * 8, 16
    gates = width * rank + rank * width + width  # E -> 16 -> H*D, with the bias
    assert records["core"]["metrics"]["parameters"] == gates
    assert records["layer"]["metrics"]["parameters"] == gates + 4 * (width * width + width)


def test_efficiency_fla_comparison_is_skipped_with_a_reason_on_cpu(tmp_path, capsys):
    code = main(["efficiency", "--attention", "softmax", "--lengths", "16", "--patterns", "causal_self",
                 "--heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                 "--compare-fla", "--results-dir", str(tmp_path)])
    assert code == 0
    assert "flash-linear-attention comparison skipped: flash-linear-attention's kernels are Triton GPU " \
           "kernels; the device is cpu" in " ".join(capsys.readouterr().out.split())
    assert [r["cell"]["attention"] for r in efficiency_records(tmp_path)] == ["softmax"]


def test_fla_kernel_adapter_feeds_the_linear_transformer_features(monkeypatch):
    """The glue around fla's chunk_linear_attn (run here against a plain causal linear attention
    standing in for the Triton kernel): elu+1 features, normalised, output taken from the tuple."""
    import types

    from runners.efficiency import FLA_KERNELS

    def chunk_linear_attn(q, k, v, normalize=False):
        # [B, T, H, D]: out_t = sum_{s<=t} (q_t . k_s) v_s / sum_{s<=t} q_t . k_s
        scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
        out = torch.einsum("bhts,bshd->bthd", scores, v)
        if normalize:
            out = out / scores.sum(-1).transpose(1, 2)[..., None]
        return out, None

    module = types.ModuleType("fla.ops.linear_attn")
    module.chunk_linear_attn = chunk_linear_attn
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", module)
    q, k, v = (torch.randn(2, 6, 3, 4, dtype=torch.float64) for _ in range(3))
    out = FLA_KERNELS["fla_linear_attn"].build(head_dim=4)(q, k, v)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    t = 3  # position 3 of batch 0, head 1, by hand
    weights = torch.stack([fq[0, t, 1] @ fk[0, s, 1] for s in range(t + 1)])
    expected = (weights[:, None] * v[0, : t + 1, 1]).sum(0) / weights.sum()
    torch.testing.assert_close(out[0, t, 1], expected)
    assert FLA_KERNELS["fla_linear_attn"].counterpart == "linear"


def test_devices_are_checked():
    from runners.sweep import resolve_devices

    assert resolve_devices("cpu", 2) == ["cpu"]
    with pytest.raises(ValueError, match="unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"):
        resolve_devices("tpu", 1)
    if not torch.cuda.is_available():
        assert resolve_devices("auto", 2) == ["cpu"]
        with pytest.raises(ValueError, match=r"'cuda:1' requested but torch.cuda.is_available\(\) is False"):
            resolve_devices("cuda:1", 1)


def test_gpu_timer_choices_are_named():
    from runners.efficiency import gpu_timer

    assert gpu_timer("cuda_events") == "cuda_events"
    with pytest.raises(ValueError, match="unknown timer 'events'; valid: auto, do_bench, cuda_events"):
        gpu_timer("events")
