"""LAVO's orthogonal memory and its global read, factorised (never an n x r x d tensor).

A memory is r slots. Slot j of the memory at query t is a fixed direction scaled by a scalar,
the mean coefficient H_tj of the visible context on basis j, so its key in head h is
``H_tj * key_bases[h, j] + key_bias[h]`` and its value ``H_tj * value_bases[h, j] + value_bias[h]``.
Two memories fit this form:

- ``memory="input"`` (:func:`input_memory`): one memory of the layer's input x, as the paper
  describes it. c_s = B x_s with B in R^{r x E} (orthonormal rows, one per layer), and the memory
  X~ = B (.) H is projected like any context: key_bases[h, j] = (W_k b_j)_h, value_bases[h, j] =
  (W_v b_j)_h, with the projections' biases.
- ``memory="kv"`` (:func:`kv_memory`): two memories of the projected keys and values, per head:
  c^k_s = B_h k_s, c^v_s = B_h v_s with B_h in R^{r x D}; key and value directions are B_h's rows.

:func:`global_read` is the whole global read; :func:`memory_logits` and :func:`memory_values`
are its two halves for a softmax shared with the local scores (``combine="joint"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attention_zoo.base import masked_softmax


@dataclass(frozen=True)
class OrthogonalMemory:
    """The coefficients of every context position and the slots' key and value directions.

    Attributes:
        key_coeffs: [B, Lk, G, r] coefficients of each position; G = H (one memory per head) or
            1 (one memory shared by every head).
        value_coeffs: [B, Lk, G, r], or None when the values read the same coefficients (one
            memory for keys and values).
        key_bases: [H, r, D] direction of slot j's key in head h.
        value_bases: [H, r, D].
        key_bias: [H, D] added to every slot's key, or None.
        value_bias: [H, D] added to every slot's value, or None.
    """

    key_coeffs: Tensor
    value_coeffs: Tensor | None
    key_bases: Tensor
    value_bases: Tensor
    key_bias: Tensor | None = None
    value_bias: Tensor | None = None


@dataclass(frozen=True)
class MemoryLogits:
    """The global read up to its softmax.

    Attributes:
        logits: [B, Lq, H, r] q_t . key_tj / sqrt(D).
        visible: [B, Lq or 1, 1, 1] bool, whether query t sees any context position.
        value_means: [B, Lq or 1, G, r] the mean value coefficients H^v_t.
    """

    logits: Tensor
    visible: Tensor
    value_means: Tensor


def kv_memory(k: Tensor, v: Tensor, bases: Tensor) -> OrthogonalMemory:
    """Per-head memories of the projected keys and values: k, v [B, Lk, H, D], bases [H, r, D]."""
    key_coeffs = torch.einsum("blhd,hrd->blhr", k, bases)
    value_coeffs = torch.einsum("blhd,hrd->blhr", v, bases)
    return OrthogonalMemory(key_coeffs, value_coeffs, bases, bases)


def input_memory(
    source: Tensor, bases: Tensor, k_proj: nn.Linear, v_proj: nn.Linear, heads: int
) -> OrthogonalMemory:
    """One memory of the layer's key/value-side input, projected like any context.

    Args:
        source: [B, Lk, E] the layer's input (before the projections).
        bases: [r, E] orthonormal rows.
        k_proj, v_proj: the layer's projections E -> H*D.
        heads: H.
    """
    dtype = source.dtype
    coeffs = torch.einsum("ble,re->blr", source, bases)[:, :, None]  # [B, Lk, 1, r]
    key_bases, value_bases = (_projected(bases, proj, heads, dtype) for proj in (k_proj, v_proj))
    return OrthogonalMemory(coeffs, None, key_bases, value_bases,
                            _heads(k_proj.bias, heads, dtype), _heads(v_proj.bias, heads, dtype))


def _projected(bases: Tensor, proj: nn.Linear, heads: int, dtype: torch.dtype) -> Tensor:
    """W b_j for every basis row, split into heads: [r, E] -> [H, r, D]."""
    weight = proj.weight.to(dtype)  # [H*D, E]
    return (bases @ weight.T).view(bases.shape[0], heads, -1).transpose(0, 1)


def _heads(bias: Tensor | None, heads: int, dtype: torch.dtype) -> Tensor | None:
    return None if bias is None else bias.to(dtype).view(heads, -1)  # [H, D]


def coefficient_means(
    coeffs: Tensor, valid: Tensor | None, *, causal: bool
) -> tuple[Tensor, Tensor]:
    """Mean coefficients over the visible positions, and how many there are.

    Args:
        coeffs: [B, Lk, G, r].
        valid: [B, Lk] bool (False at padding), or None.
        causal: running means over s <= t (causal self attention); else one mean over all.

    Returns:
        means [B, Lk or 1, G, r] (0 where nothing is visible) and counts [B, Lk or 1, 1, 1].
    """
    counts = coeffs.new_ones(coeffs.shape[0], coeffs.shape[1], 1, 1)
    if valid is not None:
        counts = valid.to(coeffs.dtype)[:, :, None, None]
        coeffs = coeffs * counts
    if causal:
        sums, counts = coeffs.cumsum(dim=1), counts.cumsum(dim=1)
    else:
        sums, counts = coeffs.sum(dim=1, keepdim=True), counts.sum(dim=1, keepdim=True)
    return sums / counts.clamp(min=1), counts


def memory_logits(
    q: Tensor, memory: OrthogonalMemory, valid: Tensor | None, *, causal: bool
) -> MemoryLogits:
    """The slot logits of every query: q [B, Lq, H, D] (Lq = Lk when causal)."""
    key_means, counts = coefficient_means(memory.key_coeffs, valid, causal=causal)
    value_means = key_means
    if memory.value_coeffs is not None:
        value_means, _ = coefficient_means(memory.value_coeffs, valid, causal=causal)
    logits = key_means * torch.einsum("blhd,hrd->blhr", q, memory.key_bases)
    if memory.key_bias is not None:
        logits = logits + torch.einsum("blhd,hd->blh", q, memory.key_bias)[..., None]
    return MemoryLogits(logits / math.sqrt(q.shape[-1]), counts > 0, value_means)


def memory_values(probs: Tensor, value_means: Tensor, memory: OrthogonalMemory) -> Tensor:
    """sum_j p_tj value_tj: probs [B, Lq, H, r] -> [B, Lq, H, D]."""
    out = torch.einsum("blhr,hrd->blhd", probs * value_means, memory.value_bases)
    if memory.value_bias is not None:
        out = out + probs.sum(dim=-1, keepdim=True) * memory.value_bias
    return out


def global_read(q: Tensor, memory: OrthogonalMemory, valid: Tensor | None, *, causal: bool) -> Tensor:
    """F_global: softmax over the r slots of each query's memory, [B, Lq, H, D].

    Causal: query t reads the running means over s <= t. Builds [B, L, G or H, r] tensors and
    the r x D directions, never the [B, L, H, r, D] per-position memories. A query that sees no
    context position gets zeros.
    """
    read = memory_logits(q, memory, valid, causal=causal)
    return memory_values(masked_softmax(read.logits, read.visible), read.value_means, memory)
