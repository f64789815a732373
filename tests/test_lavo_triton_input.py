"""LAVO's Triton kernels for ``memory="input"`` (the default), on the CPU through Triton's
interpreter: against the float64 definition (``lavo_naive``) and the PyTorch paths, forward and
every gradient (layer input, projections, bases, position bias), at lengths that are multiples
of neither the chunk nor the window.

The kernels compute in float32 whatever their inputs, so "equal to the float64 definition" is to
float32's rounding. ``TRITON_INTERPRET=1`` is set before the kernel module is imported (see
``tests/test_lavo_triton.py``).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from attention_zoo import MultiHeadAttention
from attention_zoo.mechanisms.lavo import backends, lavo_naive
from attention_zoo.mechanisms.lavo.triton_input import lavo_input_triton

pytestmark = [pytest.mark.zoo, pytest.mark.triton]

HEADS, DIM = 2, 8
WIDTH = HEADS * DIM


def _layer(backend: str, dtype: torch.dtype, *, pattern: str = "causal_self", bias: bool = True,
           **config) -> MultiHeadAttention:
    """A seeded LAVO layer, every parameter but learned bases drawn (biases and P not zero)."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(WIDTH, HEADS, attention="lavo", pattern=pattern, bias=bias,
                               attention_args={"backend": backend, **config})
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "bases" not in name:
                parameter.normal_(0.0, 0.5)
    return layer.to(dtype)


