"""The shared core of the gated linear recurrences: chunked parallel forms and one-token steps.

Retention, gated linear attention, Mamba-2's state-space duality and HGRN2 are one recurrence
with a matrix state S_t [K, V] per head,

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t,

that differ only in where the log-decay g_t <= 0 comes from (a constant per head, a scalar per
head and token, or one per key channel and token). DeltaNet and Gated DeltaNet replace the
additive write by the delta rule with a write strength beta_t,

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t.

The parallel forms here are chunked (Yang et al., ICML 2024 for the gated form; Yang et al.,
NeurIPS 2024 for the delta rule): inside a chunk of C positions a masked [C, C] score matrix,
across chunks the [K, V] state carried by a scan over the L / C chunks (one autograd node,
:mod:`~attention_zoo.mechanisms.chunk_scan`). Time O(L C K + L K V), never an [L, L] matrix.
Every decay factor is exp of a difference G_t - G_s of within-chunk cumulative log-decays with
s <= t, so it is <= 1 and nothing overflows; per-channel decays use secondary chunking down to
single positions (each half-block reads the one before it through their midpoint), never a
[C, C, K] decay tensor nor a division by exp(G_s). Sums run in float32 for half-precision
inputs (float64 stays float64).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo.base import Attention, AttentionConfigError, Pattern
from attention_zoo.mechanisms.chunk_scan import carried_states
from attention_zoo.mechanisms.kernelized import accumulation_dtype

Backend = Literal["auto", "torch", "fla"]
BACKEND_METADATA = {"help": (
    "torch: the chunked PyTorch form; fla: flash-linear-attention's Triton kernels (CUDA, pip "
    "install fla-core); auto: fla's kernels on CUDA when fla is importable, else torch")}
"""Metadata of the ``backend`` hyperparameter (default ``"auto"``) of every gated recurrence."""

CHUNK_METADATA = {"help": "positions per chunk of the PyTorch form (cost O(L C) inside chunks)",
                  "min": 1}
"""Metadata of the ``chunk_size`` hyperparameter."""


@dataclass(frozen=True)
class Recurrence:
    """The per-position terms of one recurrence, already scaled and activated.

    Attributes:
        q: [B, L, H, K] read vectors.
        k: [B, L, H, K] write keys.
        v: [B, L, H, V] written values.
        log_decay: [B, L, H, K] per key channel, [B, L, H] per head, or None (no decay); <= 0.
        beta: [B, L, H] delta-rule write strengths, or None for the additive write.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Tensor | None = None
    beta: Tensor | None = None


@dataclass
class RecurrentState:
    """Decoding state of a gated recurrence: the matrix memory S [B, H, K, V] (float32 or wider)."""

    memory: Tensor


def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, L, H, ...] (L a multiple of chunk) -> [B, H, N, C, ...]."""
    batch, length, heads = x.shape[:3]
    x = x.reshape(batch, length // chunk, chunk, heads, *x.shape[3:])
    return x.movedim(3, 1)


def _from_chunks(x: Tensor, length: int) -> Tensor:
    """[B, H, N, C, V] -> [B, length, H, V]."""
    return x.movedim(1, 3).flatten(1, 2)[:, :length]


def _pad_time(x: Tensor, pad: int) -> Tensor:
    """Zero-pad dim 1 of [B, L, ...] by ``pad`` positions at the end."""
    return F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad)) if pad else x


def _prepared(terms: Recurrence, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Chunked q, k, v, cumulative log-decay G and beta, in the accumulation dtype.

    Padding positions at the end get k = v = 0, g = 0 and beta = 0: they leave the state as it
    is. Returns q, k [B, H, N, C, K], v [B, H, N, C, V], G [B, H, N, C, K or 1], beta
    [B, H, N, C] or None.
    """
    dtype = accumulation_dtype(terms.v.dtype)
    length = terms.q.shape[1]
    pad = (-length) % chunk
    q, k, v = (_to_chunks(_pad_time(t.to(dtype), pad), chunk) for t in (terms.q, terms.k, terms.v))
    g = terms.log_decay
    if g is None:
        g = terms.q.new_zeros(terms.q.shape[:3])
    if g.ndim == 3:
        g = g[..., None]  # one decay per head: [B, L, H, 1]
    cumulative = _to_chunks(_pad_time(g.to(dtype), pad), chunk).cumsum(dim=3)
    beta = None if terms.beta is None else _to_chunks(_pad_time(terms.beta.to(dtype), pad), chunk)
    return q, k, v, cumulative, beta


