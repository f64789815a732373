"""The multi-head layer the backbones use."""

from __future__ import annotations

import pytest
import torch

from attention_zoo import AttentionConfigError, MultiHeadAttention

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("attention", ["softmax", "sdpa", "lavo"])
def test_self_and_cross_shapes_and_padding(attention):
    torch.manual_seed(0)
    self_attn = MultiHeadAttention(32, 4, attention, pattern="noncausal_self").double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    assert self_attn(x).shape == (2, 10, 32)
    padded = torch.cat([x, torch.randn(2, 3, 32, dtype=torch.float64)], 1)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[:, 10:] = True
    torch.testing.assert_close(self_attn(padded, key_padding_mask=mask)[:, :10], self_attn(x))

    cross = MultiHeadAttention(32, 4, attention, pattern="noncausal_cross", kdim=12, vdim=12)
    memory = torch.randn(2, 7, 12)
    assert cross(torch.randn(2, 5, 32), memory).shape == (2, 5, 32)


@pytest.mark.parametrize("attention", ["softmax", "lavo"])
def test_layer_decoding_equals_parallel(attention):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, attention, pattern="causal_self",
                               attention_args={"w": 3} if attention == "lavo" else None).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    parallel = layer(x)
    state = layer.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(11):
        out, state = layer.step(x[:, t:t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=0, atol=1e-12)


def test_layer_errors():
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        MultiHeadAttention(30, 4, pattern="causal_self")
    with pytest.raises(ValueError, match="needs key"):
        MultiHeadAttention(16, 2, pattern="noncausal_cross")(torch.randn(1, 3, 16))
    with pytest.raises(AttentionConfigError, match="expects int"):
        MultiHeadAttention(16, 2, "lavo", pattern="causal_self", attention_args={"w": "4"})
