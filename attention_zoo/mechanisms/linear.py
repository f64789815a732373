"""The linear transformer: elu + 1 features and prefix sums (Katharopoulos et al., ICML 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, NoConfig, Pattern
from attention_zoo.mechanisms.kernelized import RunningSums, kernelized_attention
from attention_zoo.registry import register_attention

EPS = 1e-6
"""Added to the normaliser, as in the authors' fast-transformers code."""


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise: [..., D] -> [..., D]."""
    return F.elu(x) + 1


@register_attention("linear")
class LinearAttention(Attention):
    """Linear transformer attention with the elu(x) + 1 feature map.

    out_t = phi(q_t)^T sum_s phi(k_s) v_s^T / (phi(q_t)^T sum_s phi(k_s) + 1e-6), with
    phi(x) = elu(x) + 1 and s over the visible keys (s <= t when causal: prefix sums, which is
    also the recurrent form used for decoding). No hyperparameters; no 1 / sqrt(D) scale (it
    would only rescale phi's input). Time O(n D^2), decoding state O(D^2) per head.

    Katharopoulos, Vyas, Pappas and Fleuret, Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention, ICML 2020.
    """

    Config = NoConfig
    patterns = frozenset(Pattern)
    decoding = True
    complexity = Complexity.LINEAR
    reference = "Katharopoulos et al., Transformers are RNNs, ICML 2020 (arXiv 2006.16236)"

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        valid = None if key_padding_mask is None else ~key_padding_mask
        return kernelized_attention(
            elu_feature_map(q), elu_feature_map(k), v,
            causal=self.pattern.triangular, key_valid=valid, eps=EPS,
        )

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> RunningSums:
        return RunningSums.empty(
            batch_size, self.heads, self.head_dim, self.head_dim, device=device, dtype=dtype
        )

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: RunningSums, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, RunningSums]:
        out, state = state.step(
            elu_feature_map(q[:, 0]), elu_feature_map(k[:, 0]), v[:, 0], eps=EPS
        )
        return out[:, None], state
