"""cosFormer: ReLU features with a cos-based re-weighting (Qin et al., ICLR 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern
from attention_zoo.mechanisms.kernelized import (
    RunningSums,
    accumulation_dtype,
    kernelized_attention,
)
from attention_zoo.registry import register_attention

EPS = 1e-6
"""Added to the normaliser (the authors' code clamps it at 1e-6): a ReLU query can be all zero."""


@dataclass(frozen=True)
class CosFormerConfig:
    """Hyperparameters of cosFormer."""

    max_length: int = field(
        default=4096,
        metadata={
            "help": "M of the causal patterns (longest sequence); non-causal ones use each "
                    "sequence's own length, as in the paper",
            "min": 1,
            # bounds the sequence length: a benchmark of cost sets it to the timed length
            "length_bound": True,
        },
    )


def cos_reweighted(x: Tensor, positions: Tensor, length_scale: Tensor) -> Tensor:
    """[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]: the decomposed cosFormer features.

    Args:
        x: [B, L, H, D]; positions: [B or 1, L] 1-based positions i; length_scale: [B or 1, 1] M.

    Returns:
        [B, L, H, 2D]; the product of a query's and a key's features is
        relu(q_i) . relu(k_j) cos(pi (i - j) / 2M).
    """
    dtype = accumulation_dtype(x.dtype)  # positions up to M are not exact in half types
    angle = (math.pi / 2) * positions.to(dtype) / length_scale.to(dtype)  # [B, L]
    relu = torch.relu(x.to(dtype))
    return torch.cat(
        [relu * torch.cos(angle)[:, :, None, None], relu * torch.sin(angle)[:, :, None, None]],
        dim=-1,
    )


@dataclass
class CosFormerState:
    """Decoding state: the running sums and the number of tokens seen."""

    sums: RunningSums
    count: int


@register_attention("cosformer")
class CosFormerAttention(Attention):
    """cosFormer: linear attention with ReLU features and a cos(pi (i - j) / 2M) locality bias.

    s(q_i, k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / 2M), decomposed with
    cos(a - b) = cos a cos b + sin a sin b into 2D-dimensional features, and
    out_i = sum_j s(q_i, k_j) v_j / (sum_j s(q_i, k_j) + 1e-6) over the visible keys. Positions
    are 1-based. Non-causal patterns use, as the paper, M = the sequence length: the number of
    real keys (self), max(Lq, real keys) (cross), with key positions counted among the real keys
    so that padding changes nothing. Causal self attention needs an M that does not depend on
    the future, so it uses ``max_length`` (default 4096) and refuses longer sequences; this also
    makes decoding possible (prefix sums, O(D^2) numbers per head). Time O(n D^2).
    In cross attention a query's weight depends on its index i among the queries, so a query
    alone (a decoder's cross attention, one query at a time) does not give its row of the whole
    pass: ``noncausal_cross`` only.

    Qin et al., cosFormer: Rethinking Softmax in Attention, ICLR 2022.
    """

    Config = CosFormerConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    decoding = True
    complexity = Complexity.LINEAR
    reference = "Qin et al., cosFormer: Rethinking Softmax in Attention, ICLR 2022 (arXiv 2202.08791)"

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        batch, query_length = q.shape[:2]
        key_length = k.shape[1]
        device = q.device
        valid = None if key_padding_mask is None else ~key_padding_mask
        if self.pattern.causal:
            self._check_length(query_length)
            scale = torch.tensor([[float(self.config.max_length)]], device=device)
            query_positions = torch.arange(1, query_length + 1, device=device)[None]
            key_positions = torch.arange(1, key_length + 1, device=device)[None]
        else:
            if valid is None:
                valid = torch.ones(batch, key_length, dtype=torch.bool, device=device)
            key_positions = valid.cumsum(dim=1)  # rank among the real keys: [B, Lk]
            real_keys = key_positions[:, -1:].clamp(min=1)  # [B, 1]
            if self.pattern.cross:
                query_positions = torch.arange(1, query_length + 1, device=device)[None]
                scale = real_keys.clamp(min=query_length)
            else:
                query_positions, scale = key_positions, real_keys
        return kernelized_attention(
            cos_reweighted(q, query_positions, scale), cos_reweighted(k, key_positions, scale), v,
            causal=self.pattern.causal, key_valid=valid, eps=EPS,
        )

    def _check_length(self, length: int) -> None:
        if length > self.config.max_length:
            raise ValueError(
                f"cosformer: a causal sequence of {length} tokens exceeds max_length="
                f"{self.config.max_length}; build it with max_length >= {length}"
            )

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> CosFormerState:
        sums = RunningSums.empty(
            batch_size, self.heads, 2 * self.head_dim, self.head_dim, device=device, dtype=dtype
        )
        return CosFormerState(sums, 0)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: CosFormerState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, CosFormerState]:
        position = state.count + 1
        self._check_length(position)
        positions = torch.tensor([[position]], device=q.device)
        scale = torch.tensor([[float(self.config.max_length)]], device=q.device)
        out, sums = state.sums.step(
            cos_reweighted(q, positions, scale)[:, 0], cos_reweighted(k, positions, scale)[:, 0],
            v[:, 0], eps=EPS,
        )
        return out[:, None], CosFormerState(sums, position)