def _decay_scores(q: Tensor, k: Tensor, cumulative: Tensor) -> Tensor:
    """Masked (q_t . k_s) exp(g_t - g_s) for s <= t inside each chunk, one decay per head.

    q, k: [B, H, N, C, K]; cumulative: [B, H, N, C, 1]. Returns [B, H, N, C, C].
    """
    chunk = q.shape[3]
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    g = cumulative[..., 0]
    decay = torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~lower, float("-inf")))
    return (q @ k.transpose(-1, -2)) * decay


def _pad_chunk(x: Tensor, size: int, *, repeat_last: bool = False) -> Tensor:
    """Extend dim 3 (the position in a chunk) of [B, H, N, C, X] to ``size``: zeros, or the last
    position repeated."""
    pad = size - x.shape[3]
    if not pad:
        return x
    if repeat_last:
        return torch.cat([x, x[:, :, :, -1:].expand(-1, -1, -1, pad, -1)], dim=3)
    return F.pad(x, (0, 0, 0, pad))


def _intra_per_channel(
    q: Tensor, k: Tensor, v: Tensor, cumulative: Tensor, *, on_values: bool = False
) -> Tensor:
    """sum_{s <= t} (sum_i q_ti k_si exp(G_ti - G_si)) v_s inside each chunk, per-channel decays
    on the key channels i, or with ``on_values`` sum_{s <= t} (q_t . k_s) v_sj exp(G_tj - G_sj).

    Secondary chunking carried down to single positions: the chunk (padded to a power of two)
    is halved level by level; at each level the second half of every block reads the first
    half through the block's midpoint m, with the factors exp(G_t - G_m) and exp(G_m - G_s),
    both <= 1 (G does not increase), so one matmul per level replaces the [C, C, K] decay
    tensor and nothing overflows. Time O(C (K + V)) per position, memory O(K log C).

    q, k: [B, H, N, C, K]; v: [B, H, N, C, V]; cumulative G: [B, H, N, C, K or V].
    Returns [B, H, N, C, V].
    """
    chunk = q.shape[3]
    size = 1 << (chunk - 1).bit_length()
    q, k, v = (_pad_chunk(x, size) for x in (q, k, v))
    g = _pad_chunk(cumulative, size, repeat_last=True)
    out = (q * k).sum(-1, keepdim=True) * v  # s = t: exp(0) = 1
    block = size // 2
    while block:
        (_, q_second), (k_first, _), (v_first, _), (g_first, g_second) = (
            _halves(x, block) for x in (q, k, v, g))
        middle = g_first[..., -1:, :]  # [B, H, N, P / 2b, 1, K or V]
        if on_values:
            scores = q_second @ k_first.transpose(-1, -2)
            read = (scores @ (v_first * torch.exp(middle - g_first))) * torch.exp(g_second - middle)
        else:
            reads = q_second * torch.exp(g_second - middle)
            keys = k_first * torch.exp(middle - g_first)
            read = (reads @ keys.transpose(-1, -2)) @ v_first  # [B, H, N, P / 2b, b, V]
        out = out + F.pad(read, (0, 0, block, 0)).reshape(out.shape)
        block //= 2
    return out[:, :, :, :chunk]


