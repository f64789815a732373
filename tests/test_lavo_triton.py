"""LAVO's Triton kernels against the float64 definition, on the CPU through Triton's interpreter.

Skipped when Triton is not installed. ``TRITON_INTERPRET=1`` must be set before the kernels are
decorated, so it is set here, before the kernel module is imported; it only lets the kernels run
on CPU tensors and changes nothing for the other tests (``backend="auto"`` picks Triton on CUDA
only).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from attention_zoo import AttentionConfigError, Pattern, build_attention
from attention_zoo.mechanisms.lavo import lavo_naive, triton_kernels
from attention_zoo.mechanisms.lavo.attention import orthonormal_rows

pytestmark = [pytest.mark.zoo, pytest.mark.triton]

# (batch, length, heads, head_dim, r, w, block): lengths not multiples of the window or the
# chunk, several chunks (so the scan crosses chunk boundaries), r < d, w not a power of two.
SHAPES = [
    (2, 37, 3, 16, 5, 4, 16),  # chunks of 16 tokens: 3 chunks, the last one partial
    (1, 40, 2, 8, 8, 5, 16),  # w = 5: chunks of 15 tokens in a 16-row tile, r = d
    (2, 19, 1, 12, 7, 16, 16),  # one window per chunk, head_dim not a power of two
]


def _inputs(batch: int, length: int, heads: int, dim: int, r: int, w: int, *, bias: bool):
    generator = torch.Generator().manual_seed(1000 * length + 10 * r + w)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=generator, dtype=torch.float64)
               for _ in range(3))
    torch.manual_seed(length)
    bases = orthonormal_rows(heads, r, dim).double()  # [H, r, D]
    position_bias = None
    if bias:
        position_bias = torch.randn(heads, 2 * w - 1, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, length, heads, dim, generator=generator, dtype=torch.float64)
    return q, k, v, bases, position_bias, grad_out


def _gradients(output: torch.Tensor, grad_out: torch.Tensor, leaves: list[torch.Tensor]):
    return torch.autograd.grad(output, leaves, grad_out.to(output.dtype))


def _torch_path(q, k, v, bases, bias, *, w, causal, combine):
    """The float64 PyTorch path with the given bases and bias (itself tested against lavo_naive)."""
    heads, r, dim = bases.shape
    attention = build_attention(
        "lavo", pattern="causal_self" if causal else "noncausal_self", heads=heads, head_dim=dim,
        r=r, w=w, combine=combine, position="none" if bias is None else "relative",
        backend="torch", memory="kv",
    ).double()
    attention.fixed_bases.copy_(bases)
    parameters = {} if bias is None else {"position_bias": bias}
    return torch.func.functional_call(attention, parameters, (q, k, v, None))


def _check_against(reference_fn, shape, causal, combine, *, bias=True):
    batch, length, heads, dim, r, w, block = shape
    q, k, v, bases, position_bias, grad_out = _inputs(batch, length, heads, dim, r, w, bias=bias)
    originals = [x for x in (q, k, v, position_bias) if x is not None]
    leaves64 = [x.clone().requires_grad_() for x in originals]
    reference = reference_fn(*leaves64[:3], bases, leaves64[3] if bias else None, w=w,
                             causal=causal, combine=combine)
    expected = _gradients(reference, grad_out, leaves64)

    leaves32 = [x.float().requires_grad_() for x in originals]
    output = triton_kernels.lavo_triton(
        *leaves32[:3], bases=bases.float(), position_bias=leaves32[3] if bias else None, w=w,
        causal=causal, joint=combine == "joint", block=block,
    )
    assert output.dtype == torch.float32 and output.shape == q.shape
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["q", "k", "v", "position_bias"],
                               _gradients(output, grad_out, leaves32), expected, strict=False):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}H{}D{}r{}w{}c{}".format(*s))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("combine", ["average", "joint"])
def test_forward_and_gradients_match_float64_pytorch_path(shape, causal, combine):
    _check_against(_torch_path, shape, causal, combine)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("combine", ["average", "joint"])
def test_forward_and_gradients_match_float64_definition(causal, combine):
    """Against lavo_naive itself (query by query, explicit memories): slow, so one shape."""
    def naive(q, k, v, bases, bias, *, w, causal, combine):
        return lavo_naive(q, k, v, bases=bases, position_bias=bias, w=w, causal=causal,
                          cross=False, combine=combine)

    _check_against(naive, (1, 23, 2, 8, 6, 5, 16), causal, combine)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_without_position_bias(causal):
    _check_against(_torch_path, (2, 23, 2, 8, 6, 4, 16), causal, "average", bias=False)


def test_causal_output_ignores_the_future():
    q, k, v, bases, bias, _ = _inputs(1, 40, 2, 8, 4, 4, bias=True)
    q, k, v, bases, bias = (x.float() for x in (q, k, v, bases, bias))
    kwargs = dict(bases=bases, position_bias=bias, w=4, causal=True, joint=False, block=16)
    before = triton_kernels.lavo_triton(q, k, v, **kwargs)
    k2, v2 = k.clone(), v.clone()
    k2[:, 21:] += 5.0
    v2[:, 21:] -= 5.0
    after = triton_kernels.lavo_triton(q, k2, v2, **kwargs)
    torch.testing.assert_close(after[:, :21], before[:, :21], rtol=0, atol=0)
    assert not torch.allclose(after[:, 21:], before[:, 21:])


@pytest.mark.parametrize("pattern", [Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF])
@pytest.mark.parametrize("combine", ["average", "joint"])
def test_triton_backend_matches_torch_backend(pattern, combine):
    """Through the mechanism: parameters (the position bias) receive the same gradient."""
    torch.manual_seed(0)
    attentions = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        attentions[backend] = build_attention("lavo", pattern=pattern, heads=2, head_dim=16,
                                              r=8, w=16, combine=combine, backend=backend,
                                              memory="kv")
    with torch.no_grad():
        attentions["torch"].position_bias.normal_()
        attentions["triton"].position_bias.copy_(attentions["torch"].position_bias)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 70, 2, 16, generator=generator) for _ in range(3))  # 2 chunks
    results = {}
    for backend, attention in attentions.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        output = attention(*leaves, None)
        output.square().sum().backward()
        results[backend] = [output, *(x.grad for x in leaves), attention.position_bias.grad]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_auto_uses_pytorch_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("backend='auto' ran the Triton kernels on a CPU tensor")

    monkeypatch.setattr(triton_kernels, "lavo_triton", refuse)
    attention = build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, memory="kv",
                                backend="auto")
    q = torch.randn(1, 9, 2, 8)
    assert attention(q, q, q, None).shape == q.shape


def test_the_input_memory_has_kernels_too():
    """memory='input' (the default) builds with backend='triton' and its calls can run (the
    kernels are tests/test_lavo_triton_input.py's); learned bases are fine there (their gradient
    flows through the coefficients and projected bases, outside the kernels)."""
    attention = build_attention("lavo", pattern="causal_self", heads=2, head_dim=8,
                                backend="triton", bases="learned")
    q = torch.randn(1, 9, 2, 8)
    assert attention.triton_unsupported(q, None) is None


def test_triton_backend_rejects_what_it_cannot_run():
    with pytest.raises(AttentionConfigError, match="backend='triton' supports self-attention"):
        build_attention("lavo", pattern="causal_cross", heads=2, head_dim=8, backend="triton")
    with pytest.raises(AttentionConfigError, match="bases='learned'"):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, backend="triton",
                        bases="learned", memory="kv")
    with pytest.raises(AttentionConfigError, match="backend"):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, backend="cuda")
    attention = build_attention("lavo", pattern="causal_self", heads=2, head_dim=8,
                                backend="triton", memory="kv")
    q = torch.randn(1, 9, 2, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask.*backend='auto'"):
        attention(q, q, q, torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"torch.float64 \(supported: float32"):
        attention(q.double(), q.double(), q.double(), None)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_inputs(dtype, tolerance):
    """bf16 / fp16 in and out, fp32 inside: within the half type's rounding of the definition."""
    q, k, v, bases, bias, grad_out = _inputs(2, 37, 2, 16, 8, 4, bias=True)
    q, k, v, bias = (x.to(dtype) for x in (q, k, v, bias))  # the definition sees these values
    leaves64 = [x.double().requires_grad_() for x in (q, k, v, bias)]
    reference = lavo_naive(*leaves64[:3], bases=bases, position_bias=leaves64[3], w=4,
                           causal=True, cross=False)
    expected = _gradients(reference, grad_out, leaves64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    output = triton_kernels.lavo_triton(*leaves[:3], bases=bases.float(), position_bias=leaves[3],
                                        w=4, causal=True, joint=False, block=16)
    assert output.dtype == dtype
    torch.testing.assert_close(output.double(), reference, rtol=tolerance, atol=tolerance)
    for got, want in zip(_gradients(output, grad_out, leaves), expected, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


_COMPILE_FOR_SM90 = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attention_zoo.mechanisms.lavo import triton_kernels as tk

dtype, causal, joint = sys.argv[1], sys.argv[2] == "causal", sys.argv[3] == "joint"
ct, block_c, block_d, block_r = tk._blocks(16, 64, 64, 32)
meta = dict(W=16, CT=ct, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_R=block_r, CAUSAL=causal,
            JOINT=joint, HAS_BIAS=True, PRECISION="ieee" if dtype == "fp32" else "tf32")
pointers = {"Bs": "*fp32", "P": "*fp32", "State": "*fp32", "Flow": "*fp32", "DP": "*fp32"}
shared = {}
for name, fn, extra in [("forward", tk._lavo_forward, {}),
                        ("backward0", tk._lavo_backward, {"PASS": 0}),
                        ("backward1", tk._lavo_backward, {"PASS": 1})]:
    constexprs = {**meta, **extra}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg[0].isupper() and arg not in ("L", "H", "D", "R", "NC"):
            signature[arg] = pointers.get(arg, "*" + dtype)
        else:
            signature[arg] = "i32"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": tk._NUM_WARPS})
    assert kernel.asm["cubin"], name
    shared[name] = kernel.metadata.shared
print(json.dumps(shared))
"""


def test_kernels_compile_for_the_h200():
    """The interpreter cannot catch GPU-only compile errors: build sm_90 cubins (no GPU needed)."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, "bf16", "causal", "joint"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(shared) == {"forward", "backward0", "backward1"}
    assert max(shared.values()) <= 227 * 1024, shared  # H200: 227 KiB of shared memory per block
