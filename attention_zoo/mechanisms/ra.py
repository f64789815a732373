"""Randomized attention (RA): an unbiased estimator of softmax attention (Zheng et al., ICML 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, allowed_keys, masked_softmax
from attention_zoo.mechanisms.kernelized import accumulation_dtype
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class RAConfig:
    """Hyperparameters of randomized attention (default: one sample per query, as the paper)."""

    samples: int = field(
        default=1, metadata={"help": "samples per query in training, averaged", "min": 1}
    )


def positive_feature_logits(omega: Tensor, x: Tensor) -> Tensor:
    """log xi(x, omega) = omega . x - |x|^2 / 2 of the positive random feature.

    Args:
        omega: [B, H, N, S, D] samples; x: [B, L, H, D] (already scaled by D^(-1/4)).

    Returns:
        [B, H, N, S, L].
    """
    return torch.einsum("bhnsd,blhd->bhnsl", omega, x) - (x * x).sum(-1).transpose(1, 2)[
        :, :, None, None, :
    ] / 2


@register_attention("ra")
class RandomizedAttention(Attention):
    """Randomized attention: softmax attention as an expectation over query-specific samples.

    With q~ = q / D^(1/4), k~ = k / D^(1/4) and pi_nm = softmax_m(q~_n . k~_m) (the softmax
    weights), let p_n(omega) = sum_m pi_nm N(omega; q~_n + k~_m, I) and
    f(omega) = sum_m softmax_m(omega . k~_m - |k~_m|^2 / 2) v_m. Then
    softmax(q k^T / sqrt(D)) v at row n equals E_{omega ~ p_n}[f(omega)] exactly: RA is unbiased.
    In training each query draws ``samples`` (default 1) omegas from p_n (a key index m from
    pi_n, then omega = q~_n + k~_m + N(0, I)) and averages f over them. In evaluation it is
    deterministic: omega_n = E[p_n] = q~_n + sum_m pi_nm k~_m (a biased plug-in, not a sample).
    Quadratic: it needs pi. Non-causal self attention only, as in the paper.

    Departure from the authors' code: the N(0, I) noise is added to q~_n + k~_m, after the
    D^(-1/4) scaling, which is the proposal the estimator's unbiasedness needs. The authors' code
    adds it to the unscaled q_n + k_m, which amounts to omega ~ N(q~_n + k~_m, D^(-1/2) I) in the
    scaled space: their training-time estimate is biased (for D > 1), this one is not.

    Zheng, Wang and Kong, Linear Complexity Randomized Self-attention Mechanism, ICML 2022.
    """

    Config = RAConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    complexity = Complexity.QUADRATIC
    reference = (
        "Zheng et al., Linear Complexity Randomized Self-attention Mechanism, ICML 2022 "
        "(arXiv 2204.04667)"
    )

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        dtype = q.dtype
        scale = self.head_dim**-0.25
        acc = accumulation_dtype(dtype)  # the sampling CDF sums L probabilities
        q, k, v = q.to(acc) * scale, k.to(acc) * scale, v.to(acc)
        batch, length, heads, dim = q.shape
        allowed = allowed_keys(
            length, length, causal=False, key_padding_mask=key_padding_mask, device=q.device
        )  # [B, 1, 1, L] or None
        pi = masked_softmax(torch.einsum("bnhd,bmhd->bhnm", q, k), allowed)  # [B, H, N, M]
        query = q.transpose(1, 2)[:, :, :, None, :]  # [B, H, N, 1, D]
        keys = k.transpose(1, 2)  # [B, H, M, D]
        if self.training:
            with torch.no_grad():  # m ~ pi_n by inverse CDF (torch.multinomial is far slower)
                cdf = pi.cumsum(-1)  # [B, H, N, M]
                uniform = torch.rand(*cdf.shape[:-1], self.config.samples, dtype=cdf.dtype,
                                     device=cdf.device) * cdf[..., -1:]
                index = torch.searchsorted(cdf, uniform, right=True).clamp(max=length - 1)
                index = index.reshape(batch, heads, length * self.config.samples)
            chosen = torch.gather(keys, 2, index[..., None].expand(-1, -1, -1, dim))
            chosen = chosen.reshape(batch, heads, length, self.config.samples, dim)
            omega = query + chosen + torch.randn_like(chosen)  # [B, H, N, S, D]
        else:
            omega = query + torch.einsum("bhnm,bhmd->bhnd", pi, keys)[:, :, :, None, :]
        logits = positive_feature_logits(omega, k)  # [B, H, N, S, M]
        visible = None if allowed is None else allowed[:, :, :, None, :]
        probs = masked_softmax(logits, visible)
        return (torch.einsum("bhnsm,bmhd->bnhd", probs, v) / omega.shape[3]).to(dtype)