def _halves(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """[B, H, N, P, X] -> the first and second halves of its blocks of 2 ``block`` positions,
    each [B, H, N, P / (2 block), block, X]."""
    first, second = x.reshape(*x.shape[:3], x.shape[3] // (2 * block), 2, block,
                              x.shape[-1]).unbind(-3)  # one gradient buffer for both halves
    return first, second


def chunked_gated_recurrence(
    terms: Recurrence, *, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The additive recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, chunked.

    Args:
        terms: q, k [B, L, H, K], v [B, L, H, V], log_decay per channel, per head or None
            (``beta`` must be None).
        chunk_size: positions per chunk C.
        initial_state: [B, H, K, V] state before position 0, or None (zeros).

    Returns:
        ``(out [B, L, H, V] in v's dtype, final state [B, H, K, V] in the accumulation dtype)``.
    """
    if terms.beta is not None:
        raise ValueError("chunked_gated_recurrence: beta is set; use chunked_delta_rule")
    q, k, v, cumulative, _ = _prepared(terms, chunk_size)
    out, state = _additive_chunks(q, k, v, cumulative, _initial(q, v, initial_state))
    return _from_chunks(out, terms.q.shape[1]).to(terms.v.dtype), state


def chunked_value_gated_recurrence(
    terms: Recurrence, *, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S_t = S_{t-1} diag(exp(g_t)) + k_t v_t^T, o_t = S_t^T q_t: the decay on the value channels.

    o_t,j = sum_{s <= t} (q_t . k_s) v_s,j exp(G_t,j - G_s,j) (ABC's key memory read), chunked
    as :func:`chunked_gated_recurrence`.

    Args:
        terms: q, k [B, L, H, K], v [B, L, H, V], log_decay [B, L, H, V] (<= 0), beta None.
        chunk_size: positions per chunk C.
        initial_state: [B, H, K, V] or None (zeros).

    Returns:
        ``(out [B, L, H, V] in v's dtype, final state [B, H, K, V] in the accumulation dtype)``.
    """
    if terms.beta is not None or terms.log_decay is None or terms.log_decay.ndim != 4:
        raise ValueError("chunked_value_gated_recurrence: needs log_decay [B, L, H, V], no beta")
    q, k, v, cumulative, _ = _prepared(terms, chunk_size)
    out, state = _additive_chunks(q, k, v, cumulative, _initial(q, v, initial_state),
                                  on_values=True)
    return _from_chunks(out, terms.q.shape[1]).to(terms.v.dtype), state


def _additive_chunks(
    q: Tensor, k: Tensor, v: Tensor, cumulative: Tensor, state: Tensor, *, on_values: bool = False
) -> tuple[Tensor, Tensor]:
    """The additive recurrence on chunked terms (see :func:`_prepared`) from ``state``
    [B, H, K, V]; decays on the key channels ([.., K or 1]) or, ``on_values``, on the value
    channels ([.., V]). Returns ``(out [B, H, N, C, V], final state)``."""
    total = cumulative[..., -1:, :]  # [B, H, N, 1, K, 1 or V]: log-decay over the whole chunk
    tail = torch.exp(total - cumulative)  # decay from each position to the chunk's end
    if on_values:
        intra = _intra_per_channel(q, k, v, cumulative, on_values=True)
        chunk_writes = k.transpose(-1, -2) @ (v * tail)  # [B, H, N, K, V]
        starts, state = carried_states(torch.exp(total), chunk_writes, state)
        return intra + (q @ starts) * torch.exp(cumulative), state
    if cumulative.shape[-1] == 1:
        intra = _decay_scores(q, k, cumulative) @ v  # [B, H, N, C, V]
    else:
        intra = _intra_per_channel(q, k, v, cumulative)
    chunk_writes = (k * tail).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = torch.exp(total[..., 0, :])[..., None]  # [B, H, N, K or 1, 1]
    starts, state = carried_states(chunk_decay, chunk_writes, state)
    return intra + (q * torch.exp(cumulative)) @ starts, state


def chunked_delta_rule(
    terms: Recurrence, *, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, chunked.

    Inside a chunk with start state S and within-chunk cumulative log-decay G, the written
    values u_t = b_t (v_t - k_t^T (state before the write)) solve the unit lower-triangular
    system (I + A) u = b v - (b exp(G) k) S with A_ts = b_t exp(G_t - G_s) k_t . k_s (s < t),
    so u = U - W S with U, W from one triangular solve per chunk (the UT / WY form); then
    o_t = exp(G_t) S^T q_t + sum_{s <= t} exp(G_t - G_s) (q_t . k_s) u_s.

    Args:
        terms: q, k [B, L, H, K], v [B, L, H, V], beta [B, L, H], log_decay [B, L, H] or None.
        chunk_size: positions per chunk C.
        initial_state: [B, H, K, V] or None (zeros).

    Returns:
        ``(out [B, L, H, V] in v's dtype, final state [B, H, K, V] in the accumulation dtype)``.
    """
    if terms.beta is None:
        raise ValueError("chunked_delta_rule: needs beta")
    if terms.log_decay is not None and terms.log_decay.ndim != 3:
        raise ValueError("chunked_delta_rule: the decay must be one per head, [B, L, H]")
    q, k, v, cumulative, beta = _prepared(terms, chunk_size)
    values, keys = _wy_terms(k, v, cumulative[..., 0], beta)
    g = cumulative[..., 0]  # [B, H, N, C]
    reads = q * torch.exp(g)[..., None]
    writes = k * torch.exp(g[..., -1:] - g)[..., None]
    out, state = _delta_scan(
        (values, keys, reads, _decay_scores(q, k, cumulative), writes, torch.exp(g[..., -1])),
        _initial(q, v, initial_state))
    return _from_chunks(out, terms.q.shape[1]).to(terms.v.dtype), state


def _wy_terms(k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """U and W of the UT transform, u = U - W S: [B, H, N, C, V] and [B, H, N, C, K].

    k: [B, H, N, C, K]; v: [B, H, N, C, V]; g (cumulative log-decay), beta: [B, H, N, C].
    """
    chunk = k.shape[3]
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    decay = torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~strictly_lower, float("-inf")))
    system = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay) + torch.eye(
        chunk, dtype=k.dtype, device=k.device)
    right = torch.cat([beta[..., None] * v, (beta * torch.exp(g))[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, right, upper=False, unitriangular=True)
    return solved[..., : v.shape[-1]], solved[..., v.shape[-1]:]


def _delta_scan(chunks: tuple[Tensor, ...], state: Tensor) -> tuple[Tensor, Tensor]:
    """The delta rule's loop over chunks, from the start state [B, H, K, V].

    ``chunks``: U [B, H, N, C, V], W [B, H, N, C, K], the decayed reads exp(G) q [.., C, K],
    the masked scores [.., C, C], the decayed writes exp(G_end - G) k [.., C, K] and the
    chunk decays exp(G_end) [B, H, N]; taken chunk by chunk with ``unbind`` (see
    :func:`carried_states`). Returns ``(out [B, H, N, C, V], final state)``.
    """
    outputs = []
    for values, keys, reads, scores, writes, decay in zip(*(x.unbind(2) for x in chunks), strict=True):
        written = values - keys @ state  # u: [B, H, C, V]
        outputs.append(reads @ state + scores @ written)
        state = decay[..., None, None] * state + writes.transpose(-1, -2) @ written
    return torch.stack(outputs, dim=2), state


def _initial(q: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    """The state before the first chunk: [B, H, K, V] zeros or ``initial_state`` as q's dtype."""
    if initial_state is not None:
        return initial_state.to(q.dtype)
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])


def recurrent_step(terms: Recurrence, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
    """One position of the recurrence (additive or delta rule, as ``terms.beta`` says).

    Args:
        terms: q, k [B, 1, H, K], v [B, 1, H, V], log_decay [B, 1, H, K], [B, 1, H] or None,
            beta [B, 1, H] or None.
        state: the memory after the previous positions.

    Returns:
        ``(out [B, 1, H, V] in v's dtype, new state)``.
    """
    memory = state.memory
    dtype = memory.dtype
    q, k, v = (t[:, 0].to(dtype) for t in (terms.q, terms.k, terms.v))  # [B, H, K or V]
    if terms.log_decay is not None:
        g = terms.log_decay[:, 0].to(dtype)
        memory = memory * torch.exp(g if g.ndim == 3 else g[..., None])[..., None]
    if terms.beta is None:
        written = v
    else:
        recalled = torch.einsum("bhk,bhkv->bhv", k, memory)
        written = terms.beta[:, 0].to(dtype)[..., None] * (v - recalled)
    memory = memory + k[..., :, None] * written[..., None, :]
    out = torch.einsum("bhk,bhkv->bhv", q, memory)
    return out[:, None].to(terms.v.dtype), RecurrentState(memory)


def fla_unavailable(device: torch.device) -> str | None:
    """Why flash-linear-attention's Triton kernels cannot run on ``device``, or None if they can."""
    if device.type != "cuda":
        return f"fla's kernels are Triton GPU kernels and the device is {device.type}"
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install fla-core)"
    return None


def fla_recurrence(terms: Recurrence) -> Tensor:
    """The same recurrence on fla's chunked Triton kernels (scale 1: ``terms.q`` is scaled).

    Returns:
        out [B, L, H, V] in v's dtype.
    """
    ops = importlib.import_module("fla.ops")
    q, k, v = terms.q, terms.k, terms.v
    g = terms.log_decay
    if terms.beta is not None:
        if g is None:
            out, _ = ops.chunk_delta_rule(q, k, v, terms.beta, scale=1.0)
        else:
            out, _ = ops.chunk_gated_delta_rule(q, k, v, g.float(), terms.beta, scale=1.0)
    elif g is None or g.ndim == 3:
        out, _ = ops.chunk_simple_gla(q, k, v, g=None if g is None else g.float(), scale=1.0)
    else:
        out, _ = ops.chunk_gla(q, k, v, g.float(), scale=1.0)
    return out.to(v.dtype)


def choose_fla(name: str, backend: str, reason: str | None) -> bool:
    """Whether a call of ``backend`` ``"auto"`` or ``"fla"`` runs fla's kernel, given ``reason``,
    why fla cannot take this call (None: it can): ``auto`` falls back to PyTorch, ``fla`` raises."""
    if backend == "auto":
        return reason is None
    if reason is not None:
        raise ValueError(f"{name}: backend='fla' cannot run this call: {reason}; "
                         "use backend='auto' (falls back to PyTorch) or backend='torch'")
    return True


class GatedRecurrentAttention(Attention):
    """Base of the mechanisms that are one gated recurrence (causal self attention, decoding).

    A subclass maps the zoo's inputs onto the recurrence in :meth:`recurrence` and may post-
    process the read in :meth:`finish` (the per-head normalisation of the papers, a skip term).
    Its ``Config`` has the fields ``chunk_size`` and ``backend``.
    """

    patterns = frozenset({Pattern.CAUSAL_SELF})
    decoding = True

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if config.backend == "fla" and importlib.util.find_spec("fla") is None:
            raise AttentionConfigError(
                f"{type(self).__name__}: backend='fla' needs flash-linear-attention "
                "(pip install fla-core); use backend='auto' or 'torch'"
            )

    def recurrence(self, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Recurrence:
        """The recurrence's terms from q, k, v [B, L, H, D] and the layer input."""
        raise NotImplementedError

    def finish(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, layer_input: Any) -> Tensor:
        """The mechanism's output [B, L, H, D] from the recurrence's read ``out`` [B, L, H, D]."""
        return F.rms_norm(out, (out.shape[-1],), eps=1e-6)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: Any = None,
    ) -> Tensor:
        # Causal self attention pads on the right: padded keys come after every real query and
        # never reach it, so the mask needs no handling here.
        return self.finish(self.run(self.recurrence(q, k, v, layer_input)), q, k, v, layer_input)

    def run(self, terms: Recurrence) -> Tensor:
        """The recurrence's reads [B, L, H, V] on the configured backend (from a zero state)."""
        if self._use_fla(terms):
            return fla_recurrence(terms)
        if terms.beta is None:
            return chunked_gated_recurrence(terms, chunk_size=self.config.chunk_size)[0]
        return chunked_delta_rule(terms, chunk_size=self.config.chunk_size)[0]

    def gate_input(self, layer_input: Any) -> Tensor:
        """The layer's query-side input [B, L, E] that the gates are computed from."""
        if layer_input is None:
            raise ValueError(f"{self.name}: computes its gates from the layer's input and needs "
                             "layer_input=LayerInput(...) (MultiHeadAttention passes it)")
        return layer_input.query

    def _use_fla(self, terms: Recurrence) -> bool:
        backend = self.config.backend
        if backend == "torch":
            return False
        reason = fla_unavailable(terms.q.device)
        if reason is None and terms.q.dtype == torch.float64:
            reason = "fla's kernels take float32, float16 or bfloat16, not float64"
        if (reason is None and terms.q.dtype == torch.float32 and terms.beta is not None
                and terms.log_decay is None):
            reason = "fla's chunk_delta_rule refuses float32 (it asserts bfloat16 or float16)"
        return choose_fla(self.name, backend, reason)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> RecurrentState:
        memory = torch.zeros(batch_size, self.heads, self.head_dim, self.head_dim,
                             device=device, dtype=accumulation_dtype(dtype))
        return RecurrentState(memory)

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: RecurrentState, *, layer_input: Any = None
    ) -> tuple[Tensor, RecurrentState]:
        out, state = recurrent_step(self.recurrence(q, k, v, layer_input), state)
        return self.finish(out, q, k, v, layer_input), state
