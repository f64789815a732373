"""LAVO against its definition (the docstring of attention_zoo/mechanisms/lavo/attention.py),
beyond the shared contract."""

from __future__ import annotations

import itertools

import pytest
import torch

from attention_zoo import AttentionConfigError, Pattern, build_attention
from attention_zoo.mechanisms.lavo import LAVOAttention, lavo_naive
from attention_zoo.testing import build_for_test, random_inputs

HEADS, DIM = 2, 8


def _fast_and_naive(pattern, length, *, padding=None, **config):
    attention = build_for_test("lavo", pattern, **config)
    q_len, k_len = (length, length + 4) if pattern.cross else (length, length)
    q, k, v = random_inputs(2, q_len, k_len)
    if padding is not None:
        mask = torch.zeros(2, k_len, dtype=torch.bool)
        mask[1, k_len - padding:] = True
    else:
        mask = None
    fast = attention(q, k, v, mask)
    naive = lavo_naive(
        q, k, v, bases=attention.bases, position_bias=attention.position_bias,
        w=attention.w, causal=pattern.causal, cross=pattern.cross,
        combine=attention.config.combine, key_padding_mask=mask,
    )
    if mask is not None and not pattern.cross:  # padded query rows are meaningless
        keep = ~mask
        return fast[keep], naive[keep]
    return fast, naive


@pytest.mark.parametrize("pattern", list(Pattern))
@pytest.mark.parametrize(("combine", "position", "bases"), list(itertools.product(
    ["average", "joint"], ["relative", "none"], ["fixed", "learned"])))
@pytest.mark.parametrize("length", [13, 16])  # 13 is not a multiple of w = 4
def test_factorised_equals_naive_memory(pattern, combine, position, bases, length):
    fast, naive = _fast_and_naive(pattern, length, w=4, r=5, combine=combine,
                                  position=position, bases=bases)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", list(Pattern))
def test_padding_matches_naive_definition(pattern):
    fast, naive = _fast_and_naive(pattern, 19, padding=6, w=4, r=6)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 7, 9, 23])
def test_length_not_multiple_of_window_equals_unpadded_definition(length):
    fast, naive = _fast_and_naive(Pattern.CAUSAL_SELF, length, w=8, r=4)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)
    fast, naive = _fast_and_naive(Pattern.NONCAUSAL_SELF, length, w=8, r=4)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


def _orthonormality_error(bases):
    eye = torch.eye(bases.shape[1], dtype=bases.dtype)
    return (bases @ bases.transpose(1, 2) - eye).abs().max().item()


def test_fixed_bases_are_orthonormal_buffers():
    attention = build_attention("lavo", pattern="causal_self", heads=4, head_dim=16, r=16)
    assert _orthonormality_error(attention.bases) < 1e-5
    assert "fixed_bases" in dict(attention.named_buffers())
    assert not any("bases" in name for name, _ in attention.named_parameters())


def test_learned_bases_stay_orthonormal_under_training():
    attention = build_attention("lavo", pattern="causal_self", heads=2, head_dim=16, r=8,
                                bases="learned")
    before = attention.bases.detach().clone()
    optimizer = torch.optim.Adam(attention.parameters(), lr=0.05)
    q, k, v = (torch.randn(2, 20, 2, 16) for _ in range(3))
    target = torch.randn(2, 20, 2, 16)
    for _ in range(25):
        loss = (attention(q, k, v) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = attention.bases.detach()
    assert (after - before).abs().max() > 1e-2, "the learned bases did not move"
    assert _orthonormality_error(after) < 1e-5


def test_r_larger_than_head_dim_is_a_clear_error():
    with pytest.raises(AttentionConfigError, match=r"r=9 exceeds head_dim=8.*orthonormal"):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, r=9)


def test_default_r_is_min_of_64_and_head_dim():
    small = build_attention("lavo", pattern="causal_self", heads=2, head_dim=16)
    large = build_attention("lavo", pattern="causal_self", heads=2, head_dim=128)
    assert (small.r, large.r) == (16, 64)


def test_parameters_beyond_projections_are_bias_and_learned_bases_only():
    def count(**config):
        attention = build_attention("lavo", heads=4, head_dim=16, w=8, **config)
        return sum(p.numel() for p in attention.parameters())

    assert count(pattern="causal_self") == 4 * (2 * 8 - 1)
    assert count(pattern="causal_self", position="none") == 0
    assert count(pattern="noncausal_cross") == 0  # no window, no bias
    assert count(pattern="noncausal_cross", bases="learned") == 4 * 16 * 16  # matrix_exp map


def test_decoding_state_is_bounded():
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=4, r=3)
    state = attention.init_state(1, dtype=torch.float64)
    q, k, v = random_inputs(1, 50, 50)
    for t in range(50):
        _, state = attention.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
        assert state.window_keys.shape[1] <= 3
        assert state.key_sum.shape == (1, HEADS, 3)
    assert state.count == 50


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, dtype=torch.float32, w=4, r=4)
    q, k, v = random_inputs(2, 300, 300, dtype=torch.float32)
    reference = attention(q, k, v)
    low = attention.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype))
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max() < 0.05
    state = attention.init_state(2, dtype=dtype)
    assert state.key_sum.dtype == torch.float32


def test_gradcheck_float64():
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=3, r=4, combine="joint")
    q, k, v = (t[:, :7].requires_grad_() for t in random_inputs(1, 7, 7))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c), (q, k, v))


def test_global_read_never_builds_per_position_memories():
    """The causal pass keeps only [B, L, H, r] tensors: no intermediate of size L*r*D."""
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=4, r=8)
    q, k, v = random_inputs(1, 64, 64)
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(q.requires_grad_(), k, v)
    assert largest < 64 * 8 * HEADS * DIM  # L * r * H * D


def test_is_registered_with_spec():
    spec = LAVOAttention.spec
    assert spec.name == "lavo" and spec.decoding and spec.patterns == frozenset(Pattern)
    assert [hp.name for hp in spec.hyperparameters] == ["r", "w", "bases", "position", "combine",
                                                       "backend"]
