"""docs/adding_a_task.md: its complete example passes the task contract and runs end to end, and
each check of the contract fails on a variant of it with the bug the check looks for."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from runners.execute import execute
from tasks.base import AttentionChoice
from tasks.testing import TaskContractError, check_task_contract

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding_a_task.md"


@pytest.fixture
def example(tmp_path, monkeypatch, scratch_tasks):
    """The doc's example written out as a package (task.py and presets/) and imported."""
    section = DOC.read_text().split("## A complete example", 1)[1]
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", section, flags=re.S)
    package = tmp_path / "site" / "sine_example"
    (package / "presets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for language, text in blocks:
        if language == "python":
            (package / "task.py").write_text(text)
        else:
            (package / text.splitlines()[0].removeprefix("# ")).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield importlib.import_module("sine_example.task")
    for name in [m for m in sys.modules if m.startswith("sine_example")]:
        del sys.modules[name]


def test_the_example_passes_the_contract(example, tmp_path):
    assert sorted(p.stem for p in (Path(example.__file__).parent / "presets").glob("*.yaml")) == [
        "paper", "smoke", "tiny"]
    check_task_contract("sine", tmp_path / "contract")


def test_the_example_learns_through_the_runner(example, tmp_path):
    task = example.SineTask
    config = task.make_config({"steps": 60})
    result = execute(task, config, AttentionChoice("lavo", {"r": 4, "w": 4}), seed=0, device="cpu",
                     workdir=tmp_path / "run", threads=1)
    losses = result.extra["train_loss"]
    assert len(losses) == 60 and math.isfinite(result.metrics["mse"])
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert result.attention_parameters > 0  # LAVO's own parameters, counted by the runner
    assert result.parameters > result.attention_parameters
    assert result.train_seconds > 0 and result.peak_memory_mib > 0


def test_a_nan_metric_is_caught(example, tmp_path):
    class Diverges(example.SineTask):
        def evaluate(self, model, config, data, run):
            return {"mse": float("nan")}

    with pytest.raises(TaskContractError, match=r"metrics: mse is nan"):
        check_task_contract(Diverges, tmp_path)


def test_a_task_that_ignores_its_roles_is_caught(example, tmp_path):
    class AlwaysSoftmax(example.SineTask):
        def build(self, config, attention, data, run):
            return example.SineModel(config, AttentionChoice("softmax"))

    # The contract's run asks for another mechanism than softmax in the role.
    with pytest.raises(TaskContractError, match=r"roles: role 'self' asked for linear"):
        check_task_contract(AlwaysSoftmax, tmp_path)


def test_a_task_that_declares_the_wrong_pattern_is_caught(example, tmp_path):
    class WrongPattern(example.SineTask):
        roles = {"self": example.Pattern.NONCAUSAL_SELF}  # the model attends causally

    with pytest.raises(TaskContractError, match=r"roles: role 'self' asked for \w+ with noncausal_self"):
        check_task_contract(WrongPattern, tmp_path)


def test_writing_outside_the_workdir_is_caught(example, tmp_path):
    class Litters(example.SineTask):
        def train(self, model, config, data, run):
            Path("losses.txt").write_text("written to the working directory\n")
            return super().train(model, config, data, run)

    with pytest.raises(TaskContractError, match=r"workdir: the run wrote outside its workdir: .*losses.txt"):
        check_task_contract(Litters, tmp_path)


def test_a_synonym_of_the_vocabulary_is_caught(example, tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class OwnNames(example.SineConfig):
        learning_rate: float = 1e-3

    class Renamed(example.SineTask):
        Config = OwnNames

    with pytest.raises(TaskContractError, match=r"'learning_rate' should be called 'lr'"):
        check_task_contract(Renamed, tmp_path)


def test_an_invalid_preset_is_caught(example, tmp_path):
    (Path(example.__file__).parent / "presets" / "broken.yaml").write_text("settings: {stepz: 3}\n")
    with pytest.raises(TaskContractError, match=r"preset broken: .*unknown setting 'stepz'"):
        check_task_contract("sine", tmp_path)


def test_every_stage_runs_seeded(example, tmp_path):
    task = example.SineTask
    config = task.make_config({"steps": 3})
    first, second = (execute(task, config, AttentionChoice("softmax"), seed=7, device="cpu",
                             workdir=tmp_path / name, threads=1) for name in ("a", "b"))
    assert first.extra["train_loss"] == second.extra["train_loss"]
    torch.manual_seed(123)  # a caller's state does not leak into the run
    third = execute(task, config, AttentionChoice("softmax"), seed=7, device="cpu",
                    workdir=tmp_path / "c", threads=1)
    assert third.metrics == first.metrics
