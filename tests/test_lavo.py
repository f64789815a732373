"""LAVO against its definition (SPEC.md), beyond the shared contract."""

from __future__ import annotations

import itertools

import pytest
import torch

from attention_zoo import AttentionConfigError, LayerInput, MultiHeadAttention, Pattern, build_attention
from attention_zoo.mechanisms.lavo import LAVOAttention, lavo_naive
from attention_zoo.testing import build_for_test, random_inputs, random_layer_input

pytestmark = pytest.mark.zoo

HEADS, DIM = 2, 8


SOURCE_DIM = 12  # cross attention's source width differs from the query side's (H * D = 16)


def _inputs(attention, q_len, k_len):
    """q, k, v and the layer input (None for memory="kv") of a test pass."""
    if not attention.needs_layer_input:
        return (*random_inputs(2, q_len, k_len), None)
    cross = attention.pattern.cross
    return random_layer_input(2, q_len, k_len, input_dim=HEADS * DIM, cross=cross,
                              source_dim=SOURCE_DIM if cross else None)


def _fast_and_naive(pattern, length, *, padding=None, memory="input", **config):
    source_dim = SOURCE_DIM if pattern.cross and memory == "input" else None
    attention = build_for_test("lavo", pattern, memory=memory, source_dim=source_dim, **config)
    q_len, k_len = (length, length + 4) if pattern.cross else (length, length)
    q, k, v, layer_input = _inputs(attention, q_len, k_len)
    if padding is not None:
        mask = torch.zeros(2, k_len, dtype=torch.bool)
        mask[1, k_len - padding:] = True
        if pattern.cross:
            mask[0, 1] = True
    else:
        mask = None
    fast = attention(q, k, v, mask, layer_input=layer_input)
    naive = lavo_naive(
        q, k, v, bases=attention.bases, position_bias=attention.position_bias,
        w=attention.w, causal=pattern.triangular, cross=pattern.cross,
        combine=attention.config.combine, key_padding_mask=mask, layer_input=layer_input,
    )
    if mask is not None and not pattern.cross:  # padded query rows are meaningless
        keep = ~mask
        return fast[keep], naive[keep]
    return fast, naive


# Cross attention has no window: combine and position do not apply there.
OPTION_CASES = [(pattern, combine, position, bases)
                for pattern in Pattern
                for combine, position in (
                    [("average", "relative")] if pattern.cross
                    else itertools.product(["average", "joint"], ["relative", "none"]))
                for bases in ("fixed", "learned")]


@pytest.mark.parametrize("memory", ["input", "kv"])
@pytest.mark.parametrize(("pattern", "combine", "position", "bases"), OPTION_CASES)
def test_factorised_equals_naive_memory(memory, pattern, combine, position, bases):
    for length in (13, 16):  # 13 is not a multiple of w = 4
        fast, naive = _fast_and_naive(pattern, length, memory=memory, w=4, r=5, combine=combine,
                                      position=position, bases=bases)
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", ["input", "kv"])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_padding_matches_naive_definition(memory, pattern):
    fast, naive = _fast_and_naive(pattern, 19, padding=6, memory=memory, w=4, r=6)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", ["input", "kv"])
@pytest.mark.parametrize("length", [1, 5, 7, 9, 23])
def test_length_not_multiple_of_window_equals_unpadded_definition(memory, length):
    fast, naive = _fast_and_naive(Pattern.CAUSAL_SELF, length, memory=memory, w=8, r=4)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)
    fast, naive = _fast_and_naive(Pattern.NONCAUSAL_SELF, length, memory=memory, w=8, r=4)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("combine", ["average", "joint"])
@pytest.mark.parametrize("bases", ["fixed", "learned"])
def test_input_memory_decoding_equals_naive_definition(combine, bases):
    """Token by token (the state keeps the sum of B x_s; the slot keys are never formed) equals
    the definition that projects the explicit memory X~ = B (.) H_t, in float64."""
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=3, r=5, combine=combine, bases=bases)
    q, k, v, layer_input = _inputs(attention, 11, 11)
    naive = lavo_naive(q, k, v, bases=attention.bases, position_bias=attention.position_bias,
                       w=3, causal=True, cross=False, combine=combine, layer_input=layer_input)
    state = attention.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(11):
        position = LayerInput(layer_input.query[:, t : t + 1], layer_input.source[:, t : t + 1],
                              layer_input.q_proj, layer_input.k_proj, layer_input.v_proj)
        out, state = attention.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state,
                                    layer_input=position)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), naive, rtol=0, atol=1e-12)
    assert state.key_sum.shape == (2, 1, 5) and state.value_sum is None


def test_input_memory_is_one_memory_of_the_layer_input():
    """Cross attention reads one memory of the source input x: the projected keys and values
    do not enter it (only q, x and the layer's projections do), and x does."""
    attention = build_for_test("lavo", Pattern.NONCAUSAL_CROSS, r=4, source_dim=SOURCE_DIM)
    q, k, v, layer_input = _inputs(attention, 6, 9)
    out = attention(q, k, v, layer_input=layer_input)
    other_k, other_v = random_inputs(2, 9, 9, seed=9)[1:]
    torch.testing.assert_close(attention(q, other_k, other_v, layer_input=layer_input), out,
                               rtol=0, atol=0)
    moved = LayerInput(layer_input.query, layer_input.source + 1.0, layer_input.q_proj,
                       layer_input.k_proj, layer_input.v_proj)
    assert (attention(q, k, v, layer_input=moved) - out).abs().max() > 1e-3


