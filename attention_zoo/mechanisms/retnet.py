"""Retention: linear attention with a fixed exponential decay per head (Sun et al., 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attention_zoo.base import Complexity, Pattern
from attention_zoo.mechanisms.gated_recurrence import (
    BACKEND_METADATA,
    CHUNK_METADATA,
    Backend,
    GatedRecurrentAttention,
    Recurrence,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class RetNetConfig:
    """Hyperparameters of retention."""

    chunk_size: int = field(default=64, metadata=CHUNK_METADATA)
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


def retention_log_decay(heads: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """log gamma_h with gamma_h = 1 - 2^(-5 - h), h = 0..H-1 (the paper's multi-scale decays): [H]."""
    exponent = -5.0 - torch.arange(heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, exponent)).to(dtype)


@register_attention("retnet")
class RetNetAttention(GatedRecurrentAttention):
    """Retention: out_t = sum_{s <= t} gamma_h^(t - s) (q_t . k_s / sqrt(D)) v_s, per-head RMS norm.

    Head h decays with the fixed gamma_h = 1 - 2^(-5 - h) (multi-scale retention); the read is
    normalised per head (the paper's GroupNorm, as RMS norm without parameters). Recurrent form
    (decoding): S_t = gamma S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(D); the parallel form is
    chunked. The paper's xPos rotation, output gate and projections belong to the layer, not
    this core. No parameters, no hyperparameters beyond the chunk length and the backend.

    Non-causal self attention uses the symmetric decay gamma^|t - s| of the vision retentive
    networks (Fan et al., RMT, CVPR 2024): a forward and a backward scan, the diagonal counted
    once. Cross attention is not declared: the decay is a distance between positions of one
    sequence. Time O(n C D + n D^2), decoding state O(D^2) per head.
    """

    Config = RetNetConfig
    patterns = frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF})
    complexity = Complexity.LINEAR
    reference = ("Sun et al., Retentive Network: A Successor to Transformer for Large Language "
                 "Models, arXiv 2307.08621 (2023)")

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        decay = retention_log_decay(self.heads, dtype=q.dtype, device=q.device)
        return Recurrence(q / math.sqrt(self.head_dim), k, v, decay.expand(*q.shape[:3]))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: Any = None,
    ) -> Tensor:
        if self.pattern.causal:
            return super().attend(q, k, v, key_padding_mask, layer_input)
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask[:, :, None, None], 0.0)
        terms = self.recurrence(q, k, v, layer_input)
        backward = Recurrence(*(t.flip(1) for t in (terms.q, terms.k, terms.v, terms.log_decay)))
        diagonal = (terms.q * terms.k).sum(-1, keepdim=True) * v  # s = t, in both scans
        out = self.run(terms) + self.run(backward).flip(1) - diagonal
        return self.finish(out, q, k, v, layer_input)
