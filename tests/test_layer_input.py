"""Mechanisms that read the layer's input (``uses_layer_input``): contract, layer and adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention_zoo import LayerInput, MultiHeadAttention, Pattern, register_attention
from attention_zoo.mechanisms.softmax import SoftmaxAttention, softmax_attention
from attention_zoo.testing import (
    build_for_test,
    check_contract,
    check_decoding,
    check_no_future_leak,
    check_padding_invariance,
    random_layer_input,
)

pytestmark = pytest.mark.zoo


class InputGated(SoftmaxAttention):
    """Softmax attention whose values are gated by the source input and whose output is gated by
    the query input: out_t = sigmoid(g(x_t)) * softmax(q_t k^T) (sigmoid(f(s)) * v)."""

    uses_layer_input = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.query_gate = nn.Linear(self.input_dim, self.heads)
        self.source_gate = nn.Linear(self.source_dim, self.heads)

    def gates(self, layer_input: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Lq, H, 1] and [B, Lk, H, 1]."""
        return (torch.sigmoid(self.query_gate(layer_input.query))[..., None],
                torch.sigmoid(self.source_gate(layer_input.source))[..., None])

    def attend(self, q, k, v, key_padding_mask, layer_input=None):
        out_gate, value_gate = self.gates(layer_input)
        return super().attend(q, k, v * value_gate, key_padding_mask) * out_gate

    def step(self, q, k, v, state, *, layer_input=None):
        out_gate, value_gate = self.gates(self.require_layer_input(layer_input, q, k))
        out, state = super().step(q, k, v * value_gate, state)
        return out * out_gate, state


@pytest.fixture
def gated(scratch_registry):
    register_attention("input_gated")(InputGated)
    return "input_gated"


def test_contract_checks_cover_layer_input_mechanisms(gated):
    check_contract(gated)


def test_contract_checks_see_the_layer_input(scratch_registry):
    class GateFromWholeInput(InputGated):
        """Gates every position by the mean input over all positions: leaks the future and
        reads padding."""

        def gates(self, layer_input):
            mean = layer_input.query.mean(1, keepdim=True).expand_as(layer_input.query)
            return super().gates(LayerInput(mean, layer_input.source, layer_input.q_proj,
                                            layer_input.k_proj, layer_input.v_proj))

    register_attention("gate_from_whole_input")(GateFromWholeInput)
    with pytest.raises(AssertionError, match="the future leaks"):
        check_no_future_leak("gate_from_whole_input", Pattern.CAUSAL_SELF)
    with pytest.raises(AssertionError, match="padding"):
        check_padding_invariance("gate_from_whole_input", Pattern.NONCAUSAL_SELF)

    class DecodesWithoutSourceGate(InputGated):
        def step(self, q, k, v, state, *, layer_input=None):
            out_gate, _ = self.gates(self.require_layer_input(layer_input, q, k))
            out, state = SoftmaxAttention.step(self, q, k, v, state)
            return out * out_gate, state

    register_attention("decodes_without_source_gate")(DecodesWithoutSourceGate)
    with pytest.raises(AssertionError, match="decoding differs"):
        check_decoding("decodes_without_source_gate", Pattern.CAUSAL_SELF)


def test_missing_or_misshapen_layer_input_is_refused(gated):
    attention = build_for_test(gated, Pattern.CAUSAL_SELF)
    q, k, v, layer_input = random_layer_input(2, 5, 5, input_dim=16)
    with pytest.raises(ValueError, match="input_gated: declares uses_layer_input"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="input_gated: declares uses_layer_input"):
        attention.step(q[:, :1], k[:, :1], v[:, :1], attention.init_state(2, dtype=q.dtype))
    short = LayerInput(layer_input.query[:, :4], layer_input.source, layer_input.q_proj,
                       layer_input.k_proj, layer_input.v_proj)
    with pytest.raises(ValueError, match=r"layer_input.query must be \[B, L, E\] = \[2, 5, 16\]"):
        attention(q, k, v, layer_input=short)
    assert attention(q, k, v, layer_input=layer_input).shape == q.shape


def test_layer_passes_its_input_and_projections(gated):
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, gated, pattern="noncausal_cross", kdim=12, vdim=12).double()
    assert (layer.attention.input_dim, layer.attention.source_dim) == (32, 12)
    x, memory = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    attention = layer.attention
    q, k, v = (p(t).view(2, -1, 4, 8) for p, t in ((layer.q_proj, x), (layer.k_proj, memory),
                                                    (layer.v_proj, memory)))
    value_gate = torch.sigmoid(attention.source_gate(memory))[..., None]
    core = softmax_attention(q, k, v * value_gate, causal=False)
    expected = layer.out_proj((core * torch.sigmoid(attention.query_gate(x))[..., None]).flatten(2))
    torch.testing.assert_close(layer(x, memory), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one source tensor"):
        layer(x, memory, memory.clone())
    with pytest.raises(ValueError, match="kdim=12, vdim=10"):
        MultiHeadAttention(32, 4, gated, pattern="noncausal_cross", kdim=12, vdim=10)


def test_layer_decoding_passes_the_new_position(gated):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, gated, pattern="causal_self").double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    state = layer.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(9):
        out, state = layer.step(x[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), layer(x), rtol=0, atol=1e-12)


def test_espnet_adapter_passes_the_layer_input(gated):
    pytest.importorskip("espnet")
    from tasks.base import AttentionChoice
    from tasks.tts.adapter import EspnetAttentionAdapter

    torch.manual_seed(0)
    adapter = EspnetAttentionAdapter(4, 32, AttentionChoice(gated), Pattern.NONCAUSAL_CROSS).double()
    layer = MultiHeadAttention(32, 4, gated, pattern="noncausal_cross").double()
    for source, target in (("linear_q", "q_proj"), ("linear_k", "k_proj"), ("linear_v", "v_proj"),
                           ("linear_out", "out_proj"), ("attention", "attention")):
        getattr(layer, target).load_state_dict(getattr(adapter, source).state_dict())
    x, memory = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(adapter(x, memory, memory, None), layer(x, memory), rtol=0, atol=1e-12)


def test_fairseq_adapter_decodes_a_layer_input_mechanism(gated):
    pytest.importorskip("fairseq")
    from tasks.backends.fairseq_plugin import ZooAttention

    torch.manual_seed(0)
    adapter = ZooAttention(16, 2, gated, pattern=Pattern.CAUSAL_SELF).double()
    x = torch.randn(6, 2, 16, dtype=torch.float64)  # [T, B, C]
    parallel, _ = adapter(x, x, x)
    state: dict = {}
    steps = [adapter(x[t : t + 1], x[t : t + 1], x[t : t + 1], incremental_state=state)[0]
             for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 0), parallel, rtol=0, atol=1e-12)
