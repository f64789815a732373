"""HGRN2: a gated linear RNN with outer-product state expansion (Qin et al., COLM 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
class HGRN2Config:
    """Hyperparameters of HGRN2."""

    lower_bound: float = field(
        default=0.0,
        metadata={"help": "forget gates lie in [lower_bound, 1) (HGRN raises it with depth)",
                  "min": 0.0})
    chunk_size: int = field(default=16, metadata=CHUNK_METADATA)
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


@register_attention("hgrn2")
class HGRN2Attention(GatedRecurrentAttention):
    """HGRN2: S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T, o_t = S_t^T silu(q_t) / sqrt(D).

    The forget gate f_t in [lb, 1)^D per head and channel is f = lb + (1 - lb) sigmoid(k_t):
    HGRN2's forget-gate projection of the input is the layer's key projection, and the input
    gate is tied to it as 1 - f (the key of the outer product), so the mechanism has no
    parameters of its own and needs no other input. lb is ``lower_bound`` (0; HGRN2 raises it
    layer by layer). The read is RMS-normalised per head. Same recurrence as GLA (the paper's
    own kernels are GLA's), chunked as GLA's (secondary chunking inside chunks, no [C, C, D]
    decay tensor); decoding carries S.
    Causal self attention only: the recurrence reads the sequence left to right.
    """

    Config = HGRN2Config
    complexity = Complexity.LINEAR
    reference = ("Qin, Yang, Sun, Shen, Li, Sun and Zhong, HGRN2: Gated Linear RNNs with State "
                 "Expansion, COLM 2024 (arXiv 2404.07904)")

    def __init__(self, config: HGRN2Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not config.lower_bound < 1:
            raise AttentionConfigError(
                f"hgrn2: lower_bound must be in [0, 1), got {config.lower_bound}")

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        log_forget = F.logsigmoid(k)
        bound = self.config.lower_bound
        if bound > 0:
            log_forget = torch.logaddexp(torch.full_like(k, math.log(bound)),
                                         math.log1p(-bound) + log_forget)
        return Recurrence(F.silu(q) / math.sqrt(self.head_dim), -torch.expm1(log_forget), v,
                          log_forget)
