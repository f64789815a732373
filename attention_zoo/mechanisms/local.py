"""Local attention: exact softmax attention restricted to a window of nearby keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class WindowBlocks:
    """Which keys each block of w consecutive queries may see.

    Queries are cut into N = ceil(Lq / w) blocks of w. Every query of block n looks only at the
    span of S key positions starting at n w + offset, so a window costs O(n S), and the spans
    are strided views of the keys (``torch.Tensor.unfold``), not gathered copies.

    Attributes:
        window: w.
        offset: position of span slot 0 relative to the block's first query.
        width: S.
        visible: [N, w, S] bool, whether query i of block n sees span slot j (positions out of
            the sequence are handled by :meth:`key_valid`).
    """

    window: int
    offset: int
    width: int
    visible: Tensor

    @property
    def blocks(self) -> int:
        return self.visible.shape[0]

    def spans(self, x: Tensor, fill: float | bool = 0) -> Tensor:
        """[B, Lk, ...] -> [B, N, S, ...]: each block's span, ``fill`` outside the sequence."""
        left = -self.offset
        needed = (self.blocks - 1) * self.window + self.width  # padded length the spans cover
        right = needed - left - x.shape[1]
        x = x[:, : needed - left] if right < 0 else x
        padding = [x.new_full((x.shape[0], n, *x.shape[2:]), fill) for n in (left, max(right, 0))]
        x = torch.cat([padding[0], x, padding[1]], dim=1)
        spans = x.unfold(1, self.width, self.window)  # [B, N, ..., S]
        return spans.movedim(-1, 2)

    def key_valid(self, key_padding_mask: Tensor | None, batch: int, key_length: int,
                  device: torch.device) -> Tensor:
        """[B, 1, N, w, S] bool: visible, inside the sequence, and not padding."""
        valid = (
            torch.ones(batch, key_length, dtype=torch.bool, device=device)
            if key_padding_mask is None else ~key_padding_mask
        )
        return self.visible[None, None] & self.spans(valid, fill=False)[:, None, :, None, :]


def window_blocks(
    query_length: int,
    *,
    window: int,
    kind: Literal["sliding", "blocked", "segment"],
    causal: bool,
    device: torch.device,
) -> WindowBlocks:
    """The block layout of a window. Query t sees (positions index-aligned with the keys):

    - ``sliding``: keys s with t - w < s <= t when causal, |t - s| < w otherwise
      (S = 2w - 1 causal, 3w - 2 otherwise);
    - ``blocked``: the keys of its own block (those s <= t when causal), S = w;
    - ``segment``: its block and w // 2 keys on each side (Transformer-LS), S = w + 2 (w // 2).
    """
    w = window
    blocks = -(-query_length // w)
    if kind == "sliding":
        offset, width = -(w - 1), (2 * w - 1 if causal else 3 * w - 2)
    elif kind == "blocked":
        offset, width = 0, w
    else:
        offset, width = -(w // 2), w + 2 * (w // 2)
    query = torch.arange(w, device=device)[:, None]  # offset in the block: [w, 1]
    key = offset + torch.arange(width, device=device)[None, :]  # relative to block start: [1, S]
    if kind == "sliding":
        distance = query - key  # t - s
        visible = (distance >= 0) & (distance < w) if causal else distance.abs() < w
    elif kind == "blocked" and causal:
        visible = key <= query
    else:
        visible = torch.ones(w, width, dtype=torch.bool, device=device)
    return WindowBlocks(w, offset, width, visible.expand(blocks, w, width))


def to_blocks(x: Tensor, window: int) -> Tensor:
    """[B, L, ...] -> [B, N, w, ...], zero-padded at the end to N = ceil(L / w) blocks."""
    pad = (-x.shape[1]) % window
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    return x.view(x.shape[0], -1, window, *x.shape[2:])


def from_blocks(x: Tensor, length: int) -> Tensor:
    """[B, N, w, ...] -> [B, length, ...]."""
    return x.flatten(1, 2)[:, :length]


def windowed_logits(
    q: Tensor, k: Tensor, layout: WindowBlocks, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scaled logits q_t . k_s / sqrt(D) over each query's window, and which slots it sees.

    Args:
        q: [B, Lq, H, D]; k: [B, Lk, H, D]; layout: from :func:`window_blocks`;
            key_padding_mask: [B, Lk] bool or None.

    Returns:
        logits [B, H, N, w, S] and visible [B, 1, N, w, S] bool.
    """
    # Head-major and contiguous: batched matmuls over strided views fall onto a slow path.
    queries = to_blocks(q, layout.window).permute(0, 3, 1, 2, 4).contiguous()  # [B, H, N, w, D]
    keys = layout.spans(k).permute(0, 3, 1, 2, 4).contiguous()  # [B, H, N, S, D]
    logits = queries @ keys.transpose(-1, -2)
    visible = layout.key_valid(key_padding_mask, k.shape[0], k.shape[1], k.device)
    return logits / math.sqrt(q.shape[-1]), visible


def windowed_read(probs: Tensor, v: Tensor, layout: WindowBlocks, length: int) -> Tensor:
    """sum_j probs[.., j] v at span slot j: probs [B, H, N, w, S] -> [B, length, H, D]."""
    values = layout.spans(v).permute(0, 3, 1, 2, 4).contiguous()  # [B, H, N, S, D]
    return from_blocks((probs @ values).permute(0, 2, 3, 1, 4), length)


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

    Defaults: w = 16, sliding. Windows need one sequence, so the mechanism serves self attention
    only: a query of another sequence has no window in the source (CAB's local attention
    refuses cross attention too). With w >= the length it equals softmax attention. Queries
    are processed in blocks of w against one span of keys per block: time and memory
    O(n w D). Decodes with a cache of the last w - 1 keys (sliding) or the current block
    (blocked).
    """

    Config = LocalConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    decoding = True
    complexity = Complexity.LINEAR
    reference = (
        "Parmar et al., Image Transformer, ICML 2018; Beltagy et al., Longformer, "
        "arXiv 2004.05150 (2020)"
    )

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        layout = window_blocks(q.shape[1], window=self.config.window, kind=self.config.kind,
                               causal=self.pattern.causal, device=q.device)
        logits, visible = windowed_logits(q, k, layout, key_padding_mask)
        return windowed_read(masked_softmax(logits, visible), v, layout, q.shape[1])

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LocalState:
        empty = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return LocalState(empty, empty.clone(), 0)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LocalState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, LocalState]:
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
