"""ABC: attention with bounded-memory control (the learned, contextualised ABC_MLP)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.mechanisms.gated_recurrence import (
    Recurrence,
    chunked_gated_recurrence,
    chunked_value_gated_recurrence,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class ABCConfig:
    """Hyperparameters of ABC."""

    slots: int = field(default=32, metadata={"help": "memory slots n", "min": 1})


@dataclass
class ABCState:
    """Decoding state: the normalised memory and its log normaliser, O(n D) per head.

    Attributes:
        log_normaliser: [B, H, n] log sum_{s <= t} exp(a_s) per slot.
        keys: [B, H, n, D] key memory K~_t.
        values: [B, H, n, D] value memory V~_t.
    """

    log_normaliser: Tensor
    keys: Tensor
    values: Tensor


@register_attention("abc")
class ABCAttention(Attention):
    """ABC_MLP: n memory slots written by a learned, contextualised control; read by softmax.

    Per head, control logits a_s = W_phi k_s in R^n (one per slot), and the control
    phi_{s,l} = exp(a_{s,l}) / sum_{s' visible} exp(a_{s',l}): each slot is a softmax-weighted
    average of the visible tokens. The memories are K~ = sum_s phi_s (x) k_s and
    V~ = sum_s phi_s (x) v_s (n x D each), and out_t = softmax(q_t K~^T / sqrt(D)) V~.
    Visible: every valid key (non-causal, and cross attention, causal or not: each query reads
    the memory of the whole source), or s <= t (causal self attention: the control is
    normalised over the prefix, as in the paper's causal ABC, so the memory at t is K~_t).
    Default n = 32.

    The paper computes the control from the layer input x; at the zoo boundary only q, k, v
    exist, so the control reads the key (a linear function of x in the usual layer). The causal
    pass runs the two memories as gated linear recurrences over the slots (the decay is the
    growth of the log normaliser, so no future statistic and nothing overflows), chunked
    (C = 32) with the state carried across chunks: it never builds [B, L, H, n, D] nor a
    [C, C, n] tensor per chunk. Time O(n L (C + D)); decoding state O(n D) per head.
    """

    Config = ABCConfig
    patterns = frozenset(Pattern)
    decoding = True
    complexity = Complexity.LINEAR
    reference = (
        "Peng et al., ABC: Attention with Bounded-memory Control, ACL 2022 (arXiv 2110.02488)"
    )
    chunk_size = 32

    def __init__(
        self, config: ABCConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        self.control = nn.Parameter(torch.randn(heads, config.slots, head_dim) / math.sqrt(head_dim))

    def control_logits(self, k: Tensor, valid: Tensor | None) -> Tensor:
        """a = W_phi k: [B, Lk, H, D] -> [B, H, Lk, n], padded keys at the dtype's minimum."""
        logits = torch.einsum("blhd,hnd->bhln", k, self.control.to(k.dtype))
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, :, None], torch.finfo(k.dtype).min)
        return logits

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        valid = None if key_padding_mask is None else ~key_padding_mask  # [B, Lk]
        if self.pattern.triangular:
            return self._causal(q, k, v, valid)
        logits = self.control_logits(k, valid).transpose(2, 3)  # [B, H, n, Lk]
        allowed = None if valid is None else valid[:, None, None, :]
        control = masked_softmax(logits, allowed)  # phi, normalised over the keys
        memory_keys = torch.einsum("bhnl,blhd->bhnd", control, k)
        memory_values = torch.einsum("bhnl,blhd->bhnd", control, v)
        read = torch.softmax(
            torch.einsum("bqhd,bhnd->bhqn", q, memory_keys) / math.sqrt(self.head_dim), dim=-1
        )
        return torch.einsum("bhqn,bhnd->bqhd", read, memory_values)

    def _causal(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Causal self attention as two gated recurrences over the slots (chunked, linear).

        With Z_t = log sum_{s <= t} exp(a_s) (per slot) and the write e_s = exp(a_s - Z_s) <= 1,
        the control exp(a_s - Z_t) = e_s exp(Z_s - Z_t) is a write decayed by g_t = Z_{t-1} - Z_t
        <= 0 per slot: K~_t = diag(exp(g_t)) K~_{t-1} + e_t k_t^T, likewise V~_t. The logits
        K~_t q_t are a recurrence with the decay on its value channels (the slots), the read
        V~_t^T p_t one with the decay on its key channels. q, k, v: [B, L, H, D].
        """
        logits = self.control_logits(k, valid).transpose(1, 2)  # [B, L, H, n]
        log_normaliser = torch.logcumsumexp(logits, dim=1)
        writes = torch.exp(logits - log_normaliser)
        if valid is not None:
            writes = writes * valid[:, :, None, None]
        # g_0 = 0: the memory before the first token is empty, any decay leaves it so. A drop
        # below -1000 decays to exactly 0 in every float type; the clamp keeps the cumulative
        # sums of a chunk small after a padded key's logit (the dtype's minimum).
        drop = log_normaliser[:, :-1] - log_normaliser[:, 1:]
        log_decay = F.pad(drop, (0, 0, 0, 0, 1, 0)).clamp(min=-1000.0)
        c = self.chunk_size
        scores = chunked_value_gated_recurrence(Recurrence(q, k, writes, log_decay), chunk_size=c)
        read = torch.softmax(scores[0] / math.sqrt(self.head_dim), dim=-1)  # [B, L, H, n]
        return chunked_gated_recurrence(Recurrence(read, writes, v, log_decay), chunk_size=c)[0]

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> ABCState:
        slots = self.config.slots
        log_normaliser = torch.full(
            (batch_size, self.heads, slots), torch.finfo(dtype).min, device=device, dtype=dtype
        )
        memory = torch.zeros(batch_size, self.heads, slots, self.head_dim, device=device, dtype=dtype)
        return ABCState(log_normaliser, memory, memory.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: ABCState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, ABCState]:
        logits = self.control_logits(k, None)[:, :, 0]  # [B, H, n]
        log_normaliser = torch.logaddexp(state.log_normaliser, logits)
        keep = torch.exp(state.log_normaliser - log_normaliser)[..., None]  # [B, H, n, 1]
        write = torch.exp(logits - log_normaliser)[..., None]
        keys = keep * state.keys + write * k[:, 0, :, None, :]  # [B, H, n, D]
        values = keep * state.values + write * v[:, 0, :, None, :]
        read = torch.softmax(
            torch.einsum("bhd,bhnd->bhn", q[:, 0], keys) / math.sqrt(self.head_dim), dim=-1
        )
        out = torch.einsum("bhn,bhnd->bhd", read, values)[:, None]  # [B, 1, H, D]
        return out, ABCState(log_normaliser, keys, values)
