"""Mamba-2's state space duality: a data-dependent scalar decay per head (Dao and Gu, ICML 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import AttentionConfigError, Complexity
from attention_zoo.mechanisms.gated_recurrence import (
    BACKEND_METADATA,
    CHUNK_METADATA,
    Backend,
    GatedRecurrentAttention,
    Recurrence,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class Mamba2Config:
    """Hyperparameters of Mamba-2's SSD layer (initialisation ranges of the paper's code)."""

    dt_min: float = field(default=0.001, metadata={"help": "smallest initial step size", "min": 0.0})
    dt_max: float = field(default=0.1, metadata={"help": "largest initial step size", "min": 0.0})
    a_max: float = field(
        default=16.0, metadata={"help": "A_h = -a_h is initialised with a_h uniform in [1, a_max]",
                                "min": 1.0})
    chunk_size: int = field(default=64, metadata=CHUNK_METADATA)
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


def step_size_parameters(
    input_dim: int, heads: int, *, dt_min: float, dt_max: float, owner: str
) -> nn.Linear:
    """The projection x -> Delta logits [E -> H], its bias set so that softplus(bias) is a step
    size log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
    if not 0 < dt_min <= dt_max:
        raise AttentionConfigError(
            f"{owner}: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    projection = nn.Linear(input_dim, heads)
    dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    with torch.no_grad():
        projection.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    return projection


def log_decay_rates(heads: int, a_max: float) -> nn.Parameter:
    """log a_h with a_h uniform in [1, a_max]: the decay rate A_h = -exp(log a_h) < 0, [H]."""
    return nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, a_max)))


@register_attention("mamba2")
class Mamba2Attention(GatedRecurrentAttention):
    """Mamba-2 (SSD): h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t^T, y_t = C_t^T h_t + D x_t.

    Per head, with the state space duality's reading C = q, B = k, x = v (Dao and Gu, section 5:
    SSD is linear attention with a 1-semiseparable mask): the step size Delta_t =
    softplus(x_t W_Delta + b_Delta) [H] comes from the layer input, A_h = -exp(log a_h) is a
    learned negative scalar per head, so the decay exp(Delta_t A_h) is one data-dependent
    scalar per head and token. D_h is a learned skip. No 1 / sqrt(D) scale (as in SSD). The
    output is RMS-normalised per head (the paper's gated RMS norm without its gate, which
    belongs to the layer). Extra parameters: E H + 3 H. Initialisation: Delta log-uniform in
    [0.001, 0.1], a_h uniform in [1, 16], D = 1. Mamba's short convolution is a layer part.

    Chunked parallel form (the SSD algorithm: [C, C] blocks inside chunks, the state across),
    decoding with the [D, D] state per head. Causal self attention only: the paper's scan is
    causal and defines no cross form (bidirectional variants such as Hydra are other models).
    """

    Config = Mamba2Config
    uses_layer_input = True
    complexity = Complexity.LINEAR
    reference = ("Dao and Gu, Transformers are SSMs: Generalized Models and Efficient Algorithms "
                 "Through Structured State Space Duality, ICML 2024 (arXiv 2405.21060)")

    def __init__(self, config: Mamba2Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.step_size = step_size_parameters(self.input_dim, self.heads, dt_min=config.dt_min,
                                              dt_max=config.dt_max, owner="mamba2")
        self.log_a = log_decay_rates(self.heads, config.a_max)
        self.skip = nn.Parameter(torch.ones(self.heads))

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        dt = F.softplus(self.step_size(self.gate_input(layer_input)))  # [B, L, H]
        return Recurrence(q, k * dt[..., None], v, -torch.exp(self.log_a) * dt)

    def finish(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Tensor:
        return super().finish(out + self.skip[:, None] * v, q, k, v, layer_input)
