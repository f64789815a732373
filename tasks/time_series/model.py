"""Informer (Zhou et al., AAAI 2021) with every attention a zoo member.

The three attention roles: the encoder's self attention (``noncausal_self``), the decoder's
self attention (``causal_self``) and its cross attention to the encoder (``noncausal_cross``).
Informer's own ProbSparse attention is the zoo member ``probsparse``; any other member with
those patterns takes its place.

Structure (Informer2020's ``informer`` model):

- Embedding: a circular 1-d convolution of the values (kernel 3), plus a sinusoidal position
  embedding, plus a linear map of the time features.
- Encoder: post-norm layers (attention, then a position-wise feed-forward of 1x1 convolutions);
  between two layers, self-attention distilling halves the length (convolution, batch norm,
  ELU, max-pooling with stride 2).
- Decoder: a generative-style decoder: its input is the last ``label_len`` known steps (the
  start token) followed by ``pred_len`` zeros, and it forecasts all ``pred_len`` steps in one
  forward pass, causal self attention, then cross attention to the encoder.

Informer's ``mix`` option (a reshape that interleaves heads in the decoder's self attention) is
not reproduced: every attention goes through the one :class:`MultiHeadAttention` layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo import MultiHeadAttention, Pattern
from tasks.base import AttentionChoice

ROLES: dict[str, Pattern] = {
    "encoder_self": Pattern.NONCAUSAL_SELF,
    "decoder_self": Pattern.CAUSAL_SELF,
    "cross": Pattern.NONCAUSAL_CROSS,
}


@dataclass(frozen=True)
class InformerShape:
    """The sizes of an Informer.

    Attributes:
        input_dims: variables per step fed to the encoder and decoder (C).
        output_dims: variables forecast per step.
        time_dims: time features per step (F).
        pred_len: steps forecast.
        d_model, n_heads, e_layers, d_layers, d_ff, dropout, distil: as in Informer2020.
    """

    input_dims: int
    output_dims: int
    time_dims: int
    pred_len: int
    d_model: int = 512
    n_heads: int = 8
    e_layers: int = 2
    d_layers: int = 1
    d_ff: int = 2048
    dropout: float = 0.05
    distil: bool = True


class DataEmbedding(nn.Module):
    """Value convolution + sinusoidal position + time-feature embedding.

    Args:
        input_dims: C; time_dims: F; d_model: E.

    Shapes: x [B, L, C], marks [B, L, F] -> [B, L, E].
    """

    def __init__(self, input_dims: int, time_dims: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.value = nn.Conv1d(input_dims, d_model, kernel_size=3, padding=1,
                               padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.value.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.time = nn.Linear(time_dims, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.d_model = d_model

    def position(self, length: int, device: torch.device) -> Tensor:
        """[1, L, E] sinusoidal position embedding (Vaswani et al.)."""
        position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, self.d_model, 2, device=device, dtype=torch.float32)
                              * (-math.log(10000.0) / self.d_model))
        table = torch.zeros(length, self.d_model, device=device)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : self.d_model // 2]
        return table[None]

    def forward(self, x: Tensor, marks: Tensor) -> Tensor:
        values = self.value(x.transpose(1, 2)).transpose(1, 2)  # [B, L, E]
        return self.dropout(values + self.position(x.shape[1], x.device) + self.time(marks))


class FeedForward(nn.Module):
    """Informer's position-wise feed-forward: two 1x1 convolutions with GELU. [B, L, E] -> same."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Conv1d(d_model, d_ff, kernel_size=1)
        self.down = nn.Conv1d(d_ff, d_model, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dropout(F.gelu(self.up(x.transpose(1, 2))))  # [B, d_ff, L]
        return self.dropout(self.down(y).transpose(1, 2))  # [B, L, E]


def attention_layer(d_model: int, n_heads: int, choice: AttentionChoice,
                    pattern: Pattern) -> MultiHeadAttention:
    return MultiHeadAttention(d_model, n_heads, choice.name, pattern=pattern,
                              attention_args=dict(choice.args))


class EncoderLayer(nn.Module):
    """Self attention and feed-forward, each added and normalised. [B, L, E] -> [B, L, E]."""

    def __init__(self, shape: InformerShape, choice: AttentionChoice) -> None:
        super().__init__()
        self.attention = attention_layer(shape.d_model, shape.n_heads, choice,
                                         Pattern.NONCAUSAL_SELF)
        self.feed_forward = FeedForward(shape.d_model, shape.d_ff, shape.dropout)
        self.norm1 = nn.LayerNorm(shape.d_model)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.feed_forward(x))


