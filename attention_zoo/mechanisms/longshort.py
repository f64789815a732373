"""Transformer-LS: a short-term window and a long-term dynamic projection under one softmax."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.mechanisms.local import (
    from_blocks,
    to_blocks,
    window_blocks,
    windowed_logits,
    windowed_read,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class LongShortConfig:
    """Hyperparameters of Transformer-LS."""

    window: int = field(
        default=16,
        metadata={"help": "short-term window w: segments of w plus w/2 each side; causal: last w keys",
                  "min": 1},
    )
    rank: int = field(
        default=16, metadata={"help": "non-causal: r tokens of the dynamic projection", "min": 1}
    )
    segment: int = field(
        default=16, metadata={"help": "causal: length l of the separately projected segments",
                              "min": 1},
    )
    segment_rank: int = field(
        default=1, metadata={"help": "causal: tokens each segment is projected to", "min": 1}
    )


@dataclass
class LongShortState:
    """Decoding state of causal Transformer-LS.

    Attributes:
        window_keys: [B, j, H, D] raw keys of the last j <= w - 1 positions.
        window_values: [B, j, H, D].
        segment_keys: [B, i, H, D] raw keys of the current, incomplete segment (i < l).
        segment_values: [B, i, H, D].
        long_keys: [B, H, R, D] projected, normalised keys of every complete segment
            (R = segment_rank per segment: the state grows as t r / l).
        long_values: [B, H, R, D].
    """

    window_keys: Tensor
    window_values: Tensor
    segment_keys: Tensor
    segment_values: Tensor
    long_keys: Tensor
    long_values: Tensor


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype),
                        norm.eps)


def _joint_read(
    q: Tensor, local: Tensor, window_lse: Tensor, long_keys: Tensor, long_values: Tensor,
    long_visible: Tensor,
) -> Tensor:
    """One softmax over a query's window and the projected tokens it sees, the projected part
    on the fused scaled-dot-product kernel (no [L, R] logits stored).

    The window enters as one extra key, the sink, with logit lse_t (the log-sum-exp of the
    window's logits; an extra query channel carries it) and value channel 1: with Z_A = exp(lse_t)
    and Z_B the projected tokens' sum, the kernel returns [sum_j exp(s_j) V_j / (Z_A + Z_B),
    Z_A / (Z_A + Z_B)], and out = that first part + the second times the window's own read.

    Args:
        q: [B, L, H, D]; local: the window's normalised read [B, L, H, D]; window_lse:
            [B, L, H] (-inf where the window is empty); long_keys, long_values: [B, H, R, D]
            (normalised); long_visible: [B or 1, 1, L, R] bool.

    Returns:
        [B, L, H, D].
    """
    dim = q.shape[-1]
    sink = torch.where(torch.isfinite(window_lse), window_lse, -1e4)  # weight 0, no inf * 0
    query = torch.cat([q, (sink * math.sqrt(dim))[..., None]], dim=-1).transpose(1, 2)
    keys, values = (F.pad(x, (0, 1, 1, 0)) for x in (long_keys, long_values))  # row 0: the sink
    unit = torch.zeros_like(keys[:, :, :1])
    unit[..., -1] = 1.0
    keys, values = (torch.cat([unit, x[:, :, 1:]], dim=2) for x in (keys, values))
    mask = F.pad(long_visible, (1, 0), value=True)  # the sink is always visible
    read = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                          scale=1 / math.sqrt(dim)).transpose(1, 2)
    return read[..., :dim] + read[..., dim:] * local


@register_attention("longshort")
class LongShortAttention(Attention):
    """Transformer-LS: short-term sliding window + long-term dynamic projection, one softmax.

    Long term (dynamic projection): P = softmax_s(K W_P) (softmax over the positions, per
    column; W_P in R^{D x r} per head), K_bar = P^T K and V_bar = P^T V (r tokens). Short term:
    the sequence is cut into segments of w; a query sees its segment and w/2 keys on each side.
    DualLN: LN_S on the window's keys and values, LN_L on K_bar and V_bar (learned affine), so
    the two sets of logits share a scale. Then
    out_t = softmax([q_t LN_S(K_win(t))^T, q_t LN_L(K_bar)^T] / sqrt(D)) [LN_S(V_win(t)); LN_L(V_bar)].
    Defaults w = 16, r = 16.

    Causal (the paper's autoregressive version): the sequence is cut into segments of l
    (``segment``, 16), each projected separately to ``segment_rank`` (1) tokens with its own
    softmax over its positions; query t reads the projected tokens of every segment that ends
    at or before t, and its window is the last w keys (t - w, t]. Non-causal time O(n (w + r) D);
    causal O(n (w + n r / l) D): quadratic with a constant l / r times smaller than softmax's
    (the declared complexity class is the non-causal one); the causal projected part runs on
    the fused scaled-dot-product kernel with the window folded in as one extra key, so its
    [n, n r / l] logits are never stored.
    Self attention only: the window needs aligned positions. Decodes causally, keeping the
    last w - 1 keys, the current segment, and the projected tokens of the complete segments.

    Departure from the authors' code: LN_S and LN_L normalise each head's D features (one
    LayerNorm of width D, shared by the heads), where the authors' DualLN normalises over all
    heads' features at once (width H * D); a head's output here does not depend on the other
    heads' keys and values.
    """

    Config = LongShortConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    decoding = True
    complexity = Complexity.LINEAR
    reference = (
        "Zhu et al., Long-Short Transformer: Efficient Transformers for Language and Vision, "
        "NeurIPS 2021"
    )

    def __init__(
        self, config: LongShortConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        rank = config.segment_rank if pattern.causal else config.rank
        self.projection = nn.Parameter(torch.randn(heads, head_dim, rank) / math.sqrt(head_dim))
        self.norm_short = nn.LayerNorm(head_dim)
        self.norm_long = nn.LayerNorm(head_dim)

    def _long_term(self, k: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected keys and values [B, H, R, D] and which query sees which: [B or 1, 1, L, R]."""
        batch, length = valid.shape
        logits = torch.einsum("blhd,hdr->bhrl", k, self.projection.to(k.dtype))  # [B, H, r, L]
        if not self.pattern.causal:
            projection = masked_softmax(logits, valid[:, None, None, :])  # over the positions
            keys = torch.einsum("bhrl,blhd->bhrd", projection, k)
            values = torch.einsum("bhrl,blhd->bhrd", projection, v)
            return keys, values, valid.any(dim=1)[:, None, None, None]
        seg = self.config.segment
        segments = -(-length // seg)
        pad = segments * seg - length
        k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (k, v))
        valid = F.pad(valid, (0, pad), value=False).view(batch, 1, 1, segments, seg)
        logits = F.pad(logits, (0, pad)).view(batch, self.heads, -1, segments, seg)
        projection = masked_softmax(logits, valid)  # per segment: [B, H, r, N, l]
        shape = (batch, segments, seg, self.heads, self.head_dim)
        keys = torch.einsum("bhrns,bnshd->bhnrd", projection, k.view(shape)).flatten(2, 3)
        values = torch.einsum("bhrns,bnshd->bhnrd", projection, v.view(shape)).flatten(2, 3)
        rank = self.config.segment_rank
        t = torch.arange(length, device=k.device)[:, None]
        ends = (torch.arange(segments, device=k.device) + 1) * seg - 1  # last position of each
        complete = (ends[None, :] <= t).repeat_interleave(rank, dim=1)  # [L, N r]
        present = valid.any(dim=-1).view(batch, segments).repeat_interleave(rank, dim=1)
        return keys, values, complete[None, None] & present[:, None, None, :]

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        batch, length, _, dim = q.shape
        w = self.config.window
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=q.device)
            if key_padding_mask is None else ~key_padding_mask
        )
        kind = "sliding" if self.pattern.causal else "segment"
        layout = window_blocks(length, window=w, kind=kind, causal=self.pattern.causal,
                               device=q.device)
        short_keys, short_values = _layer_norm(self.norm_short, k), _layer_norm(self.norm_short, v)
        short_logits, short_visible = windowed_logits(q, short_keys, layout, key_padding_mask)
        long_keys, long_values, long_visible = self._long_term(k, v, valid)
        long_keys = _layer_norm(self.norm_long, long_keys)  # [B, H, R, D]
        long_values = _layer_norm(self.norm_long, long_values)
        if self.pattern.causal:
            local = windowed_read(masked_softmax(short_logits, short_visible), short_values,
                                  layout, length)
            window_lse = short_logits.masked_fill(~short_visible, float("-inf")).logsumexp(-1)
            window_lse = from_blocks(window_lse.permute(0, 2, 3, 1), length)  # [B, L, H]
            return _joint_read(q, local, window_lse, long_keys, long_values, long_visible)
        long_logits = torch.einsum("blhd,bhrd->blhr", q, long_keys) / math.sqrt(dim)
        long_logits = to_blocks(long_logits, w).permute(0, 3, 1, 2, 4)  # [B, H, N, w, R]
        long_visible = long_visible.squeeze(1).expand(batch, length, long_keys.shape[2])
        long_visible = to_blocks(long_visible, w)[:, None]  # [B, 1, N, w, R]
        span = layout.width
        logits = torch.cat([short_logits, long_logits], dim=-1)
        visible = torch.cat([short_visible, long_visible], dim=-1)
        probs = masked_softmax(logits, visible)  # one softmax over both sets
        out = windowed_read(probs[..., :span], short_values, layout, length)
        long_probs = from_blocks(probs[..., span:].permute(0, 2, 3, 1, 4), length)  # [B, L, H, R]
        return out + torch.einsum("blhr,bhrd->blhd", long_probs, long_values)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LongShortState:
        raw = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        projected = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        return LongShortState(raw, raw.clone(), raw.clone(), raw.clone(), projected,
                              projected.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LongShortState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, LongShortState]:
        w, seg = self.config.window, self.config.segment
        window_keys = torch.cat([state.window_keys, k], dim=1)  # [B, j+1, H, D], j + 1 <= w
        window_values = torch.cat([state.window_values, v], dim=1)
        segment_keys = torch.cat([state.segment_keys, k], dim=1)
        segment_values = torch.cat([state.segment_values, v], dim=1)
        long_keys, long_values = state.long_keys, state.long_values
        if segment_keys.shape[1] == seg:  # the segment is complete: project it once, for good
            weights = torch.softmax(
                torch.einsum("blhd,hdr->bhrl", segment_keys, self.projection.to(k.dtype)), dim=-1
            )  # [B, H, r, l]
            keys = _layer_norm(self.norm_long, torch.einsum("bhrl,blhd->bhrd", weights, segment_keys))
            values = _layer_norm(self.norm_long,
                                 torch.einsum("bhrl,blhd->bhrd", weights, segment_values))
            long_keys = torch.cat([long_keys, keys], dim=2)  # [B, H, R, D]
            long_values = torch.cat([long_values, values], dim=2)
            segment_keys, segment_values = segment_keys[:, :0], segment_values[:, :0]
        query = q[:, 0]  # [B, H, D]
        short_keys = _layer_norm(self.norm_short, window_keys)
        short_values = _layer_norm(self.norm_short, window_values)
        logits = torch.cat([
            torch.einsum("bhd,bjhd->bhj", query, short_keys),
            torch.einsum("bhd,bhrd->bhr", query, long_keys),
        ], dim=-1) / math.sqrt(self.head_dim)
        probs = torch.softmax(logits, dim=-1)
        span = window_keys.shape[1]
        out = torch.einsum("bhj,bjhd->bhd", probs[..., :span], short_values) + torch.einsum(
            "bhr,bhrd->bhd", probs[..., span:], long_values
        )
        keep = max(span - (w - 1), 0)
        state = LongShortState(window_keys[:, keep:], window_values[:, keep:], segment_keys,
                               segment_values, long_keys, long_values)
        return out[:, None], state
