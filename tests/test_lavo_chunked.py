"""LAVO's chunked causal pass and the backend choice: equal to the plain path and the definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from attention_zoo import build_attention
from attention_zoo.mechanisms.lavo import backends, lavo_naive
from attention_zoo.mechanisms.lavo.chunked import lavo_causal_chunked

HEADS, DIM = 2, 8


def _lavo(backend: str, **config) -> torch.nn.Module:
    attention = build_attention("lavo", pattern="causal_self", heads=HEADS, head_dim=DIM,
                                memory="kv", backend=backend, **config).double()
    if attention.position_bias is not None:
        torch.nn.init.normal_(attention.position_bias)
    return attention


def _inputs(length: int, batch: int = 2, dtype=torch.float64):
    return [torch.randn(batch, length, HEADS, DIM, dtype=dtype, requires_grad=True)
            for _ in range(3)]


@pytest.mark.parametrize(("combine", "position", "bases"), list(itertools.product(
    ["average", "joint"], ["relative", "none"], ["fixed", "learned"])))
@pytest.mark.parametrize(("length", "chunk"), [(13, 8), (40, 12), (16, 64)])
def test_forward_and_gradients_equal_the_plain_path(combine, position, bases, length, chunk):
    plain = _lavo("torch", r=5, w=4, combine=combine, position=position, bases=bases)
    q, k, v = _inputs(length)
    grad_out = torch.randn_like(q)
    parameters = [q, k, v, *plain.parameters()]
    want = plain(q, k, v)
    want_grads = torch.autograd.grad(want, parameters, grad_out)
    got = lavo_causal_chunked(q, k, v, bases=plain.bases, position_bias=plain.position_bias, w=4,
                              joint=combine == "joint", chunk=chunk)
    got_grads = torch.autograd.grad(got, parameters, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name, a, b in zip(["q", "k", "v", *dict(plain.named_parameters())], got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient of {name}")


def test_equals_the_definition():
    attention = _lavo("chunked", r=3, w=4)
    q, k, v = _inputs(11)
    want = lavo_naive(q, k, v, bases=attention.bases, position_bias=attention.position_bias, w=4,
                      causal=True, cross=False)
    torch.testing.assert_close(attention(q, k, v), want, rtol=0, atol=1e-12)


def test_gradcheck():
    attention = _lavo("chunked", r=3, w=2, bases="learned", combine="joint")
    q, k, v = (x.detach()[:1, :7].requires_grad_() for x in _inputs(7))

    def run(q, k, v, bias):
        return lavo_causal_chunked(q, k, v, bases=attention.bases, position_bias=bias, w=2,
                                   joint=True, chunk=4)

    bias = attention.position_bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (q, k, v, bias))


def test_saves_only_its_inputs_and_the_chunk_states():
    """Activations O(L H D) (the inputs) plus [chunks, 2, H, B, 1, r] states: nothing [L, r]."""
    saved: list[int] = []
    q, k, v = (x.detach().float().requires_grad_() for x in _inputs(64, batch=1))
    bases = torch.linalg.qr(torch.randn(HEADS, DIM, 4))[0].transpose(1, 2)  # [H, r=4, D]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        lavo_causal_chunked(q, k, v, bases=bases, position_bias=None, w=4, chunk=16)
    inputs = 3 * q.numel() + bases.numel()
    states = (64 // 16) * 2 * HEADS * 4
    assert sum(saved) == inputs + states


def test_half_precision_inputs_accumulate_in_float32():
    attention = build_attention("lavo", pattern="causal_self", heads=HEADS, head_dim=DIM, w=4,
                                memory="kv", backend="chunked")
    q, k, v = (torch.randn(1, 37, HEADS, DIM) for _ in range(3))
    want = attention(q, k, v)
    for dtype in (torch.bfloat16, torch.float16):
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, k, v).dtype == torch.float32


def test_auto_takes_the_chunked_pass_on_cpu_where_it_applies(monkeypatch):
    calls: list[str] = []
    real = lavo_causal_chunked

    def spy(*args, **kwargs):
        calls.append("chunked")
        return real(*args, **kwargs)

    monkeypatch.setattr("attention_zoo.mechanisms.lavo.attention.lavo_causal_chunked", spy)
    q = torch.randn(1, 9, HEADS, DIM)
    for pattern, mask, expected in [
        ("causal_self", None, ["chunked"]),
        ("causal_self", torch.zeros(1, 9, dtype=torch.bool), []),
        ("noncausal_self", None, []),
        ("causal_cross", None, []),
    ]:
        calls.clear()
        build_attention("lavo", pattern=pattern, heads=HEADS, head_dim=DIM, memory="kv")(
            q, q, q, mask)
        assert calls == expected, pattern


def test_choice_per_device_and_clear_refusals():
    supported = {"chunked": None, "triton": None}
    assert backends.choose("auto", torch.device("cpu"), supported) == "chunked"
    # Only what a GPU has verified may be chosen there; until then, the plain path.
    assert backends.choose("auto", torch.device("cuda"), supported) == backends.VERIFIED["cuda"][0]
    assert "triton" not in backends.VERIFIED["cuda"]
    assert backends.choose("auto", torch.device("cpu"), {"chunked": "cross attention"}) == "torch"
    assert backends.chunked_unsupported(causal=True, cross=False, masked=False, empty=False) is None
    attention = build_attention("lavo", pattern="noncausal_self", heads=HEADS, head_dim=DIM,
                                memory="kv", backend="chunked")
    q = torch.randn(1, 5, HEADS, DIM)
    with pytest.raises(ValueError, match=r"backend='chunked' cannot run this call: non-causal"):
        attention(q, q, q, None)


def test_empty_sequence():
    q = torch.randn(1, 0, HEADS, DIM)
    bases = torch.eye(DIM)[None, :4].expand(HEADS, 4, DIM)
    assert lavo_causal_chunked(q, q, q, bases=bases, position_bias=None, w=4).shape == q.shape
