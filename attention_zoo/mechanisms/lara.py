"""Linear randomized attention (LARA): RA's fidelity at linear cost (Zheng et al., ICML 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.mechanisms.kernelized import accumulation_dtype
from attention_zoo.mechanisms.ra import positive_feature_logits
from attention_zoo.registry import register_attention

MIN_MIS_WEIGHT = 1e-8
"""Floor of the multiple-importance-sampling weights before their log (as the official code)."""


@dataclass(frozen=True)
class LARAConfig:
    """Hyperparameters of LARA (default 16 landmarks; the official ViT recipe uses 49)."""

    landmarks: int = field(
        default=16,
        metadata={"help": "proposals C: segment means of queries and keys", "min": 1},
    )


def segment_means(x: Tensor, valid: Tensor, segments: int) -> tuple[Tensor, Tensor]:
    """Means of x over ``segments`` contiguous segments of each sample's real positions.

    Real position i of a sample with n real positions falls in segment floor(i C / n), so the
    segments do not depend on padding. With n < C some segments are empty.

    Args:
        x: [B, L, H, D]; valid: [B, L] bool (True = real, a prefix in self attention).

    Returns:
        means [B, C, H, D] (zero where empty) and nonempty [B, C] bool.
    """
    real = valid.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    positions = torch.arange(x.shape[1], device=x.device)[None]  # [1, L]
    segment = torch.div(positions * segments, real, rounding_mode="floor").clamp(max=segments - 1)
    members = torch.nn.functional.one_hot(segment, segments).to(x.dtype) * valid[..., None]
    counts = members.sum(dim=1)  # [B, C]
    means = torch.einsum("blc,blhd->bchd", members, x) / counts.clamp(min=1)[:, :, None, None]
    return means, counts > 0


@register_attention("lara")
class LinearRandomizedAttention(Attention):
    """LARA: self-normalised multiple importance sampling of RA's estimator with C proposals.

    With q~ = q / D^(1/4), k~ = k / D^(1/4): split the (real) sequence into C segments and take
    segment means qbar_c, kbar_c; proposal c is N(mu_c, I) with mu_c = qbar_c + kbar_c. In
    training omega_c = mu_c + N(0, I) (one sample per proposal); in evaluation omega_c = mu_c.
    With the positive random feature xi(x, w) = exp(w . x - |x|^2 / 2):

    - f(omega_c) = sum_m softmax_m(log xi(k~_m, omega_c)) v_m (query independent: linear cost);
    - the target of query n, up to a constant, p~_n(w) = N(w; 0, I) xi(q~_n, w) sum_m xi(k~_m, w),
      over the proposal density N(w; mu_c, I) = N(w; 0, I) xi(mu_c, w) gives the importance ratio
      r_nc = xi(q~_n, omega_c) sum_m xi(k~_m, omega_c) / xi(mu_c, omega_c);
    - multiple-importance weights (the paper's query-specific choice, computed as the official
      "mis-opt" with coefficient 1): a_nc = xi(mu_c, omega_c) / sum_c' xi(mu_c', omega_c)
      + t_nc - mean_c' t_c'n, with t_nc = softmax_n(q~_n . qbar~_c), normalised over the
      queries n (the last axis of the official [batch, heads, landmarks, queries] tensor), and
      the mean taken over the landmarks; floored at 1e-8;
    - out_n = sum_c softmax_c(log a_nc + log r_nc) f(omega_c).

    Default C = 16 (the official ViT recipe uses 49). Segment means here are plain means of the
    real positions (the official code's parameter-free "no-param-pool" option; its default adds
    a learned linear layer and LayerNorm); the softmax over queries and the mean over landmarks
    run over the real queries and the non-empty landmarks (the official code has no padding).
    Time O(n C D). Non-causal self attention only, as in the paper.

    Zheng, Wang and Kong, Linear Complexity Randomized Self-attention Mechanism, ICML 2022.
    """

    Config = LARAConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    complexity = Complexity.LINEAR
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
        acc = accumulation_dtype(dtype)  # importance weights span many orders of magnitude
        q, k, v = q.to(acc) * scale, k.to(acc) * scale, v.to(acc)
        batch, length = q.shape[:2]
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=q.device)
            if key_padding_mask is None else ~key_padding_mask
        )
        query_means, proposal_valid = segment_means(q, valid, self.config.landmarks)
        key_means, _ = segment_means(k, valid, self.config.landmarks)
        mu = (query_means + key_means).transpose(1, 2)  # [B, H, C, D]
        omega = mu + torch.randn_like(mu) if self.training else mu
        omega = omega[:, :, :, None, :]  # [B, H, C, 1, D]: one sample per proposal

        key_logits = positive_feature_logits(omega, k)[:, :, :, 0]  # [B, H, C, L]
        key_visible = valid[:, None, None, :]
        f = torch.einsum("bhcl,blhd->bhcd", masked_softmax(key_logits, key_visible), v)
        log_key_mass = key_logits.masked_fill(~key_visible, float("-inf")).logsumexp(-1)  # [B,H,C]
        query_logits = positive_feature_logits(omega, q)[:, :, :, 0]  # [B, H, C, N]
        proposal_logits = positive_feature_logits(omega, mu.transpose(1, 2))[:, :, :, 0]
        proposal_logits = proposal_logits.masked_fill(
            ~proposal_valid[:, None, None, :], float("-inf")
        )  # [B, H, C (sample), C' (proposal)]
        log_own_proposal = torch.diagonal(proposal_logits, dim1=-2, dim2=-1)  # [B, H, C]
        balance = torch.exp(log_own_proposal - proposal_logits.logsumexp(-1))  # [B, H, C]

        landmark_visible = proposal_valid[:, None, None, :]  # [B, 1, 1, C]
        mis = balance[:, :, None, :] + self._centred_query_weights(q, query_means, valid,
                                                                   proposal_valid)
        log_ratio = (
            mis.clamp(min=MIN_MIS_WEIGHT).log()
            + query_logits.transpose(-1, -2)
            + (log_key_mass - log_own_proposal)[:, :, None, :]
        )  # [B, H, N, C]
        weights = masked_softmax(log_ratio, landmark_visible & torch.isfinite(log_ratio))
        return torch.einsum("bhnc,bhcd->bnhd", weights, f).to(dtype)

    @staticmethod
    def _centred_query_weights(
        q: Tensor, query_means: Tensor, valid: Tensor, proposal_valid: Tensor
    ) -> Tensor:
        """t_nc - mean_c' t_c'n with t_nc = softmax over the real queries n of q~_n . qbar~_c.

        Args:
            q: [B, N, H, D] scaled queries; query_means: [B, C, H, D]; valid: [B, N];
            proposal_valid: [B, C] (non-empty landmarks).

        Returns:
            [B, H, N, C].
        """
        logits = torch.einsum("bchd,bnhd->bhcn", query_means, q)  # [B, H, C, N]
        t = masked_softmax(logits, valid[:, None, None, :])  # over the queries
        landmarks = proposal_valid[:, None, :, None].to(t.dtype)  # [B, 1, C, 1]
        mean = (t * landmarks).sum(dim=2, keepdim=True) / landmarks.sum(dim=2, keepdim=True).clamp(min=1)
        return (t - mean).transpose(-1, -2)
