"""LAVO by its definition, one query at a time: the reference the fast path is tested against.

It builds the r x d orthogonal memory slots explicitly for every query (the "n x r x d"
computation the factorised form avoids) and never pads to a multiple of the window. Slow by
design; use it in float64 on small inputs only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from attention_zoo.base import LayerInput


def lavo_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bases: Tensor,
    position_bias: Tensor | None,
    w: int,
    causal: bool,
    cross: bool,
    combine: Literal["average", "joint"] = "average",
    key_padding_mask: Tensor | None = None,
    layer_input: LayerInput | None = None,
) -> Tensor:
    """LAVO as ``SPEC.md`` states it, query by query.

    The memory of query t's visible context, built explicitly as r slot vectors: with
    ``layer_input`` (``memory="input"``), X~ = B (.) H with H the mean of B x_s over the visible
    source inputs x_s, and the slots' keys and values are X~ through the layer's own key and
    value projections (biases included); without it (``memory="kv"``), per head, the slots
    mean(B k_s)_j b_j and mean(B v_s)_j b_j.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        bases: [r, E] (with ``layer_input``) or [H, r, D] orthonormal rows.
        position_bias: [H, 2w-1] relative bias of the local scores, or None.
        w: window size.
        causal: causal self attention (query t sees keys s <= t; cross attention sees the whole
            source, causal or not).
        cross: cross attention (global read only, no window).
        combine: "average" (mean of global and local reads) or "joint" (one softmax).
        key_padding_mask: [B, Lk] bool, True at padding.
        layer_input: the layer's input and projections, for ``memory="input"``.

    Returns:
        [B, Lq, H, D].
    """
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    valid = torch.ones(batch, k_len, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    out = torch.full_like(q, float("nan"))  # every entry must be written below
    for t in range(q_len):
        for b in range(batch):
            seen = [s for s in range(k_len) if valid[b, s] and (not causal or s <= t)]
            window: list[int] = []
            if not cross:
                start = (t // w) * w
                stop = t + 1 if causal else min(start + w, k_len)
                window = [s for s in range(start, stop) if valid[b, s]]
            slots = None if not seen or layer_input is None else _input_slots(
                layer_input, b, seen, bases, heads)  # keys, values: [r, H, D] each
            for h in range(heads):
                query = q[b, t, h]  # [D]
                logits, values = [], []
                if seen:
                    if slots is None:
                        basis = bases[h]  # [r, D]
                        key_memory = (k[b, seen, h] @ basis.T).mean(0)[:, None] * basis  # [r, D]
                        value_memory = (v[b, seen, h] @ basis.T).mean(0)[:, None] * basis
                    else:
                        key_memory, value_memory = slots[0][:, h], slots[1][:, h]
                    logits.append(key_memory @ query * scale)
                    values.append(value_memory)
                if window:
                    local_logits = k[b, window, h] @ query * scale  # [|window|]
                    if position_bias is not None:
                        offsets = torch.tensor([t - s + w - 1 for s in window], device=q.device)
                        local_logits = local_logits + position_bias[h, offsets]
                    logits.append(local_logits)
                    values.append(v[b, window, h])
                if not logits:
                    out[b, t, h] = 0.0
                elif combine == "joint" or len(logits) == 1:
                    probs = torch.softmax(torch.cat(logits), dim=0)
                    out[b, t, h] = probs @ torch.cat(values)
                else:
                    reads = [torch.softmax(lg, dim=0) @ val for lg, val in zip(logits, values)]
                    out[b, t, h] = (reads[0] + reads[1]) / 2
    return out


def _input_slots(
    layer_input: LayerInput, b: int, seen: list[int], bases: Tensor, heads: int
) -> tuple[Tensor, Tensor]:
    """The memory X~ = B (.) mean_s(B x_s) of sample b's inputs at ``seen``, through the layer's
    key and value projections: keys and values [r, H, D]."""
    coeffs = (layer_input.source[b, seen] @ bases.T).mean(0)  # [r]
    memory = coeffs[:, None] * bases  # [r, E]: slot j is H_j b_j
    keys = layer_input.k_proj(memory).view(bases.shape[0], heads, -1)
    values = layer_input.v_proj(memory).view(bases.shape[0], heads, -1)
    return keys, values
