"""LAVO's ``backend="compile"``: the plain path under torch.compile (inductor on the CPU).

The check runs in a fresh interpreter: once inductor has imported Triton in a process, the
kernels that ``tests/test_lavo_triton.py`` decorates for Triton's interpreter no longer launch
there ("Cannot call @triton.jit'd outside of the scope of a kernel"); so this module does not
import ``torch._dynamo`` either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from attention_zoo import build_attention


def test_compiled_equals_eager_forward_and_gradients_without_recompiling_per_length():
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def check_compiled_equals_eager() -> None:
    """backend="compile" equals eager LAVO in forward and gradients at three lengths, with one
    graph for all of them (dynamic shapes, no recompilation per length)."""
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


if __name__ == "__main__":
    check_compiled_equals_eager()
