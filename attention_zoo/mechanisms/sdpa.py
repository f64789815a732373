"""PyTorch's fused scaled_dot_product_attention: the FlashAttention baseline on GPU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attention_zoo.base import allowed_keys
from attention_zoo.mechanisms.softmax import SoftmaxAttention
from attention_zoo.registry import register_attention


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; key_padding_mask: [B, Lk] bool (True = pad).

    Returns:
        [B, Lq, H, D]; a query that sees no key gets zeros (SDPA itself would give NaN).
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    if key_padding_mask is None:
        # is_causal is top-left aligned (query t sees keys s <= t): causal self attention, and the
        # flash kernel's fast path on GPU.
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
        return out.transpose(1, 2)
    allowed = allowed_keys(
        q.shape[1], k.shape[1], causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    any_allowed = allowed.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]
    # Rows with no visible key would be NaN: let them see everything, then zero them.
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed | ~any_allowed)
    return (out * any_allowed).transpose(1, 2)


@register_attention("sdpa")
class SDPAttention(SoftmaxAttention):
    """PyTorch's fused softmax attention (FlashAttention / memory-efficient kernels on GPU).

    Exact: equals ``softmax`` to floating-point tolerance. Without a padding mask, causal self
    attention takes the ``is_causal`` flash path; with one, an explicit boolean mask. Decodes
    with a key/value cache.
    """

    reference = (
        "Dao et al., FlashAttention, NeurIPS 2022; "
        "torch.nn.functional.scaled_dot_product_attention"
    )
    exact_attention = staticmethod(sdpa_attention)