class Distilling(nn.Module):
    """Self-attention distilling: conv (k=3, circular) + batch norm + ELU + max-pool (stride 2).

    Shapes: [B, L, E] -> [B, ceil(L / 2), E].
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(d_model)
        self.pool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.elu(self.norm(self.conv(x.transpose(1, 2))))  # [B, E, L]
        return self.pool(y).transpose(1, 2)


class Encoder(nn.Module):
    """``e_layers`` encoder layers with distilling between them, then a layer norm.

    Shapes: [B, L, E] -> [B, L / 2^(e_layers - 1), E] (rounded up at each halving).
    """

    def __init__(self, shape: InformerShape, choice: AttentionChoice) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(shape, choice) for _ in range(shape.e_layers))
        self.distilling = nn.ModuleList(
            Distilling(shape.d_model) for _ in range(shape.e_layers - 1 if shape.distil else 0)
        )
        self.norm = nn.LayerNorm(shape.d_model)

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.distilling):
                x = self.distilling[index](x)
        return self.norm(x)


class DecoderLayer(nn.Module):
    """Causal self attention, cross attention to the encoder, feed-forward; each added and
    normalised. x [B, Ld, E], memory [B, Le, E] -> [B, Ld, E]."""

    def __init__(self, shape: InformerShape, self_choice: AttentionChoice,
                 cross_choice: AttentionChoice) -> None:
        super().__init__()
        self.self_attention = attention_layer(shape.d_model, shape.n_heads, self_choice,
                                              Pattern.CAUSAL_SELF)
        self.cross_attention = attention_layer(shape.d_model, shape.n_heads, cross_choice,
                                               Pattern.NONCAUSAL_CROSS)
        self.feed_forward = FeedForward(shape.d_model, shape.d_ff, shape.dropout)
        self.norm1 = nn.LayerNorm(shape.d_model)
        self.norm2 = nn.LayerNorm(shape.d_model)
        self.norm3 = nn.LayerNorm(shape.d_model)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.self_attention(x)))
        x = self.norm2(x + self.dropout(self.cross_attention(x, memory, memory)))
        return self.norm3(x + self.feed_forward(x))


class Decoder(nn.Module):
    """``d_layers`` decoder layers and a layer norm. x [B, Ld, E], memory [B, Le, E] -> x's shape.

    Position t of the output depends on decoder inputs <= t only (and on all of ``memory``).
    """

    def __init__(self, shape: InformerShape, self_choice: AttentionChoice,
                 cross_choice: AttentionChoice) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(shape, self_choice, cross_choice) for _ in range(shape.d_layers)
        )
        self.norm = nn.LayerNorm(shape.d_model)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory)
        return self.norm(x)


class Informer(nn.Module):
    """Informer with zoo attentions.

    Args:
        shape: sizes (see :class:`InformerShape`).
        attention: one :class:`AttentionChoice` per role in :data:`ROLES`.

    Shapes of :meth:`forward`: x [B, Ls, C], x_mark [B, Ls, F], y [B, Ll + Lp, C] (only its
    first ``Ll`` steps are read), y_mark [B, Ll + Lp, F] -> forecast [B, Lp, output_dims].
    """

    def __init__(self, shape: InformerShape, attention: Mapping[str, AttentionChoice]) -> None:
        super().__init__()
        missing = sorted(set(ROLES) - set(attention))
        if missing:
            raise ValueError(f"Informer needs an attention for every role {sorted(ROLES)}; "
                             f"missing: {missing}")
        self.shape = shape
        self.encoder_embedding = DataEmbedding(shape.input_dims, shape.time_dims, shape.d_model,
                                               shape.dropout)
        self.decoder_embedding = DataEmbedding(shape.input_dims, shape.time_dims, shape.d_model,
                                               shape.dropout)
        self.encoder = Encoder(shape, attention["encoder_self"])
        self.decoder = Decoder(shape, attention["decoder_self"], attention["cross"])
        self.projection = nn.Linear(shape.d_model, shape.output_dims)

    def decoder_input(self, y: Tensor) -> Tensor:
        """The start token (known steps of ``y``) followed by zeros where the forecast goes.

        y: [B, Ll + Lp, C] -> [B, Ll + Lp, C].
        """
        label_len = y.shape[1] - self.shape.pred_len
        zeros = torch.zeros_like(y[:, label_len:])
        return torch.cat([y[:, :label_len], zeros], dim=1)

    def forward(self, x: Tensor, x_mark: Tensor, y: Tensor, y_mark: Tensor) -> Tensor:
        memory = self.encoder(self.encoder_embedding(x, x_mark))  # [B, Le, E]
        decoded = self.decoder(self.decoder_embedding(self.decoder_input(y), y_mark), memory)
        return self.projection(decoded[:, -self.shape.pred_len:])  # [B, Lp, output_dims]
