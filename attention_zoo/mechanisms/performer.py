"""Performer's FAVOR+: positive orthogonal random features for softmax (Choromanski et al., 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern
from attention_zoo.mechanisms.kernelized import RunningSums, kernelized_attention
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class PerformerConfig:
    """Hyperparameters of FAVOR+ (defaults from the paper: m = D ln D orthogonal features)."""

    features: int | None = field(
        default=None,
        metadata={"help": "random features m (None: int(D ln D), at least D)", "min": 1},
    )
    orthogonal: bool = field(
        default=True,
        metadata={"help": "orthogonal blocks (FAVOR+) rather than i.i.d. Gaussian rows"},
    )


def gaussian_projection(heads: int, features: int, dim: int, *, orthogonal: bool) -> Tensor:
    """[heads, features, dim] random rows w_i with Gaussian marginals N(0, I_dim).

    Orthogonal: stacked blocks of ``dim`` exactly orthogonal rows (QR of a Gaussian), each row
    rescaled by the norm of an independent Gaussian vector, so that every row is still
    marginally N(0, I) while rows of one block are orthogonal (the paper's ORF).
    """
    if not orthogonal:
        return torch.randn(heads, features, dim)
    blocks = math.ceil(features / dim)
    q, r = torch.linalg.qr(torch.randn(heads, blocks, dim, dim))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]  # Haar-uniform
    rows = q.transpose(-2, -1).reshape(heads, blocks * dim, dim)[:, :features]
    norms = torch.randn(heads, features, dim).norm(dim=-1, keepdim=True)
    return rows * norms


@register_attention("performer")
class PerformerAttention(Attention):
    """Performer (FAVOR+): softmax attention estimated with positive orthogonal random features.

    With x~ = x / D^(1/4) (so that q~ . k~ = q . k / sqrt(D)) and rows w_1..w_m of a random
    projection with N(0, I) marginals, phi(x) = exp(W x~ - |x~|^2 / 2) / sqrt(m) gives
    E[phi(q) . phi(k)] = exp(q . k / sqrt(D)), and

        out_t = phi(q_t)^T sum_s phi(k_s) v_s^T / phi(q_t)^T sum_s phi(k_s)

    over the visible keys (prefix sums when causal; decoding keeps O(m D) numbers per head).
    Defaults: m = int(D ln D) (at least D) orthogonal features per head, drawn once at
    construction from the global torch generator (a buffer: saved with the model, the same in
    training and evaluation; no redrawing). Exponentials are stabilised by a per-token shift of
    the query features (it cancels) and by keeping the key sums relative to the running maximum
    of the key log-features, which only looks at the prefix: unlike the reference code's global
    key maximum, it cannot leak the future. Time O(n m D).

    Choromanski et al., Rethinking Attention with Performers, ICLR 2021.
    """

    Config = PerformerConfig
    patterns = frozenset(Pattern)
    decoding = True
    complexity = Complexity.LINEAR
    reference = "Choromanski et al., Rethinking Attention with Performers, ICLR 2021 (arXiv 2009.14794)"

    def __init__(
        self, config: PerformerConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        features = config.features
        if features is None:
            features = max(head_dim, int(head_dim * math.log(head_dim)))
        self.features = features
        projection = gaussian_projection(heads, features, head_dim, orthogonal=config.orthogonal)
        self.register_buffer("projection", projection)  # [H, m, D]

    def _log_features(self, x: Tensor) -> Tensor:
        """log phi(x): [..., H, D] -> [..., H, m], in float32 or wider."""
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x = x.to(dtype) * self.head_dim**-0.25
        projected = torch.einsum("...hd,hmd->...hm", x, self.projection.to(dtype))
        return projected - (x * x).sum(-1, keepdim=True) / 2 - math.log(self.features) / 2

    def _query_features(self, q: Tensor) -> Tensor:
        log_q = self._log_features(q)
        return torch.exp(log_q - log_q.amax(dim=-1, keepdim=True).detach())  # shift cancels

    def _key_features(self, k: Tensor) -> tuple[Tensor, Tensor]:
        log_k = self._log_features(k)
        scale = log_k.amax(dim=-1).detach()  # [..., H]: this key's own maximum
        return torch.exp(log_k - scale[..., None]), scale

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        phi_k, scale = self._key_features(k)
        return kernelized_attention(
            self._query_features(q), phi_k, v,
            causal=self.pattern.triangular,
            key_valid=None if key_padding_mask is None else ~key_padding_mask,
            key_log_scale=scale,
        )

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> RunningSums:
        return RunningSums.empty(
            batch_size, self.heads, self.features, self.head_dim, device=device, dtype=dtype
        )

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: RunningSums, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, RunningSums]:
        phi_k, scale = self._key_features(k[:, 0])
        out, state = state.step(self._query_features(q[:, 0]), phi_k, v[:, 0], scale)
        return out[:, None], state
