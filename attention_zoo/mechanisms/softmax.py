"""Plain softmax attention: the reference every other mechanism is measured against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, allowed_keys, masked_softmax
from attention_zoo.registry import register_attention

ALL_PATTERNS = frozenset(Pattern)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v with causal and padding masks; exact in any float dtype.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; key_padding_mask: [B, Lk] bool (True = pad).
        causal: query t sees keys s <= t (causal self attention: Lq == Lk).

    Returns:
        [B, Lq, H, D]. A query that sees no key gets zeros.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    allowed = allowed_keys(
        q.shape[1], k.shape[1], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    probs = masked_softmax(scores, allowed)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


@dataclass
class KVCache:
    """Decoding state of exact attention: every key and value so far, [B, t, H, D] each."""

    keys: Tensor
    values: Tensor


@register_attention("softmax")
class SoftmaxAttention(Attention):
    """Scaled dot-product softmax attention in plain PyTorch (the float64-checkable reference).

    out = softmax(q k^T / sqrt(D) + mask) v. Materialises the [B, H, Lq, Lk] score matrix: use it
    as the reference, ``sdpa`` for speed. Decodes with a key/value cache.
    """

    patterns = ALL_PATTERNS
    decoding = True
    complexity = Complexity.QUADRATIC
    reference = "Vaswani et al., Attention Is All You Need, NeurIPS 2017"
    exact_attention = staticmethod(softmax_attention)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        return self.exact_attention(
            q, k, v, causal=self.pattern.triangular, key_padding_mask=key_padding_mask
        )

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> KVCache:
        empty = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: KVCache, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, KVCache]:
        keys = torch.cat([state.keys, k], dim=1)  # [B, t+1, H, D]
        values = torch.cat([state.values, v], dim=1)
        # The new query is the newest position, so it sees the whole cache: no causal mask.
        return self.exact_attention(q, keys, values, causal=False), KVCache(keys, values)
