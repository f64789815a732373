"""Based: Taylor linear attention plus a sliding window of exact softmax (Arora et al., ICML 2024)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attention_zoo.base import Attention, AttentionConfigError, Complexity, Pattern, masked_softmax
from attention_zoo.mechanisms.gated_recurrence import (
    BACKEND_METADATA,
    Backend,
    choose_fla,
    fla_unavailable,
)
from attention_zoo.mechanisms.kernelized import RunningSums, kernelized_attention
from attention_zoo.mechanisms.local import window_blocks, windowed_logits, windowed_read
from attention_zoo.registry import register_attention

EPS = 1e-6
"""Added to the Taylor read's normaliser, as in the authors' and fla's code."""

FLA_FEATURE_LIMIT = 16
"""fla's fused Based kernel takes feature dimensions up to 16."""


@dataclass(frozen=True)
class BasedConfig:
    """Hyperparameters of Based (defaults of the paper: 16 features, a window of 64)."""

    feature_dim: int = field(
        default=16, metadata={"help": "d': q and k are projected to d' per head before the "
                                      "Taylor map (1 + d' + d'^2 features)", "min": 1})
    window: int = field(
        default=64, metadata={"help": "keys of the exact softmax window (one side when causal)",
                              "min": 1})
    backend: Backend = field(default="auto", metadata=BACKEND_METADATA)


def taylor_features(x: Tensor) -> Tensor:
    """phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]: phi(q) . phi(k) = 1 + a + a^2 / 2 with
    a = q . k / sqrt(d), the second-order Taylor expansion of exp(a). [..., d] -> [..., 1 + d + d^2]."""
    d = x.shape[-1]
    second = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, second], dim=-1)


@dataclass
class BasedState:
    """Decoding state: the Taylor read's running sums and the window's last keys and values.

    Attributes:
        sums: running sums of phi(k_s) [v_s, 1] over every key so far.
        keys: [B, j, H, D] the last j <= window - 1 keys; values: [B, j, H, D].
    """

    sums: RunningSums
    keys: Tensor
    values: Tensor


@register_attention("based")
class BasedAttention(Attention):
    """Based: (Taylor linear attention over every key + softmax over a sliding window) / 2.

    Global read: q and k are projected per head to d' = 16 features (``feature_dim``) and
    out_t = sum_s (1 + a_ts + a_ts^2 / 2) v_s / sum_s (1 + a_ts + a_ts^2 / 2), a_ts = q'_t . k'_s
    / sqrt(d'), the second-order Taylor approximation of softmax; the kernel is positive
    (1 + a + a^2 / 2 >= 1 / 2), so the normaliser is. Local read: exact softmax attention over
    the keys s in (t - w, t] (w = ``window`` = 64). The paper interleaves the two in separate
    layers; as one mechanism the two normalised reads are averaged. Extra parameters: the two
    per-head projections, 2 H D d'. The paper's short convolution layers are not attention.

    Causal self attention decodes with O(d'^2 D) running sums and a cache of w - 1 keys.
    Non-causal self attention sums the Taylor read over every valid key and takes the window
    |t - s| < w (both are sound without order). Cross attention is not declared: the window
    has no meaning between two sequences, and without it the mechanism is not Based.
    Time O(n d'^2 D + n w D).
    """

    Config = BasedConfig
    patterns = frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF})
    decoding = True
    complexity = Complexity.LINEAR
    reference = ("Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra and Re, Simple "
                 "linear attention language models balance the recall-throughput tradeoff, "
                 "ICML 2024 (arXiv 2402.18668)")

    def __init__(self, config: BasedConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if config.backend == "fla" and config.feature_dim > FLA_FEATURE_LIMIT:
            raise AttentionConfigError(
                f"based: backend='fla' takes feature_dim <= {FLA_FEATURE_LIMIT}, got "
                f"{config.feature_dim}; use backend='auto' or 'torch'")
        scale = 1 / math.sqrt(self.head_dim)
        shape = (self.heads, self.head_dim, config.feature_dim)
        self.query_features = nn.Parameter(torch.randn(shape) * scale)  # [H, D, d']
        self.key_features = nn.Parameter(torch.randn(shape) * scale)

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q', k' [B, L, H, d']: the per-head projections the Taylor map reads."""
        project = "blhd,hdf->blhf"
        return (torch.einsum(project, q, self.query_features.to(q.dtype)),
                torch.einsum(project, k, self.key_features.to(k.dtype)))

    def taylor_read(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """The global Taylor linear attention read [B, L, H, D]."""
        q_features, k_features = self.features(q, k)
        if self._use_fla(q, key_padding_mask):
            based = importlib.import_module("fla.ops.based")
            return based.fused_chunk_based(q_features, k_features, v, use_norm=True).to(v.dtype)
        valid = None if key_padding_mask is None else ~key_padding_mask
        return kernelized_attention(taylor_features(q_features), taylor_features(k_features), v,
                                    causal=self.pattern.causal, key_valid=valid, eps=EPS)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: Any = None,
    ) -> Tensor:
        layout = window_blocks(q.shape[1], window=self.config.window, kind="sliding",
                               causal=self.pattern.causal, device=q.device)
        logits, visible = windowed_logits(q, k, layout, key_padding_mask)
        local = windowed_read(masked_softmax(logits, visible), v, layout, q.shape[1])
        return (self.taylor_read(q, k, v, key_padding_mask) + local) / 2

    def _use_fla(self, q: Tensor, key_padding_mask: Tensor | None) -> bool:
        backend = self.config.backend
        if backend == "torch":
            return False
        reason = fla_unavailable(q.device)
        if reason is None and not self.pattern.causal:
            reason = "fla's Based kernel is causal"
        if reason is None and self.config.feature_dim > FLA_FEATURE_LIMIT:
            reason = f"fla's Based kernel takes feature_dim <= {FLA_FEATURE_LIMIT}"
        if reason is None and q.dtype == torch.float64:
            reason = "fla's kernels take float32, float16 or bfloat16, not float64"
        return choose_fla("based", backend, reason)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> BasedState:
        features = 1 + self.config.feature_dim + self.config.feature_dim**2
        sums = RunningSums.empty(batch_size, self.heads, features, self.head_dim,
                                 device=device, dtype=dtype)
        empty = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return BasedState(sums, empty, empty.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: BasedState, *, layer_input: Any = None
    ) -> tuple[Tensor, BasedState]:
        q_features, k_features = self.features(q, k)
        taylor, sums = state.sums.step(taylor_features(q_features[:, 0]),
                                       taylor_features(k_features[:, 0]), v[:, 0], eps=EPS)
        keys = torch.cat([state.keys, k], dim=1)  # [B, j+1, H, D]
        values = torch.cat([state.values, v], dim=1)
        logits = torch.einsum("bqhd,bjhd->bhqj", q, keys) / math.sqrt(self.head_dim)
        local = torch.einsum("bhqj,bjhd->bqhd", torch.softmax(logits, dim=-1), values)
        keep = max(keys.shape[1] - (self.config.window - 1), 0)
        out = (taylor[:, None] + local) / 2
        return out, BasedState(sums, keys[:, keep:], values[:, keep:])
