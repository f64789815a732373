"""Gated DeltaNet: the delta rule with a Mamba-2 decay (Yang, Kautz and Hatamizadeh, ICLR 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import Complexity
from attention_zoo.mechanisms.deltanet import delta_features
from attention_zoo.mechanisms.gated_recurrence import GatedRecurrentAttention, Recurrence
from attention_zoo.mechanisms.mamba2 import Mamba2Config, log_decay_rates, step_size_parameters
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class GatedDeltaNetConfig(Mamba2Config):
    """Hyperparameters of Gated DeltaNet: its decay is Mamba-2's, with Mamba-2's initialisation."""


@register_attention("gated_deltanet")
class GatedDeltaNetAttention(GatedRecurrentAttention):
    """Gated DeltaNet: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

    o_t = S_t^T q_t / sqrt(D). Both gates come from the layer input x_t: the write strength
    beta_t = sigmoid(x_t W_beta + b) and the decay alpha_t = exp(-a_h softplus(x_t W_a + b_a)),
    one scalar per head and token, parametrised as Mamba-2's exp(Delta_t A). Queries and keys
    go through SiLU and L2 normalisation, the read is RMS-normalised per head. Extra
    parameters: 2 E H + 3 H. The paper's output gate and short convolutions are layer parts.

    Chunked parallel form: the gated UT transform (one triangular solve per chunk of 64 with
    the within-chunk decays), the state across chunks; decoding carries the [D, D] state.
    Causal self attention only, as for DeltaNet.
    """

    Config = GatedDeltaNetConfig
    uses_layer_input = True
    complexity = Complexity.LINEAR
    reference = ("Yang, Kautz and Hatamizadeh, Gated Delta Networks: Improving Mamba2 with Delta "
                 "Rule, ICLR 2025 (arXiv 2412.06464)")

    def __init__(self, config: GatedDeltaNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.beta_proj = nn.Linear(self.input_dim, self.heads)
        self.step_size = step_size_parameters(self.input_dim, self.heads, dt_min=config.dt_min,
                                              dt_max=config.dt_max, owner="gated_deltanet")
        self.log_a = log_decay_rates(self.heads, config.a_max)

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        x = self.gate_input(layer_input)
        beta = torch.sigmoid(self.beta_proj(x))  # [B, L, H]
        log_alpha = -torch.exp(self.log_a) * F.softplus(self.step_size(x))  # [B, L, H]
        return Recurrence(delta_features(q) / math.sqrt(self.head_dim), delta_features(k), v,
                          log_alpha, beta)
