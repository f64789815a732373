"""LAVO's chunked causal pass with ``memory="input"`` (the default): equal to the definition and
to the plain path in float64, forward and every gradient (layer input, projections, bases,
position bias), at lengths that are multiples of neither the chunk nor the window."""

from __future__ import annotations

import itertools

import pytest
import torch

from attention_zoo import MultiHeadAttention, build_attention
from attention_zoo.mechanisms.lavo import lavo_naive
from attention_zoo.mechanisms.lavo.chunked_input import lavo_input_chunked

pytestmark = pytest.mark.zoo

HEADS, DIM = 2, 8
WIDTH = HEADS * DIM


def _layer(backend: str, *, seed: int = 0, bias: bool = True, **config) -> MultiHeadAttention:
    """A float64 causal LAVO layer, every parameter drawn (biases and P not zero)."""
    torch.manual_seed(seed)
    layer = MultiHeadAttention(WIDTH, HEADS, attention="lavo", pattern="causal_self", bias=bias,
                               attention_args={"backend": backend, **config}).double()
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "bases" not in name:  # learned bases stay orthonormal through their map
                parameter.normal_(0.0, 0.5)
    return layer


def _gradients(layer: MultiHeadAttention, x: torch.Tensor, grad_out: torch.Tensor, run=None):
    """Output and the gradients of x and of every parameter."""
    x = x.clone().requires_grad_()
    out = layer(x) if run is None else run(layer, x)
    parameters = [p for _, p in layer.named_parameters()]
    return [out, *torch.autograd.grad(out, [x, *parameters], grad_out)]


def _naive(layer: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer with its attention core replaced by the query-by-query definition."""
    attention = layer.attention
    q, k, v = (layer._split(proj(x)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    core = lavo_naive(q, k, v, bases=attention.bases, position_bias=attention.position_bias,
                      w=attention.w, causal=True, cross=False, combine=attention.config.combine,
                      layer_input=layer._layer_input(x, x, x))
    return layer.out_proj(core.reshape(*x.shape))


def _assert_all_close(got, want, tolerance: float) -> None:
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=f"tensor {index}")


@pytest.mark.parametrize("combine", ["average", "joint"])
def test_equals_the_definition_forward_and_gradients(combine):
    """Length 22, chunk 6 (two windows of 3): chunks and windows both end mid-sequence."""
    layer = _layer("chunked", r=5, w=3, combine=combine)
    x = torch.randn(2, 22, WIDTH, dtype=torch.float64)
    grad_out = torch.randn_like(x)

    def chunked(layer, x):
        attention = layer.attention
        q, k, v = (layer._split(proj(x)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        memory = attention._memory(k, v, layer._layer_input(x, x, x), torch.float64)
        core = lavo_input_chunked(
            q, k, v, coeffs=memory.key_coeffs[:, :, 0], key_bases=memory.key_bases,
            value_bases=memory.value_bases, key_bias=memory.key_bias,
            value_bias=memory.value_bias, position_bias=attention.position_bias, w=3,
            joint=combine == "joint", chunk=6)
        return layer.out_proj(core.reshape(*x.shape))

    _assert_all_close(_gradients(layer, x, grad_out, chunked),
                      _gradients(layer, x, grad_out, _naive), 1e-10)


@pytest.mark.parametrize(("combine", "position", "bases", "bias"), list(itertools.product(
    ["average", "joint"], ["relative", "none"], ["fixed", "learned"], [True, False])))
def test_equals_the_plain_path(combine, position, bases, bias):
    """Through the backend switch, 45 tokens in chunks of the default size (rounded to w=4)
    and of 12."""
    config = dict(r=6, w=4, combine=combine, position=position, bases=bases)
    plain, chunked = _layer("torch", bias=bias, **config), _layer("chunked", bias=bias, **config)
    x = torch.randn(2, 45, WIDTH, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    want = _gradients(plain, x, grad_out)
    _assert_all_close(_gradients(chunked, x, grad_out), want, 1e-10)


def test_auto_takes_the_chunked_pass_on_cpu(monkeypatch):
    calls: list[int] = []
    real = lavo_input_chunked

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("attention_zoo.mechanisms.lavo.attention.lavo_input_chunked", spy)
    layer = MultiHeadAttention(WIDTH, HEADS, attention="lavo", pattern="causal_self")
    x = torch.randn(1, 9, WIDTH)
    layer(x)
    assert calls == [1]
    layer(x, key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))  # a mask: the plain path
    assert calls == [1]


def test_half_precision_and_autocast():
    layer = MultiHeadAttention(WIDTH, HEADS, attention="lavo", pattern="causal_self",
                               attention_args={"w": 4})
    x = torch.randn(1, 37, WIDTH)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_empty_sequence():
    attention = build_attention("lavo", pattern="causal_self", heads=HEADS, head_dim=DIM)
    q = torch.randn(1, 0, HEADS, DIM)
    bases = torch.zeros(HEADS, 4, DIM)
    out = lavo_input_chunked(q, q, q, coeffs=torch.zeros(1, 0, 4), key_bases=bases,
                             value_bases=bases, key_bias=None, value_bias=None,
                             position_bias=attention.position_bias, w=4)
    assert out.shape == q.shape
