"""Gated linear attention: data-dependent per-channel decay (Yang et al., ICML 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
class GLAConfig:
    """Hyperparameters of gated linear attention (defaults of the paper)."""

    gate_rank: int = field(
        default=16, metadata={"help": "rank of the gate projection E -> r -> H*D", "min": 1})
    gate_temperature: float = field(
        default=16.0,
        metadata={"help": "tau in alpha = sigmoid(.)^(1/tau): larger keeps decays near 1",
                  "min": 1e-3})
    chunk_size: int = field(default=16, metadata=CHUNK_METADATA)
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


@register_attention("gla")
class GLAAttention(GatedRecurrentAttention):
    """Gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(D).

    The forget gate alpha_t in (0, 1)^D per head and key channel is computed from the layer
    input x_t by a low-rank projection: alpha_t = sigmoid(x_t W_1 W_2 + b)^(1 / tau) with
    W_1 [E, 16], W_2 [16, H D], tau = 16 (``gate_rank``, ``gate_temperature``); the read is
    RMS-normalised per head. Extra parameters: E r + r H D + H D. The paper's output gate and
    short convolutions belong to the layer around the core and are not part of it.

    The chunked parallel form works in chunks of C = 16 (``chunk_size``), per-channel decays
    inside a chunk by secondary chunking (no [C, C, D] decay tensor); decoding carries S,
    O(D^2) per head. Causal self attention only: the
    decay is a product over the positions between query and key of one sequence read left to
    right, and the paper defines no bidirectional or cross form.
    """

    Config = GLAConfig
    uses_layer_input = True
    complexity = Complexity.LINEAR
    reference = ("Yang, Wang, Shen, Panda and Kim, Gated Linear Attention Transformers with "
                 "Hardware-Efficient Training, ICML 2024 (arXiv 2312.06635)")

    def __init__(self, config: GLAConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.gate_down = nn.Linear(self.input_dim, config.gate_rank, bias=False)
        self.gate_up = nn.Linear(config.gate_rank, self.heads * self.head_dim)

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        logits = self.gate_up(self.gate_down(self.gate_input(layer_input)))  # [B, L, H*D]
        log_alpha = F.logsigmoid(logits.view(q.shape)) / self.config.gate_temperature
        return Recurrence(q / math.sqrt(self.head_dim), k, v, log_alpha)
