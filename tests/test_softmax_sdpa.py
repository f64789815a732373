"""The exact members against a loop-by-loop float64 reference, and against each other."""

from __future__ import annotations

import math

import pytest
import torch

from attention_zoo import Pattern
from attention_zoo.testing import build_for_test, random_inputs

pytestmark = pytest.mark.zoo


def reference(q, k, v, *, causal, key_padding_mask):
    batch, q_len, heads, dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for t in range(q_len):
                keys = [s for s in range(k.shape[1])
                        if (not causal or s <= t)
                        and (key_padding_mask is None or not key_padding_mask[b, s])]
                if not keys:
                    continue
                scores = torch.stack([q[b, t, h] @ k[b, s, h] for s in keys]) / math.sqrt(dim)
                weights = torch.softmax(scores, 0)
                out[b, t, h] = sum(w * v[b, s, h] for w, s in zip(weights, keys))
    return out


@pytest.mark.parametrize("name", ["softmax", "sdpa"])
@pytest.mark.parametrize("pattern", list(Pattern))
def test_matches_reference(name, pattern):
    attention = build_for_test(name, pattern)
    q_len, k_len = (6, 9) if pattern.cross else (7, 7)
    q, k, v = random_inputs(2, q_len, k_len)
    padding = torch.zeros(2, k_len, dtype=torch.bool)
    padding[0, 0] = padding[1, -3:] = True  # query 0 of sample 0 sees nothing when causal
    expected = reference(q, k, v, causal=pattern.triangular, key_padding_mask=padding)
    torch.testing.assert_close(attention(q, k, v, padding), expected, rtol=0, atol=1e-12)
    expected = reference(q, k, v, causal=pattern.triangular, key_padding_mask=None)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=0, atol=1e-12)


def test_sdpa_float32_agrees_with_softmax():
    q, k, v = random_inputs(2, 64, 64, dtype=torch.float32)
    for pattern in Pattern:
        a = build_for_test("softmax", pattern, dtype=torch.float32)(q, k, v)
        b = build_for_test("sdpa", pattern, dtype=torch.float32)(q, k, v)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
