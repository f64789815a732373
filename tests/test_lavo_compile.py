"""LAVO's ``backend="compile"``: the plain path under torch.compile (inductor on the CPU)."""

from __future__ import annotations

import pytest
import torch

from attention_zoo import build_attention

torch_dynamo = pytest.importorskip("torch._dynamo")


def test_compiled_equals_eager_forward_and_gradients_without_recompiling_per_length():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, r=4, w=4,
                               memory="kv", backend="compile")
    eager = build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, r=4, w=4,
                            memory="kv", backend="torch")
    eager.load_state_dict(compiled.state_dict())
    with torch.no_grad():
        compiled.position_bias.normal_()
        eager.position_bias.copy_(compiled.position_bias)
    for length in (13, 22, 39):  # none a multiple of w: one graph for all of them
        q, k, v = (torch.randn(2, length, 2, 8, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(2, length, 2, 8)
        got = compiled(q, k, v)
        got_grads = torch.autograd.grad(got, (q, k, v, compiled.position_bias), grad_out)
        want = eager(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v, eager.position_bias), grad_out)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
