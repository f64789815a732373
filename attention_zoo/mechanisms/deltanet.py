"""DeltaNet: linear attention with the delta rule (Schlag et al., 2021; Yang et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import Complexity
from attention_zoo.mechanisms.gated_recurrence import (
    BACKEND_METADATA,
    CHUNK_METADATA,
    Backend,
    GatedRecurrentAttention,
    Recurrence,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class DeltaNetConfig:
    """Hyperparameters of DeltaNet."""

    chunk_size: int = field(default=64, metadata=CHUNK_METADATA)
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


def delta_features(x: Tensor) -> Tensor:
    """The delta rule's query and key map: SiLU, then L2 normalisation over D. [..., D] -> [..., D]."""
    return F.normalize(F.silu(x), dim=-1, eps=1e-6)


@register_attention("deltanet")
class DeltaNetAttention(GatedRecurrentAttention):
    """DeltaNet: S_t = S_{t-1} - beta_t k_t (k_t^T S_{t-1} - v_t^T), o_t = S_t^T q_t / sqrt(D).

    The memory replaces the value it holds for key k_t by v_t with strength beta_t =
    sigmoid(x_t W_beta + b) [H], computed from the layer input. Queries and keys go through
    SiLU and L2 normalisation (so I - beta k k^T is a contraction), the read is RMS-normalised
    per head. Extra parameters: E H + H. The short convolutions of the paper's layer are not
    part of the core.

    Chunked parallel form: the UT transform of Yang et al. (one triangular solve per chunk of
    64), then the state across chunks; decoding carries the [D, D] state per head. Causal self
    attention only: the delta rule is an ordered sequence of writes with no bidirectional or
    cross form in the papers.
    """

    Config = DeltaNetConfig
    uses_layer_input = True
    complexity = Complexity.LINEAR
    reference = ("Yang, Wang, Zhang, Shen and Kim, Parallelizing Linear Transformers with the "
                 "Delta Rule over Sequence Length, NeurIPS 2024 (arXiv 2406.06484); Schlag, Irie "
                 "and Schmidhuber, Linear Transformers Are Secretly Fast Weight Programmers, "
                 "ICML 2021")

    def __init__(self, config: DeltaNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.beta_proj = nn.Linear(self.input_dim, self.heads)

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        beta = torch.sigmoid(self.beta_proj(self.gate_input(layer_input)))  # [B, L, H]
        return Recurrence(delta_features(q) / math.sqrt(self.head_dim), delta_features(k), v,
                          beta=beta)