def test_input_memory_needs_the_layer_input_and_kv_does_not():
    q, k, v = random_inputs(2, 5, 5)
    with pytest.raises(ValueError, match="lavo: declares uses_layer_input"):
        build_for_test("lavo", Pattern.CAUSAL_SELF)(q, k, v)
    assert build_for_test("lavo", Pattern.CAUSAL_SELF, memory="kv")(q, k, v).shape == q.shape


def _orthonormality_error(bases):
    bases = bases if bases.ndim == 3 else bases[None]
    eye = torch.eye(bases.shape[1], dtype=bases.dtype)
    return (bases @ bases.transpose(1, 2) - eye).abs().max().item()


@pytest.mark.parametrize(("memory", "shape"), [("input", (16, 64)), ("kv", (4, 16, 16))])
def test_fixed_bases_are_orthonormal_buffers(memory, shape):
    attention = build_attention("lavo", pattern="causal_self", heads=4, head_dim=16, r=16,
                                memory=memory)
    assert attention.bases.shape == shape  # input memory: [r, E], one per layer
    assert _orthonormality_error(attention.bases) < 1e-5
    assert "fixed_bases" in dict(attention.named_buffers())
    assert not any("bases" in name for name, _ in attention.named_parameters())


@pytest.mark.parametrize("memory", ["input", "kv"])
def test_learned_bases_stay_orthonormal_under_training(memory):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, "lavo", pattern="causal_self",
                               attention_args={"r": 6, "w": 4, "bases": "learned", "memory": memory})
    before = layer.attention.bases.detach().clone()
    optimizer = torch.optim.Adam(layer.attention.parameters(), lr=0.05)
    x, target = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    for _ in range(15):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = layer.attention.bases.detach()
    assert (after - before).abs().max() > 1e-2, "the learned bases did not move"
    assert _orthonormality_error(after) < 1e-5


def test_r_larger_than_the_memory_width_is_a_clear_error():
    with pytest.raises(AttentionConfigError, match=r"r=9 exceeds head_dim=8 \(memory='kv'\).*orthonormal"):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, r=9, memory="kv")
    with pytest.raises(AttentionConfigError, match=r"r=13 exceeds the layer input width=12"):
        build_attention("lavo", pattern="causal_cross", heads=2, head_dim=8, r=13, source_dim=12)
    assert build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, r=16).r == 16


def test_default_r_is_64_or_the_memory_width():
    def r(**config):
        return build_attention("lavo", pattern="causal_self", heads=2, **config).r

    assert (r(head_dim=16, memory="kv"), r(head_dim=128, memory="kv")) == (16, 64)
    assert (r(head_dim=16), r(head_dim=8, input_dim=24), r(head_dim=64)) == (32, 24, 64)


def test_parameters_beyond_projections_are_bias_and_learned_bases_only():
    def count(**config):
        attention = build_attention("lavo", heads=4, head_dim=16, w=8, **config)
        return sum(p.numel() for p in attention.parameters())

    assert count(pattern="causal_self") == 4 * (2 * 8 - 1)
    assert count(pattern="causal_self", position="none") == 0
    assert count(pattern="noncausal_cross") == 0  # no window, no bias
    assert count(pattern="noncausal_cross", bases="learned") == 64 * 64  # matrix_exp map, E x E
    assert count(pattern="noncausal_cross", bases="learned", memory="kv") == 4 * 16 * 16


@pytest.mark.parametrize(("memory", "groups"), [("input", 1), ("kv", HEADS)])
def test_decoding_state_is_bounded(memory, groups):
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=4, r=3, memory=memory)
    state = attention.init_state(1, dtype=torch.float64)
    q, k, v, layer_input = _inputs(attention, 50, 50)
    for t in range(50):
        position = None if layer_input is None else LayerInput(
            layer_input.query[:1, t:t + 1], layer_input.source[:1, t:t + 1], layer_input.q_proj,
            layer_input.k_proj, layer_input.v_proj)
        _, state = attention.step(q[:1, t:t + 1], k[:1, t:t + 1], v[:1, t:t + 1], state,
                                  layer_input=position)
        assert state.window_keys.shape[1] <= 3
        assert state.key_sum.shape == (1, groups, 3)
    assert state.count == 50


@pytest.mark.parametrize("memory", ["input", "kv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(memory, dtype):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, "lavo", pattern="causal_self",
                               attention_args={"w": 4, "r": 4, "memory": memory})
    x = torch.randn(2, 300, 16)
    reference = layer(x)
    low = layer.to(dtype)(x.to(dtype))
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max() < 0.05
    state = layer.init_state(2, dtype=dtype)
    assert state.key_sum.dtype == torch.float32


@pytest.mark.parametrize("memory", ["input", "kv"])
def test_gradcheck_float64(memory):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, "lavo", pattern="causal_self",
                               attention_args={"w": 3, "r": 4, "combine": "joint", "memory": memory})
    x = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer.double(), (x,))


@pytest.mark.parametrize("memory", ["input", "kv"])
def test_global_read_never_builds_per_position_memories(memory):
    """The causal pass keeps only [B, L, H, r] tensors and the r x D projected bases: no
    intermediate of size L*r*D."""
    attention = build_for_test("lavo", Pattern.CAUSAL_SELF, w=4, r=8, memory=memory)
    q, k, v, layer_input = _inputs(attention, 64, 64)
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(q.requires_grad_(), k, v, layer_input=layer_input)
    assert largest < 64 * 8 * HEADS * DIM  # L * r * H * D


def test_is_registered_with_spec():
    spec = LAVOAttention.spec
    assert spec.name == "lavo" and spec.decoding and spec.patterns == frozenset(Pattern)
    assert spec.uses_layer_input and spec.hyperparameter("memory").default == "input"
    assert [hp.name for hp in spec.hyperparameters] == ["r", "w", "memory", "bases", "position",
                                                       "combine", "backend"]