def _run(layer: MultiHeadAttention, x: torch.Tensor, grad_out: torch.Tensor, core=None):
    """Output and gradients of x and of every parameter; ``core`` replaces the attention core."""
    x = x.to(next(layer.parameters()).dtype).clone().requires_grad_()
    if core is None:
        out = layer(x)
    else:
        q, k, v = (layer._split(proj(x)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        out = layer.out_proj(core(layer, q, k, v, layer._layer_input(x, x, x)).reshape(*x.shape))
    parameters = [p for _, p in layer.named_parameters()]
    return [out, *torch.autograd.grad(out, [x, *parameters], grad_out.to(out.dtype))]


def _assert_close(got, want, tolerance: float) -> None:
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.double(), b.double(), rtol=tolerance, atol=tolerance,
                                   msg=f"tensor {index}")


def _kernel_core(block: int, causal: bool):
    def core(layer, q, k, v, layer_input):
        attention = layer.attention
        memory = attention._memory(k, v, layer_input, torch.float32)
        return lavo_input_triton(
            q, k, v, coeffs=memory.key_coeffs[:, :, 0], key_bases=memory.key_bases,
            value_bases=memory.value_bases, key_bias=memory.key_bias,
            value_bias=memory.value_bias, position_bias=attention.position_bias, w=attention.w,
            causal=causal, joint=attention.config.combine == "joint", block=block)
    return core


def _naive_core(causal: bool):
    def core(layer, q, k, v, layer_input):
        attention = layer.attention
        return lavo_naive(q, k, v, bases=attention.bases, position_bias=attention.position_bias,
                          w=attention.w, causal=causal, cross=False,
                          combine=attention.config.combine, layer_input=layer_input)
    return core


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("combine", ["average", "joint"])
def test_equals_the_float64_definition(causal, combine):
    """23 tokens, w = 5, chunks of 15 tokens in 16-row tiles: two chunks, the last partial."""
    config = dict(r=6, w=5, combine=combine)
    pattern = "causal_self" if causal else "noncausal_self"
    x = torch.randn(2, 23, WIDTH, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    want = _run(_layer("torch", torch.float64, pattern=pattern, **config), x, grad_out,
                _naive_core(causal))
    got = _run(_layer("torch", torch.float32, pattern=pattern, **config), x, grad_out,
               _kernel_core(16, causal))
    _assert_close(got, want, 1e-4)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize(("combine", "bases", "bias", "length", "w"), [
    ("average", "fixed", True, 37, 4),  # two chunks of 32, the last partial
    ("joint", "learned", True, 37, 4),
    ("average", "learned", False, 40, 5),  # chunks of 30 tokens in 32-row tiles
    ("joint", "fixed", False, 19, 16),  # one window per chunk
])
def test_triton_backend_equals_the_pytorch_path_in_float32(pattern, combine, bases, bias, length, w):
    """Through the backend switch, both in float32."""
    config = dict(r=5, w=w, combine=combine, bases=bases)
    x = torch.randn(2, length, WIDTH)
    grad_out = torch.randn_like(x)
    want = _run(_layer("torch", torch.float32, pattern=pattern, bias=bias, **config), x, grad_out)
    got = _run(_layer("triton", torch.float32, pattern=pattern, bias=bias, **config), x, grad_out)
    _assert_close(got, want, 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Half inputs (a half layer), float32 inside: within the half type's rounding of the
    float32 path. The key bias's gradient is zero in exact arithmetic (both softmaxes ignore a
    shift of every logit), so each error is relative to the largest gradient's tenth at least
    (``runners.suite_checks.relative_errors``)."""
    from runners.suite_checks import relative_errors

    x = torch.randn(1, 37, WIDTH)
    grad_out = torch.randn_like(x)
    names = ["out", "input", *(name for name, _ in _layer("torch", dtype).named_parameters())]
    want = dict(zip(names, _run(_layer("torch", torch.float32, w=4), x, grad_out), strict=True))
    got = dict(zip(names, _run(_layer("triton", dtype, w=4), x, grad_out), strict=True))
    assert got["out"].dtype == dtype
    errors = relative_errors(got, want)
    assert max(errors.values()) < (0.05 if dtype == torch.bfloat16 else 0.01), errors


def test_auto_does_not_pick_unverified_kernels_on_cuda():
    """Only what the GPU suite has verified on a GPU may be chosen there."""
    assert "triton" not in backends.VERIFIED["cuda"]
    assert backends.choose("auto", torch.device("cuda"), {"triton": None, "chunked": None}) == "torch"
    assert backends.UNVERIFIED_ON_CUDA["triton"]


def test_causal_output_ignores_the_future():
    layer = _layer("triton", torch.float32, w=4)
    x = torch.randn(1, 40, WIDTH)
    moved = x.clone()
    moved[:, 21:] += 3.0
    with torch.no_grad():
        before, after = layer(x), layer(moved)
    torch.testing.assert_close(after[:, :21], before[:, :21], rtol=0, atol=0)
    assert not torch.allclose(after[:, 21:], before[:, 21:])


_COMPILE_FOR_SM90 = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attention_zoo.mechanisms.lavo import triton_input as ti

dtype, causal, joint = sys.argv[1], sys.argv[2] == "causal", sys.argv[3] == "joint"
ct, block_c, block_d, block_r = ti._blocks(16, 64, 64, 32)
meta = dict(W=16, CT=ct, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_R=block_r, CAUSAL=causal,
            JOINT=joint, HAS_BIAS=True, HAS_KBIAS=True, HAS_VBIAS=True,
            PRECISION="ieee" if dtype == "fp32" else "tf32")
own_dtype = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
shared = {}
for name, fn, extra in [("forward", ti._lavo_input_forward, {}),
                        ("backward0", ti._lavo_input_backward, {"PASS": 0}),
                        ("backward1", ti._lavo_input_backward, {"PASS": 1})]:
    constexprs = {**meta, **extra}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg in ("L", "H", "D", "R", "NC") or arg.startswith("stride"):
            signature[arg] = "i32"
        else:
            signature[arg] = "*" + (dtype if arg in own_dtype else "fp32")
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": ti._NUM_WARPS})
    assert kernel.asm["cubin"], name
    shared[name] = kernel.metadata.shared
print(json.dumps(shared))
"""


@pytest.mark.parametrize(("dtype", "causal", "joint"), [("bf16", "causal", "average"),
                                                        ("fp32", "noncausal", "joint")])
def test_kernels_compile_for_the_h200(dtype, causal, joint):
    """The interpreter cannot catch GPU-only compile errors: build sm_90 cubins (no GPU needed)."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, dtype, causal, joint],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(shared) == {"forward", "backward0", "backward1"}
    assert max(shared.values()) <= 227 * 1024, shared  # H200: 227 KiB of shared memory per block
