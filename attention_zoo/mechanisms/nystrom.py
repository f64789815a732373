"""Nystromformer: softmax attention through a Nystrom approximation with segment-mean landmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class NystromConfig:
    """Hyperparameters of Nystromformer (defaults of the official code)."""

    landmarks: int = field(default=64, metadata={"help": "landmarks m (segment means)", "min": 1})
    pinv_iterations: int = field(
        default=6, metadata={"help": "iterations of the Moore-Penrose pseudo-inverse", "min": 0}
    )


def segment_means(x: Tensor, valid: Tensor, landmarks: int) -> tuple[Tensor, Tensor]:
    """Means of m contiguous segments of each sequence's valid tokens.

    A sequence with n valid tokens is cut, in order, into m' = min(m, n) segments: token of
    rank r (among the valid ones) goes to segment floor(r m' / n). Padded tokens belong to no
    segment, so the landmarks are those of the unpadded sequence wherever the padding lies.

    Args:
        x: [B, L, H, D]; valid: [B, L] bool; landmarks: m.

    Returns:
        means [B, H, m, D] and present [B, m] bool (False for the m - m' unused landmarks).
    """
    count = valid.sum(dim=1, keepdim=True)  # [B, 1]
    used = count.clamp(max=landmarks)
    rank = valid.cumsum(dim=1) - 1  # [B, L]
    segment = (rank * used).div(count.clamp(min=1), rounding_mode="floor").clamp(0, landmarks - 1)
    assign = F.one_hot(segment, landmarks).to(x.dtype) * valid[..., None]  # [B, L, m]
    sizes = assign.sum(dim=1)  # [B, m]
    means = torch.einsum("blm,blhd->bhmd", assign, x) / sizes.clamp(min=1)[:, None, :, None]
    return means, sizes > 0


def iterative_pinv(matrix: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse by Nystromformer's Newton-style iteration.

    Z_0 = A^T / (max_j sum_i |A_ij| * max_i sum_j |A_ij|), then
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4. The scale is taken per matrix (per
    sample and head), not over the whole batch as in the official code, so that one sample never
    depends on another.

    Args:
        matrix: [..., m, m] with non-negative entries (a softmax kernel).
    """
    column_sums = matrix.abs().sum(dim=-2).amax(dim=-1)  # [...]
    row_sums = matrix.abs().sum(dim=-1).amax(dim=-1)
    scale = (column_sums * row_sums).clamp(min=torch.finfo(matrix.dtype).tiny)
    z = matrix.transpose(-1, -2) / scale[..., None, None]
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        az = matrix @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


@register_attention("nystrom")
class NystromAttention(Attention):
    """Nystromformer: softmax attention approximated through m landmarks (non-causal).

    With landmarks Q~, K~ (segment means of the queries and of the keys, m = 64 by default):
    out = softmax(Q K~^T / sqrt(D)) pinv(softmax(Q~ K~^T / sqrt(D))) softmax(Q~ K^T / sqrt(D)) V,
    pinv by 6 iterations of the paper's Newton-style iteration (``pinv_iterations``). With
    m = n landmarks it is softmax attention, up to the pseudo-inverse's convergence.

    Non-causal only: a landmark averages a whole segment, so causal use would read the future
    (the paper does not define a causal variant). Differences from the official code, for the
    zoo's contract: segments are cut per sample over its valid tokens (m' = min(m, n) of them,
    so padding changes nothing and no fixed-length padding is needed), the pseudo-inverse's
    initial scale is per sample and head rather than a max over the batch, and the optional
    depthwise convolution skip on V (a separate module in the paper) is not part of the core.
    Half-precision inputs are computed in float32. Time and memory O(n m + m^2) per head.
    With as many landmarks as tokens (m >= n) it is still not exactly softmax attention: the
    pseudo-inverse is the ``pinv_iterations``-th (default 6) Newton-Schulz iterate, not the exact
    inverse, as in the official code.
    """

    Config = NystromConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    # Query landmarks are segment means over every query: in cross attention a query alone does
    # not give its row of the whole pass, so there is no causal_cross (nor any causal pattern).
    complexity = Complexity.LINEAR
    reference = (
        "Xiong et al., Nystromformer: A Nystrom-Based Algorithm for Approximating "
        "Self-Attention, AAAI 2021"
    )

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        if q.dtype in (torch.float16, torch.bfloat16):  # the pseudo-inverse diverges in half types
            return self.attend(q.float(), k.float(), v.float(), key_padding_mask).to(q.dtype)
        m = self.config.landmarks
        key_valid = (
            torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            if key_padding_mask is None else ~key_padding_mask
        )
        # In self attention a padded position is no query either; cross queries are all real.
        query_valid = key_valid if not self.pattern.cross else torch.ones(
            q.shape[:2], dtype=torch.bool, device=q.device
        )
        query_landmarks, query_present = segment_means(q, query_valid, m)  # [B, H, m, D], [B, m]
        key_landmarks, key_present = segment_means(k, key_valid, m)
        scale = 1.0 / math.sqrt(self.head_dim)
        qh = q.transpose(1, 2)  # [B, H, Lq, D]
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        kernel_queries = masked_softmax(
            qh @ key_landmarks.transpose(-1, -2) * scale, key_present[:, None, None, :]
        )  # [B, H, Lq, m]
        kernel_landmarks = masked_softmax(
            query_landmarks @ key_landmarks.transpose(-1, -2) * scale,
            (query_present[:, :, None] & key_present[:, None, :])[:, None],
        )  # [B, H, m, m], zero rows and columns at unused landmarks
        kernel_keys = masked_softmax(
            query_landmarks @ kh.transpose(-1, -2) * scale,
            (query_present[:, :, None] & key_valid[:, None, :])[:, None],
        )  # [B, H, m, Lk]
        inverse = iterative_pinv(kernel_landmarks, self.config.pinv_iterations)
        out = kernel_queries @ (inverse @ (kernel_keys @ vh))  # [B, H, Lq, D]
        return out.transpose(1, 2)
