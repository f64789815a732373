"""The small causal language model of Zoology's MQAR experiments, with a zoo attention in every
layer.

Token embeddings (plus learned absolute positions when asked), ``layers`` pre-norm blocks
(Zoology's short gated convolution, causal self attention and an optional MLP, each with
LayerNorm and a residual), a final LayerNorm, and
an output head tied to the token embeddings. Initialisation follows Zoology's GPT-2 scheme:
normal(0, 0.02) weights, zero biases, and the residual output projections scaled by
``1 / sqrt(2 * layers)``, on the backbone's modules only: each mechanism keeps its own
initialisation (as Zoology's and fla's models keep Mamba's ``dt_bias``, marked ``_no_reinit``).

Unlike Zoology, where each sequence mixer brings its own wrapper, every mechanism here runs in
the same backbone (the benchmark's rule: only the attention differs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from attention_zoo import MultiHeadAttention, Pattern, backbone_modules
from tasks.base import AttentionChoice

ROLE = "causal_self"
ROLES: dict[str, Pattern] = {ROLE: Pattern.CAUSAL_SELF}


@dataclass(frozen=True)
class RecallModelShape:
    """Sizes of the model.

    Attributes:
        vocab_size: V.
        max_len: longest sequence (position embeddings).
        d_model: width E.
        layers: blocks.
        heads: attention heads (Zoology's attention runs one).
        mlp_ratio: MLP hidden width / E; 0 leaves the MLP out (Zoology's MQAR models).
        dropout: after the embeddings (Zoology's ``embed_dropout``).
        conv_kernel: width of the short gated convolution before each attention (Zoology's
            BaseConv, kernel 3); 0 leaves it out.
        positions: ``"none"`` (the convolution and the causal mask carry order, as in Zoology's
            reference configs) or ``"learned"`` absolute position embeddings (its Figure 2
            attention models).
        reinit_attention: a diagnostic: apply the GPT-2 initialisation to the mechanisms' own
            parameters too, as this model did before (it zeroes Mamba-2's step-size bias, so
            every decay starts near exp(-0.69 a)); off, each mechanism keeps its own.
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    layers: int = 2
    heads: int = 1
    mlp_ratio: int = 4
    dropout: float = 0.0
    conv_kernel: int = 3
    positions: Literal["none", "learned"] = "none"
    reinit_attention: bool = False


class ShortConvolution(nn.Module):
    """Zoology's BaseConv: a causal depthwise convolution over ``kernel`` tokens, gated by a
    linear projection, ``conv(x) * proj(x)``. It gives every position its few predecessors, the
    local binding of a key to its value that the attention then looks up. Shapes: [B, L, E]."""

    def __init__(self, width: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)
        self.projection = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)  # [B, L, E]
        return mixed * self.projection(x)


class RecallBlock(nn.Module):
    """Pre-norm block: ``x + conv(norm(x))``, ``x + attn(norm(x))``, ``x + mlp(norm(x))``
    (each part present when configured). Shapes: [B, L, E]."""

    def __init__(self, shape: RecallModelShape, choice: AttentionChoice) -> None:
        super().__init__()
        self.conv: ShortConvolution | None = None
        if shape.conv_kernel:
            self.conv_norm = nn.LayerNorm(shape.d_model)
            self.conv = ShortConvolution(shape.d_model, shape.conv_kernel)
        self.attention_norm = nn.LayerNorm(shape.d_model)
        self.attention = MultiHeadAttention(shape.d_model, shape.heads, choice.name,
                                            pattern=Pattern.CAUSAL_SELF, attention_args=choice.args)
        self.mlp: nn.Module | None = None
        if shape.mlp_ratio:
            hidden = shape.mlp_ratio * shape.d_model
            self.mlp_norm = nn.LayerNorm(shape.d_model)
            self.mlp = nn.Sequential(nn.Linear(shape.d_model, hidden), nn.GELU(),
                                     nn.Linear(hidden, shape.d_model))

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = x + self.conv(self.conv_norm(x))
        x = x + self.attention(self.attention_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class RecallModel(nn.Module):
    """The causal LM. ``forward`` returns the final hidden states; :meth:`logits` maps selected
    positions to the vocabulary (training only needs the queried positions, a small fraction of
    the sequence, so the [*, V] product is never formed for the rest)."""

    def __init__(self, shape: RecallModelShape, choice: AttentionChoice) -> None:
        super().__init__()
        self.shape = shape
        self.tokens = nn.Embedding(shape.vocab_size, shape.d_model)
        self.positions = nn.Embedding(shape.max_len, shape.d_model) if shape.positions == "learned" else None
        self.dropout = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(RecallBlock(shape, choice) for _ in range(shape.layers))
        self.final_norm = nn.LayerNorm(shape.d_model)
        for module in self.modules() if shape.reinit_attention else backbone_modules(self):
            self._init_weights(module)
        residual_std = 0.02 / math.sqrt(2 * shape.layers)
        for block in self.blocks:
            nn.init.normal_(block.attention.out_proj.weight, std=residual_std)
            if block.mlp is not None:
                nn.init.normal_(block.mlp[2].weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, L] (L <= max_len) -> hidden states [B, L, E]."""
        x = self.tokens(tokens)  # [B, L, E]
        if self.positions is not None:
            length = tokens.shape[1]
            if length > self.shape.max_len:
                raise ValueError(f"sequence of {length} tokens exceeds max_len={self.shape.max_len}")
            x = x + self.positions.weight[:length]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., E] -> logits [..., V] through the tied token embeddings."""
        return hidden @ self.tokens.weight.T

    def attention_parameters(self) -> int:
        """Parameters inside the attention mechanisms, projections excluded."""
        return sum(p.numel() for block in self.blocks
                   for p in block.attention.attention.parameters() if p.requires_grad)
