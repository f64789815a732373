"""Local attention: exact softmax attention restricted to a window of nearby keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, Pattern, masked_softmax
from attention_zoo.registry import register_attention


def window_positions(
    query_length: int,
    key_length: int,
    *,
    window: int,
    kind: Literal["sliding", "blocked"],
    causal: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The keys each query's window holds, as positions.

    ``sliding``: query t sees keys s with t - window < s <= t when causal, |t - s| < window
    otherwise. ``blocked``: positions are cut into blocks of ``window``; query t sees the keys
    of its own block (those s <= t when causal). Positions are index-aligned, so a window is the
    same whatever the sequences' lengths.

    Returns:
        positions: [Lq, W] long, key position per query and window slot (clamped into range).
        inside: [Lq, W] bool, whether that slot holds a real key of the window.
    """
    t = torch.arange(query_length, device=device)[:, None]  # [Lq, 1]
    if kind == "sliding":
        width = window if causal else 2 * window - 1
        positions = t - (window - 1) + torch.arange(width, device=device)[None, :]
        inside = positions >= 0
    else:
        positions = (t // window) * window + torch.arange(window, device=device)[None, :]
        inside = positions <= t if causal else torch.ones_like(positions, dtype=torch.bool)
    inside = inside & (positions < key_length)
    return positions.clamp(0, max(key_length - 1, 0)), inside


def gather_windows(x: Tensor, positions: Tensor) -> Tensor:
    """[B, Lk, H, D] gathered at positions [Lq, W] -> [B, Lq, W, H, D]."""
    return x[:, positions]


def windowed_softmax_logits(
    q: Tensor, k: Tensor, positions: Tensor, inside: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scaled logits q_t . k_s / sqrt(D) over each query's window, and which slots are visible.

    Args:
        q: [B, Lq, H, D]; k: [B, Lk, H, D]; positions, inside: [Lq, W] from
            :func:`window_positions`; key_padding_mask: [B, Lk] bool or None.

    Returns:
        logits [B, H, Lq, W] and visible [B or 1, 1, Lq, W] bool.
    """
    keys = gather_windows(k, positions)  # [B, Lq, W, H, D]
    logits = torch.einsum("bqhd,bqwhd->bhqw", q, keys) / math.sqrt(q.shape[-1])
    visible = inside[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, positions][:, None]  # [B, 1, Lq, W]
    return logits, visible


@dataclass(frozen=True)
class LocalConfig:
    """Hyperparameters of local attention."""

    window: int = field(
        default=16,
        metadata={"help": "sliding: keys closer than this (one side when causal); blocked: block length",
                  "min": 1},
    )
    kind: Literal["sliding", "blocked"] = field(
        default="sliding",
        metadata={"help": "sliding window around each query, or fixed non-overlapping blocks"},
    )


@dataclass
class LocalState:
    """Decoding state: the keys and values that the next token's window can still see.

    Attributes:
        keys: [B, j, H, D], at most window - 1 positions.
        values: [B, j, H, D].
        count: tokens seen so far (the position of the next token).
    """

    keys: Tensor
    values: Tensor
    count: int


@register_attention("local")
class LocalAttention(Attention):
    """Local attention: exact softmax attention inside a sliding or blocked window.

    out_t = sum_{s in W(t)} softmax_s(q_t . k_s / sqrt(D)) v_s, with W(t) (``kind``, ``window`` w):

    - ``sliding`` (default): s in (t - w, t] when causal, |t - s| < w otherwise (2w - 1 keys);
    - ``blocked``: the block of w positions holding t (only s <= t when causal), as in the
      blockwise local attention of Image Transformer / Liu et al.'s memory-compressed attention.

    Defaults: w = 16, sliding. Windows are index-aligned, so the mechanism serves self attention
    and causal cross attention (query t and source position s aligned by index, as in CAB);
    non-causal cross attention has no alignment between the two sequences and is not declared.
    With w >= the length it equals softmax attention. Time and memory O(n w D). Decodes with a
    cache of the last w - 1 keys (sliding) or the current block (blocked).
    """

    Config = LocalConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})
    decoding = True
    complexity = Complexity.LINEAR
    reference = (
        "Parmar et al., Image Transformer, ICML 2018; Beltagy et al., Longformer, "
        "arXiv 2004.05150 (2020)"
    )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        positions, inside = window_positions(
            q.shape[1], k.shape[1], window=self.config.window, kind=self.config.kind,
            causal=self.pattern.causal, device=q.device,
        )
        logits, visible = windowed_softmax_logits(q, k, positions, inside, key_padding_mask)
        probs = masked_softmax(logits, visible)  # [B, H, Lq, W]
        return torch.einsum("bhqw,bqwhd->bqhd", probs, gather_windows(v, positions))

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LocalState:
        empty = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return LocalState(empty, empty.clone(), 0)

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: LocalState) -> tuple[Tensor, LocalState]:
        w = self.config.window
        if self.config.kind == "blocked" and state.count % w == 0:  # a new block starts here
            state = LocalState(state.keys[:, :0], state.values[:, :0], state.count)
        keys = torch.cat([state.keys, k], dim=1)  # [B, j+1, H, D]
        values = torch.cat([state.values, v], dim=1)
        logits = torch.einsum("bqhd,bjhd->bhqj", q, keys) / math.sqrt(self.head_dim)
        out = torch.einsum("bhqj,bjhd->bqhd", torch.softmax(logits, dim=-1), values)
        if self.config.kind == "sliding":
            keep = max(keys.shape[1] - (w - 1), 0)
            keys, values = keys[:, keep:], values[:, keep:]
        return out, LocalState(keys, values, state.count + 1)
