"""What the GPU suite checks on CUDA, checked as far as the CPU allows.

- Every mechanism creates its tensors on the device of its inputs: under a default device of
  ``meta``, any tensor made without ``device=`` lands on ``meta`` and mixing it with the CPU
  inputs fails.
- Every in-process task runs its own ``presets/tiny.yaml`` through the executor under bf16
  autocast (dtype bugs; marked validation: ``pytest tests/test_device_and_precision.py
  --run-validation``). The fairseq tasks train in a child process that autocast does not reach.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_zoo import Pattern, attention_spec, build_attention, list_attentions
from attention_zoo.testing import run
from runners.suite_checks import run_task_smoke, trains_in_a_child_process
from tasks.registry import get_task, list_tasks

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


IN_PROCESS = [name for name in list_tasks() if not trains_in_a_child_process(get_task(name))]


@pytest.mark.validation
@pytest.mark.parametrize("task", IN_PROCESS)
def test_task_smoke_under_bf16_autocast(task, tmp_path):
    """The task's own tiny preset through the executor, under bf16 autocast."""
    metrics = run_task_smoke(task, device="cpu", dtype=torch.bfloat16, workdir=tmp_path).metrics
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics


def _informer_forward_backward() -> None:
    from tasks.base import AttentionChoice
    from tasks.time_series.model import ROLES, Informer, InformerShape

    shape = InformerShape(input_dims=7, output_dims=7, time_dims=4, pred_len=12, d_model=16,
                          n_heads=2, e_layers=2, d_layers=1, d_ff=32, dropout=0.1)
    model = Informer(shape, dict.fromkeys(ROLES, AttentionChoice("lavo")))
    x, x_mark = torch.randn(2, 48, 7), torch.randn(2, 48, 4)
    y, y_mark = torch.randn(2, 36, 7), torch.randn(2, 36, 4)
    with torch.device("meta"):
        out = model(x, x_mark, y, y_mark)
        out.sum().backward()
    assert out.device.type == "cpu"


def _pointr_forward_backward() -> None:
    from tasks.point_cloud.model import PoinTr, PoinTrSettings
    from tasks.point_cloud.task import PointCloudCompletion

    attention = {role: ("lavo", {}) for role in PointCloudCompletion.roles}
    settings = PoinTrSettings(centres=16, neighbours=8, dim=32, heads=2, encoder_depth=1,
                              decoder_depth=1, queries=16, fold_step=3, attention=attention)
    model = PoinTr(settings, backend="torch")
    partial, complete = torch.rand(2, 128, 3), torch.rand(2, 256, 3)
    with torch.device("meta"):
        loss = model.loss(partial, complete)
        loss.backward()
    assert loss.device.type == "cpu"


@pytest.mark.parametrize("model", [_informer_forward_backward, _pointr_forward_backward],
                         ids=["time_series", "point_cloud"])
def test_task_models_create_tensors_on_the_inputs_device(model):
    model()
