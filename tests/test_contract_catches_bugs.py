"""The contract checks themselves: each must fail on a mechanism with the bug it looks for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_zoo import Pattern, register_attention
from attention_zoo.mechanisms.lavo import LAVOAttention
from attention_zoo.mechanisms.softmax import SoftmaxAttention, softmax_attention
from attention_zoo.testing import (
    check_batch_invariance,
    check_causal_cross,
    check_decoding,
    check_gradients,
    check_no_future_leak,
    check_padding_invariance,
)

pytestmark = pytest.mark.zoo

SELF = Pattern.CAUSAL_SELF


def _register(scratch, name, cls):
    """Register ``cls`` in the scratch registry (restored after the test) and return its name."""
    register_attention(name)(cls)
    return name


def test_future_leak_is_caught(scratch_registry):
    class PeeksAhead(SoftmaxAttention):
        """Causal softmax that also sees the next token."""

        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            shifted = torch.cat([k[:, 1:], k[:, -1:]], dim=1)
            return softmax_attention(q, k + shifted, v, causal=True)

    name = _register(scratch_registry, "peeks_ahead", PeeksAhead)
    with pytest.raises(AssertionError, match="future leaks"):
        check_no_future_leak(name, SELF)


def test_lavo_with_a_global_mean_in_causal_mode_leaks(scratch_registry):
    class LeakyLAVO(LAVOAttention):
        """LAVO whose causal memory is the mean over the whole sequence."""

        def _backend(self, q, key_padding_mask):
            return "torch"  # the plain path, whose memory this class breaks

        def _memory(self, k, v, layer_input, dtype):
            memory = super()._memory(k, v, layer_input, dtype)
            coeffs = memory.key_coeffs.mean(1, keepdim=True).expand_as(memory.key_coeffs)
            return dataclasses.replace(memory, key_coeffs=coeffs)

    name = _register(scratch_registry, "leaky_lavo", LeakyLAVO)
    with pytest.raises(AssertionError, match="future leaks"):
        check_no_future_leak(name, SELF)


def test_batch_mixing_is_caught(scratch_registry):
    class BatchMixer(LAVOAttention):
        """LAVO whose memory is shared across the batch (statistics over the batch)."""

        def _backend(self, q, key_padding_mask):
            return "torch"  # the plain path, whose memory this class breaks

        def _memory(self, k, v, layer_input, dtype):
            memory = super()._memory(k, v, layer_input, dtype)
            coeffs = memory.key_coeffs.mean(0, keepdim=True).expand_as(memory.key_coeffs)
            return dataclasses.replace(memory, key_coeffs=coeffs)

    name = _register(scratch_registry, "batch_mixer", BatchMixer)
    with pytest.raises(AssertionError, match=r"batched with others|other samples change"):
        check_batch_invariance(name, SELF)


def test_ignored_padding_is_caught(scratch_registry):
    class IgnoresPadding(SoftmaxAttention):
        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            return super().attend(q, k, v, None)

    name = _register(scratch_registry, "ignores_padding", IgnoresPadding)
    for pattern in (Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS):
        with pytest.raises(AssertionError, match="padding"):
            check_padding_invariance(name, pattern)


def test_wrong_decoding_is_caught(scratch_registry):
    class ForgetfulDecoder(SoftmaxAttention):
        """Decodes with a cache of the last 4 tokens only."""

        def step(self, q, k, v, state):
            out, state = super().step(q, k, v, state)
            state.keys, state.values = state.keys[:, -4:], state.values[:, -4:]
            return out, state

    name = _register(scratch_registry, "forgetful", ForgetfulDecoder)
    with pytest.raises(AssertionError, match="decoding differs"):
        check_decoding(name, SELF)


def test_dead_parameter_is_caught(scratch_registry):
    class DeadParameter(SoftmaxAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unused = torch.nn.Parameter(torch.zeros(3))

    name = _register(scratch_registry, "dead_parameter", DeadParameter)
    with pytest.raises(AssertionError, match="gets no gradient"):
        check_gradients(name, SELF)


def test_index_aligned_causal_cross_is_caught(scratch_registry):
    class IndexAligned(SoftmaxAttention):
        """Causal cross attention as query t seeing source positions s <= t."""

        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            if not self.pattern.cross:
                return super().attend(q, k, v, key_padding_mask)
            visible = torch.arange(k.shape[1])[None, :] <= torch.arange(q.shape[1])[:, None]
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~visible, float("-inf"))
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None], float("-inf"))
            return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1).nan_to_num(), v)

    name = _register(scratch_registry, "index_aligned", IndexAligned)
    with pytest.raises(AssertionError, match="does not reach query 0"):
        check_causal_cross(name, Pattern.CAUSAL_CROSS)


def test_query_pooling_in_causal_cross_attention_is_caught(scratch_registry):
    class PoolsQueries(SoftmaxAttention):
        """Cross attention whose queries are centred on their mean over positions."""

        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            return super().attend(q - q.mean(1, keepdim=True), k, v, key_padding_mask)

    name = _register(scratch_registry, "pools_queries", PoolsQueries)
    with pytest.raises(AssertionError, match="queries after it are removed"):
        check_causal_cross(name, Pattern.CAUSAL_CROSS)

    class PoolsQueryPrefix(SoftmaxAttention):
        """Queries centred on the running mean of the queries so far: causal, not decodable
        one query at a time."""

        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            counts = torch.arange(1, q.shape[1] + 1, dtype=q.dtype)[None, :, None, None]
            return super().attend(q - q.cumsum(1) / counts, k, v, key_padding_mask)

    name = _register(scratch_registry, "pools_query_prefix", PoolsQueryPrefix)
    check_causal_cross(name, Pattern.CAUSAL_CROSS)
    with pytest.raises(AssertionError, match="decoded alone against the whole source"):
        check_decoding(name, Pattern.CAUSAL_CROSS)
