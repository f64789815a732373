"""The multi-head attention layer that task backbones use: projections + mechanism + output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attention_zoo.base import Attention, LayerInput, Pattern
from attention_zoo.registry import build_attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention around any zoo mechanism.

    Args:
        embed_dim: model width E (= heads * head_dim).
        num_heads: number of heads H.
        attention: registry name of the mechanism (``"softmax"``, ``"lavo"``, ...).
        pattern: the attention pattern (self/cross, causal or not).
        attention_args: the mechanism's typed hyperparameters, e.g. ``{"r": 32, "w": 16}``
            (:func:`attention_zoo.parse_attention_args` reads them from command-line strings).
        kdim, vdim: widths of the key and value inputs (cross attention), default ``embed_dim``.
        bias: whether the projections have biases.

    Mechanisms that declare ``uses_layer_input`` also receive the layer's input and projections
    (:class:`~attention_zoo.LayerInput`); in cross attention their keys and values must come
    from one source (``value`` is ``key``, ``vdim == kdim``).

    Shapes:
        query: [B, Lq, E]; key, value: [B, Lk, kdim/vdim] (omit for self attention);
        key_padding_mask: [B, Lk] bool, True at padding; output: [B, Lq, E].
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: str = "softmax",
        *,
        pattern: str | Pattern,
        attention_args: Mapping[str, Any] | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.pattern = Pattern.parse(pattern)
        args = dict(attention_args or {})
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention: Attention = build_attention(
            attention, pattern=self.pattern, heads=num_heads, head_dim=self.head_dim,
            input_dim=embed_dim, source_dim=kdim or embed_dim, **args
        )
        if self.attention.needs_layer_input and (vdim or embed_dim) != (kdim or embed_dim):
            raise ValueError(
                f"{attention} reads the layer's key/value input, so keys and values must come "
                f"from one source: got kdim={kdim or embed_dim}, vdim={vdim or embed_dim}"
            )

    def _split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim)  # [B, L, H, D]

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend; see the class docstring for shapes. Self attention takes ``query`` alone."""
        if self.pattern.cross and key is None:
            raise ValueError(f"{self.pattern.value} attention needs key (and value) inputs")
        key = query if key is None else key
        value = key if value is None else value
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key))
        v = self._split(self.v_proj(value))
        layer_input = self._layer_input(query, key, value)
        out = self.attention(q, k, v, key_padding_mask, layer_input=layer_input)  # [B, Lq, H, D]
        return self.out_proj(out.reshape(*out.shape[:2], self.embed_dim))

    def _layer_input(self, query: Tensor, key: Tensor, value: Tensor) -> LayerInput | None:
        """The layer's input for mechanisms that declare ``uses_layer_input`` (None otherwise)."""
        if not self.attention.needs_layer_input:
            return None
        if not _same_tensor(value, key):
            raise ValueError(
                f"{self.attention.name} reads the layer's key/value input, so keys and values "
                "must come from one source tensor (pass value=None or the key tensor itself)"
            )
        return LayerInput(query=query, source=key, q_proj=self.q_proj, k_proj=self.k_proj,
                          v_proj=self.v_proj)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> Any:
        """Empty decoding state (causal self attention with a ``decoding`` mechanism)."""
        return self.attention.init_state(batch_size, device=device, dtype=dtype)

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Decode one position: x [B, 1, E] -> ([B, 1, E], new state)."""
        q, k, v = (self._split(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.attention.needs_layer_input:
            out, state = self.attention.step(q, k, v, state, layer_input=self._layer_input(x, x, x))
        else:
            out, state = self.attention.step(q, k, v, state)
        return self.out_proj(out.reshape(*out.shape[:2], self.embed_dim)), state


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are the same tensor, or views of the same data with the same layout."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype)


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` outside every zoo mechanism: what a backbone's own
    initialisation scheme may re-initialise.

    A mechanism initialises its own parameters (Mamba-2's step-size bias, which sets the decay
    rates it starts from; LAVO's bases; GLA's gate): a backbone that re-initialises every
    ``nn.Linear`` of the model (GPT-2's normal(0, 0.02) weights and zero biases) would reset
    them to values the mechanism's authors never start from. The attention layer's projections
    (``MultiHeadAttention``'s q/k/v/out) belong to the backbone and are included.
    """
    inside = {id(m) for attention in model.modules() if isinstance(attention, Attention)
              for m in attention.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices (2 or more dimensions), none on biases,
    norm gains and the per-head scalars of the mechanisms (decay rates, step-size biases, skips).

    The convention of GPT-2's successors (nanoGPT) and of Mamba's code (no weight decay on
    ``A_log``, ``D`` and ``dt_bias``): decay pulls a vector parameter towards zero, which for a
    step-size bias or a log decay rate is a change of what the mechanism models, not a penalty
    on its capacity.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
