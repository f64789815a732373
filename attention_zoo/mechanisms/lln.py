"""Linear Log-Normal attention, LLN + Diag (Nahshan, Kampeas and Haleva, ICLR 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.mechanisms.kernelized import (
    RunningSums,
    accumulation_dtype,
    kernelized_attention,
)
from attention_zoo.registry import register_attention

MOMENT_A = 0.14855178144710912
"""Slope a of the fit var(log of a sum of log-normals) ~ 2 a sigma~^2 + b (official constants)."""
MOMENT_B = -0.35487039130661086
"""Intercept b of the same fit."""
MIN_VARIANCE = 1e-6
"""Floor of the measured variances (a constant input would otherwise give infinite scales)."""


@dataclass(frozen=True)
class LLNConfig:
    """Hyperparameters of LLN attention (defaults: the official LLN + Diag, mode "average")."""

    diagonal: bool = field(
        default=True,
        metadata={"help": "average with block-diagonal softmax (self patterns only)"},
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "tokens per diagonal softmax block (None: head_dim)", "min": 1},
    )


@dataclass
class Moments:
    """Running first and second moments of one tensor per (sample, head): [B, H] each."""

    total: Tensor
    squares: Tensor
    count: Tensor

    def variance(self) -> Tensor:
        """Unbiased variance (as torch.std), floored at :data:`MIN_VARIANCE`: [B, H]."""
        count = self.count.clamp(min=1)
        centred = self.squares - self.total * self.total / count
        return (centred / (count - 1).clamp(min=1)).clamp(min=MIN_VARIANCE)


def moments(x: Tensor, valid: Tensor | None, *, causal: bool) -> Moments:
    """Moments of x [B, L, H, D] over valid positions and all D features, per (sample, head).

    Causal: prefix moments [B, L, H] (position t uses positions <= t); else totals [B, 1, H].
    """
    weight = x.new_ones(x.shape[:2]) if valid is None else valid.to(x.dtype)  # [B, L]
    total = x.sum(-1) * weight[:, :, None]  # [B, L, H]
    squares = (x * x).sum(-1) * weight[:, :, None]
    count = (weight * x.shape[-1])[:, :, None].expand_as(total)
    if causal:
        return Moments(total.cumsum(1), squares.cumsum(1), count.cumsum(1))
    return Moments(*(t.sum(1, keepdim=True) for t in (total, squares, count)))


def moment_matched_scales(query_variance: Tensor, key_variance: Tensor) -> tuple[Tensor, Tensor]:
    """alpha, beta of LLN: sigma~^2 = (s_q^2 s_k^2 - b) / 2a, alpha = sigma~/s_q, beta = sigma~/s_k.

    With these, log(exp(alpha q) . exp(beta k)) has about the variance s_q^2 s_k^2 of the
    softmax logits q . k / sqrt(D) (the paper's log-normal moment matching; the constants fit
    head_dim 64 well, within 30% in the tests, and small head dims less well).
    """
    matched = ((query_variance * key_variance - MOMENT_B) / (2 * MOMENT_A)).sqrt()
    return matched / query_variance.sqrt(), matched / key_variance.sqrt()


@dataclass
class LLNState:
    """Decoding state: running sums, running moments, and the current diagonal block."""

    sums: RunningSums
    query_moments: Moments
    key_moments: Moments
    block_keys: Tensor  # [B, j, H, D], j < block size
    block_values: Tensor


@register_attention("lln")
class LLNAttention(Attention):
    """Linear Log-Normal attention averaged with block-diagonal softmax (the official LLN + Diag).

    LLN: out_t = exp(alpha q_t)^T sum_s exp(beta k_s) v_s^T / exp(alpha q_t)^T sum_s exp(beta k_s)
    (exp elementwise, no 1/sqrt(D)), with alpha and beta chosen by moment matching so that the
    log attention weights have the softmax logits' variance: with s_q, s_k the standard
    deviations of the queries and keys (over positions and features) and the official constants
    a = 0.14855178144710912, b = -0.35487039130661086,
    sigma~^2 = (s_q^2 s_k^2 - b) / (2a), alpha = sigma~ / s_q, beta = sigma~ / s_k (no gradient
    flows through alpha and beta, as in the official code). Diag: softmax(q k^T / sqrt(D)) v
    inside consecutive blocks of ``block_size`` tokens (default head_dim), causal inside a block
    when the pattern is. out = (LLN + Diag) / 2 in self attention; cross attention has no
    diagonal and is LLN alone (or set ``diagonal=False`` for LLN alone everywhere).

    Differences from the official code, which make the result a function of the sample and its
    visible prefix only:

    - s_q and s_k are per sample and per head over the real (non-padded) positions; the official
      code takes one std over the whole [B, H, N, D] tensor, so a sample depends on the others
      in its batch (and on padding).
    - Causal patterns use prefix statistics: query t's alpha_t uses queries <= t, key s's
      beta_s uses positions <= s (fixed once the key has arrived), so decoding token by token
      gives the parallel result; the official code uses whole-sequence statistics.
    - In cross attention s_q pools every query, so a query's output depends on the other
      queries: ``noncausal_cross`` only (a decoder feeding its queries one at a time would get
      other statistics, so there is no ``causal_cross``).
    - The official key stabiliser subtracts the maximum over all keys (the future, causally);
      here key sums are kept relative to the running maximum (see ``kernelized``), which is
      exact and prefix-only. No eps is added to the normaliser.

    Time O(n D^2 + n b D) for block size b; decoding state O(D^2 + b D) per head.

    Nahshan, Kampeas and Haleva, Linear Log-Normal Attention with Unbiased Concentration,
    ICLR 2024.
    """

    Config = LLNConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    decoding = True
    complexity = Complexity.LINEAR
    reference = (
        "Nahshan et al., Linear Log-Normal Attention with Unbiased Concentration, ICLR 2024 "
        "(arXiv 2311.13541)"
    )

    def __init__(
        self, config: LLNConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        self.block_size = config.block_size if config.block_size is not None else head_dim
        self.diagonal = config.diagonal and not pattern.cross

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        valid = None if key_padding_mask is None else ~key_padding_mask
        out = self._log_normal(q, k, v, valid)
        if self.diagonal:
            out = (out + self._block_diagonal(q, k, v, valid)) / 2
        return out

    def _log_normal(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        causal = self.pattern.causal
        dtype = accumulation_dtype(q.dtype)
        q_acc, k_acc = q.to(dtype), k.to(dtype)
        query_valid = None if self.pattern.cross else valid
        with torch.no_grad():
            query_moments = moments(q_acc, query_valid, causal=causal)
            key_moments = moments(k_acc, valid, causal=causal)
            alpha, beta = moment_matched_scales(
                query_moments.variance(), key_moments.variance()
            )  # [B, Lq or 1, H]
        phi_q = self._query_features(q_acc, alpha)
        phi_k, scale = self._key_features(k_acc, beta)
        return kernelized_attention(
            phi_q, phi_k, v, causal=causal, key_valid=valid, key_log_scale=scale
        ).to(q.dtype)

    @staticmethod
    def _query_features(q: Tensor, alpha: Tensor) -> Tensor:
        log_q = q * alpha[..., None]
        return torch.exp(log_q - log_q.amax(dim=-1, keepdim=True).detach())  # shift cancels

    @staticmethod
    def _key_features(k: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        log_k = k * beta[..., None]
        scale = log_k.amax(dim=-1).detach()  # [..., H]
        return torch.exp(log_k - scale[..., None]), scale

    def _block_diagonal(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Softmax inside consecutive blocks of ``block_size`` tokens: [B, L, H, D]."""
        batch, length, heads, dim = q.shape
        size = self.block_size
        pad = (-length) % size
        real = torch.ones(batch, length, dtype=torch.bool, device=q.device) if valid is None else valid
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            real = F.pad(real, (0, pad), value=False)
        blocks = (length + pad) // size
        qb, kb, vb = (x.reshape(batch, blocks, size, heads, dim) for x in (q, k, v))
        scores = torch.einsum("bnihd,bnjhd->bnhij", qb, kb) / math.sqrt(dim)  # [B, N, H, C, C]
        allowed = real.reshape(batch, blocks, 1, 1, size)
        if self.pattern.causal:
            allowed = allowed & torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        probs = masked_softmax(scores, allowed)
        out = torch.einsum("bnhij,bnjhd->bnihd", probs, vb)
        return out.reshape(batch, blocks * size, heads, dim)[:, :length]

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LLNState:
        sums = RunningSums.empty(
            batch_size, self.heads, self.head_dim, self.head_dim, device=device, dtype=dtype
        )

        def empty_moments() -> Moments:
            zeros = torch.zeros(batch_size, self.heads, device=device, dtype=sums.sums.dtype)
            return Moments(zeros, zeros.clone(), zeros.clone())

        block = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return LLNState(sums, empty_moments(), empty_moments(), block, block.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LLNState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, LLNState]:
        dtype = state.sums.sums.dtype
        query, key = q[:, 0].to(dtype), k[:, 0].to(dtype)  # [B, H, D]

        def updated(m: Moments, x: Tensor) -> Moments:
            return Moments(m.total + x.sum(-1), m.squares + (x * x).sum(-1), m.count + x.shape[-1])

        query_moments = updated(state.query_moments, query)
        key_moments = updated(state.key_moments, key)
        alpha, beta = moment_matched_scales(query_moments.variance(), key_moments.variance())
        phi_k, scale = self._key_features(key, beta)
        out, sums = state.sums.step(self._query_features(query, alpha), phi_k, v[:, 0], scale)
        block_keys = torch.cat([state.block_keys, k], dim=1)  # [B, j + 1, H, D]
        block_values = torch.cat([state.block_values, v], dim=1)
        if self.diagonal:
            scores = torch.einsum("bhd,bjhd->bhj", q[:, 0], block_keys) / math.sqrt(self.head_dim)
            diagonal = torch.einsum("bhj,bjhd->bhd", torch.softmax(scores, dim=-1), block_values)
            out = (out + diagonal) / 2
        if block_keys.shape[1] == self.block_size:  # block complete: the next token starts one
            block_keys, block_values = block_keys[:, :0], block_values[:, :0]
        new_state = LLNState(sums, query_moments, key_moments, block_keys, block_values)
        return out[:, None].to(q.dtype), new_state
