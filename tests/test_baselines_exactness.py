"""Each baseline against what it claims: a float64 reference of its definition, or softmax.

The references here are written query by query (or token by token) from the papers' formulas,
independently of the vectorised implementations they check.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_zoo import Pattern
from attention_zoo.mechanisms.softmax import softmax_attention
from attention_zoo.testing import build_for_test, random_inputs

SELF_PATTERNS = [Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF]


def _right_padding(batch: int, length: int, pad: int) -> torch.Tensor:
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[-1, length - pad :] = True
    return padding


def _softmax_row(query, keys, values):
    """softmax(q . k_s / sqrt(D)) v for one query over a list of keys: [D], [n, D], [n, D]."""
    if keys.shape[0] == 0:
        return torch.zeros_like(query)
    weights = torch.softmax(keys @ query / math.sqrt(query.shape[-1]), dim=0)
    return weights @ values


# local -------------------------------------------------------------------------------------

def local_reference(q, k, v, *, window, kind, causal, key_padding_mask):
    batch, q_len, heads, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(q_len):
            if kind == "sliding":
                keys = [s for s in range(k.shape[1]) if (t - window < s <= t if causal
                                                          else abs(t - s) < window)]
            else:
                keys = [s for s in range(k.shape[1])
                        if s // window == t // window and (not causal or s <= t)]
            keys = [s for s in keys if key_padding_mask is None or not key_padding_mask[b, s]]
            for h in range(heads):
                out[b, t, h] = _softmax_row(q[b, t, h], k[b, keys, h], v[b, keys, h])
    return out


@pytest.mark.parametrize("pattern", [*SELF_PATTERNS, Pattern.CAUSAL_CROSS])
@pytest.mark.parametrize(("kind", "window"), [("sliding", 1), ("sliding", 3), ("blocked", 4)])
def test_local_matches_loop_reference(pattern, kind, window):
    attention = build_for_test("local", pattern, window=window, kind=kind)
    q_len, k_len = (9, 7) if pattern.cross else (11, 11)
    q, k, v = random_inputs(2, q_len, k_len)
    padding = _right_padding(2, k_len, 3)
    padding[0, 1] = True  # a hole inside a window as well
    expected = local_reference(q, k, v, window=window, kind=kind, causal=pattern.causal,
                               key_padding_mask=padding)
    torch.testing.assert_close(attention(q, k, v, padding), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", SELF_PATTERNS)
@pytest.mark.parametrize("kind", ["sliding", "blocked"])
def test_local_with_a_window_covering_everything_is_softmax(pattern, kind):
    q, k, v = random_inputs(2, 12, 12)
    padding = _right_padding(2, 12, 4)
    out = build_for_test("local", pattern, window=12, kind=kind)(q, k, v, padding)
    expected = softmax_attention(q, k, v, causal=pattern.causal, key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
