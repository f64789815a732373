"""ABC: attention with bounded-memory control (the learned, contextualised ABC_MLP)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
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
    pass is chunked: exact softmax-weighted prefix sums inside chunks of C = 32 tokens, and a
    scan over the chunks that carries the memory with the log normaliser (stable, no future
    statistic), so it builds [B, H, L, C, n] and [B, H, L / C, n, D] tensors, never
    [B, L, H, n, D]. Time O(n L (C + D)); decoding state O(n D) per head.
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
        batch, q_len, heads, dim = q.shape
        c = self.chunk_size
        length = -(-q_len // c) * c
        chunks = length // c
        if valid is None:
            valid = torch.ones(batch, k.shape[1], dtype=torch.bool, device=q.device)
        # Padded to whole chunks (padded keys are invalid and never enter the memory).
        valid = F.pad(valid, (0, length - k.shape[1]), value=False)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, length - x.shape[1])) for x in (q, k, v))
        logits = self.control_logits(k, valid)  # [B, H, L, n]
        log_normaliser = torch.logcumsumexp(logits, dim=2)  # log sum_{s <= t} exp(a_s)

        def chunked(x: Tensor) -> Tensor:  # [B, H, L, ...] -> [B, H, N, C, ...]
            return x.reshape(batch, heads, chunks, c, *x.shape[3:])

        a, z = chunked(logits), chunked(log_normaliser)
        qc, kc, vc = (x.transpose(1, 2).reshape(batch, heads, chunks, c, dim) for x in (q, k, v))
        # phi_{t,s} = exp(a_s - Z_t) for s <= t inside the chunk: [B, H, N, C(t), C(s), n]
        inside = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()[:, :, None]
        inside = inside & valid.view(batch, 1, chunks, 1, c, 1)
        exponent = (a[:, :, :, None] - z[:, :, :, :, None]).masked_fill(~inside, float("-inf"))
        weights = torch.exp(exponent)

        # Each chunk's own contribution to the memory at its end, then a scan over the chunks:
        # memory(end c) = exp(Z_end(c-1) - Z_end(c)) memory(end c-1) + contribution(c), factor <= 1.
        z_end = z[:, :, :, -1]  # [B, H, N, n]
        own_keys = torch.einsum("bhcsn,bhcsd->bhcnd", weights[:, :, :, -1], kc)  # [B, H, N, n, D]
        own_values = torch.einsum("bhcsn,bhcsd->bhcnd", weights[:, :, :, -1], vc)
        memory_keys = q.new_zeros(batch, heads, logits.shape[-1], dim)  # [B, H, n, D]
        memory_values = torch.zeros_like(memory_keys)
        previous_z = torch.full_like(z_end[:, :, 0], float("-inf"))
        start_keys, start_values = [], []
        for chunk in range(chunks):  # L / C small steps: linear in L, unlike a chunk-pair matrix
            start_keys.append(memory_keys)
            start_values.append(memory_values)
            keep = torch.exp(previous_z - z_end[:, :, chunk])[..., None]
            memory_keys = keep * memory_keys + own_keys[:, :, chunk]
            memory_values = keep * memory_values + own_values[:, :, chunk]
            previous_z = z_end[:, :, chunk]
        start_keys, start_values = torch.stack(start_keys, 2), torch.stack(start_values, 2)
        # -inf: the first chunk carries nothing in (exp(0 - Z) could overflow).
        start_z = F.pad(z_end, (0, 0, 1, -1), value=float("-inf"))  # [B, H, N, n]
        decay = torch.exp(start_z[:, :, :, None] - z)  # exp(Z_start - Z_t) <= 1: [B, H, N, C, n]

        scores = decay * torch.einsum("bhctd,bhcnd->bhctn", qc, start_keys) + torch.einsum(
            "bhctsn,bhcts->bhctn", weights, torch.einsum("bhctd,bhcsd->bhcts", qc, kc)
        )
        read = torch.softmax(scores / math.sqrt(dim), dim=-1)  # [B, H, N, C, n]
        out = torch.einsum("bhctn,bhcnd->bhctd", read * decay, start_values) + torch.einsum(
            "bhcts,bhcsd->bhctd", torch.einsum("bhctn,bhctsn->bhcts", read, weights), vc
        )
        return out.reshape(batch, heads, length, dim).transpose(1, 2)[:, :q_len]

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
