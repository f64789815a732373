"""What the GPU suite checks on CUDA, checked as far as the CPU allows.

- Every mechanism creates its tensors on the device of its inputs: under a default device of
  ``meta``, any tensor made without ``device=`` lands on ``meta`` and mixing it with the CPU
  inputs fails.
- Every in-process task trains and evaluates for a few steps under bf16 autocast (dtype bugs;
  marked slow, a minute per task on 2 cores: ``pytest tests/test_device_and_precision.py
  --run-slow``). The fairseq tasks train in a child process that autocast does not reach.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_zoo import Pattern, attention_spec, build_attention, list_attentions
from attention_zoo.testing import run
from runners.gpu_suite import CHILD_PROCESS_TASKS, TASK_SMOKE, run_task_smoke

CASES = [(name, pattern) for name in list_attentions() for pattern in Pattern
         if pattern in attention_spec(name).patterns]


@pytest.mark.parametrize(("name", "pattern"), CASES, ids=[f"{n}-{p.value}" for n, p in CASES])
def test_mechanism_creates_tensors_on_the_inputs_device(name, pattern):
    spec = attention_spec(name)
    attention = build_attention(name, pattern=pattern, heads=2, head_dim=8)
    q = torch.randn(2, 11, 2, 8)
    k = torch.randn(2, 13 if pattern.cross else 11, 2, 8)
    mask = torch.zeros(2, k.shape[1], dtype=torch.bool)
    mask[1, -3:] = True
    with torch.device("meta"):
        out = run(attention, q, k, k, mask)
    assert out.device.type == "cpu"
    if spec.decoding and not pattern.cross and not spec.uses_layer_input:
        state = attention.init_state(2, device="cpu", dtype=q.dtype)
        with torch.device("meta"):
            for t in range(3):
                out, state = attention.step(q[:, t:t + 1], k[:, t:t + 1], k[:, t:t + 1], state)
        assert out.device.type == "cpu"


IN_PROCESS = sorted(set(TASK_SMOKE) - CHILD_PROCESS_TASKS)


@pytest.mark.slow
@pytest.mark.parametrize("task", IN_PROCESS)
def test_task_smoke_under_bf16_autocast(task, tmp_path):
    from tasks.base import list_tasks

    if task not in list_tasks():
        pytest.skip(f"task {task} is not installed")
    metrics = run_task_smoke(task, device="cpu", dtype=torch.bfloat16, workdir=tmp_path)
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics
