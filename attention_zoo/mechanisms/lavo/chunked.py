"""LAVO's causal self-attention as a chunked scan with a hand-written backward pass.

The plain path (``attention.py``) computes every intermediate over the whole sequence: each
elementwise step streams [B, L, H, r] tensors through memory, autograd keeps about twenty of them
for the backward pass, and the running sums are ``cumsum`` over a strided axis. On a CPU that is
memory-bound, and once those tensors outgrow the last-level cache the time grows faster than the
length. Here the sequence is cut into chunks of ``chunk`` tokens (a whole number of windows); a
Python loop walks the chunks in order and carries the running sums of the key and value
coefficients from one chunk to the next (flash-linear-attention's chunked form of a linear
recurrence, applied to LAVO's running means). Every intermediate of a chunk is [B, H, C, *] and
stays in cache; the output of a chunk is written once.

The backward pass walks the chunks in reverse. It recomputes each chunk from q, k, v and the
running sums at the chunk's start (the only thing the forward pass saves besides its inputs:
[chunks, B, H, 2, r]) and carries the other way the sums of the gradients that reach the running
sums from later queries. Activations are therefore O(L H D) (the inputs) plus O(C H r) of working
memory, whatever the length.

Scope: self-attention, causal, no key padding mask; average or joint combination; relative
position bias or none; fixed or learned bases (the bases get their gradient). ``LAVOAttention``
uses the plain path for everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK = 256
"""Tokens per chunk (rounded down to a multiple of the window, at least one window)."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class _Setup:
    """What every chunk shares: sizes, dtypes, the bases and the position bias table."""

    batch: int
    length: int
    heads: int
    dim: int
    w: int
    chunk: int
    joint: bool
    acc: torch.dtype
    scale: float
    bases: Tensor  # [H, 1, r, D] in acc
    local_bias: Tensor | None  # [H, 1, 1, w, w] P[i - j + w - 1] in acc, or None
    future: Tensor  # [w, w] bool, True above the diagonal (keys after the query)

    def load(self, tensors: tuple[Tensor, ...], start: int) -> Tensor:
        """Chunk of each x [B, L, H, D] from ``start``, stacked: [n, H, B, C, D] in acc (zero
        past the end of the sequence)."""
        stop = min(start + self.chunk, self.length)
        out = torch.empty(len(tensors), self.heads, self.batch, self.chunk, self.dim,
                          dtype=self.acc, device=tensors[0].device)
        for index, x in enumerate(tensors):
            out[index, :, :, : stop - start] = x[:, start:stop].permute(2, 0, 1, 3)
        out[:, :, :, stop - start :] = 0.0
        return out

    def store(self, target: Tensor, part: Tensor, start: int) -> None:
        """Write a chunk [H, B, C, D] into target [B, L, H, D] at ``start`` (dropping padding)."""
        stop = min(start + self.chunk, self.length)
        target[:, start:stop] = part[:, :, : stop - start].permute(1, 2, 0, 3)

    def counts(self, start: int, device: torch.device) -> Tensor:
        """[C, 1] tokens seen by each query of the chunk (its position + 1)."""
        return torch.arange(start + 1, start + self.chunk + 1, device=device,
                            dtype=self.acc)[:, None]

    def windows(self, x: Tensor) -> Tensor:
        """[H, B, C, X] -> [H, B, C / w, w, X]."""
        return x.unflatten(-2, (self.chunk // self.w, self.w))


@dataclass
class _Forward:
    """Intermediates of one chunk that the backward pass needs, [H, B, C, *] in acc."""

    qkv: Tensor  # [3, H, B, C, D]
    coeffs: Tensor  # [3, H, B, C, r] q B^T, k B^T, v B^T
    key_means: Tensor  # [H, B, C, r] H^k_t
    value_means: Tensor  # [H, B, C, r] H^v_t
    memory_probs: Tensor  # [H, B, C, r]
    local_probs: Tensor  # [H, B, C / w, w, w]


def chunk_probabilities(s: _Setup, qkv: Tensor, memory_logits: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk's read probabilities, for either memory: over the r slots from
    ``memory_logits`` [H, B, C, r], and over the window from the chunk's queries and keys
    (``qkv`` [3 or more, H, B, C, D]) with the relative bias and the causal mask; one joint
    softmax (``combine="joint"``) or two. Returns ``([H, B, C, r], [H, B, N, w, w])``."""
    q, k = s.windows(qkv[0]), s.windows(qkv[1])
    scores = (q @ k.transpose(-1, -2)) * s.scale  # [H, B, N, w, w]
    if s.local_bias is not None:
        scores = scores + s.local_bias
    scores = scores.masked_fill(s.future, float("-inf"))
    if not s.joint:
        return torch.softmax(memory_logits, -1), torch.softmax(scores, -1)
    top = torch.maximum(memory_logits.amax(-1), scores.amax(-1).flatten(-2))  # [H, B, C]
    memory_exp = torch.exp(memory_logits - top[..., None])
    local_exp = torch.exp(scores - s.windows(top[..., None]))
    total = memory_exp.sum(-1, keepdim=True) + local_exp.sum(-1).flatten(-2)[..., None]
    return memory_exp / total, local_exp / s.windows(total)


def _chunk_forward(s: _Setup, qkv: Tensor, state: Tensor, start: int) -> _Forward:
    """The probabilities of one chunk, given the running sums of the key and value
    coefficients before it (``state`` [2, H, B, 1, r])."""
    coeffs = qkv @ s.bases.transpose(-1, -2)  # [3, H, B, C, r]
    means = (state + torch.cumsum(coeffs[1:], dim=-2)) / s.counts(start, qkv.device)
    memory_logits = coeffs[0] * means[0] * s.scale
    memory_probs, local_probs = chunk_probabilities(s, qkv, memory_logits)
    return _Forward(qkv, coeffs, means[0], means[1], memory_probs, local_probs)


def _chunk_output(s: _Setup, f: _Forward) -> Tensor:
    """[H, B, C, D] the chunk's output."""
    memory = (f.memory_probs * f.value_means) @ s.bases
    local = (f.local_probs @ s.windows(f.qkv[2])).flatten(-3, -2)
    return (memory + local) * (1.0 if s.joint else 0.5)


@dataclass
class _Gradients:
    """Gradients of one chunk: q, k, v [3, H, B, C, D], bases [H, r, D] (or None), bias
    [H, w, w], and the gradients reaching the running sums, summed over the chunk [2, H, B, 1, r]."""

    qkv: Tensor
    bases: Tensor | None
    local_bias: Tensor
    sums: Tensor


def _chunk_backward(s: _Setup, f: _Forward, grad_out: Tensor, start: int, carry: Tensor,
                    with_bases: bool) -> _Gradients:
    """Gradients of one chunk. ``carry`` [2, H, B, 1, r]: the sums, over all later queries, of
    the gradients reaching the key and value running sums (they flow into every key here)."""
    grad = grad_out * (1.0 if s.joint else 0.5)  # [H, B, C, D]
    grad_weighted = grad @ s.bases.transpose(-1, -2)  # [H, B, C, r]
    grad_memory_probs = grad_weighted * f.value_means
    grad_windows = s.windows(grad)
    q, k, v = (s.windows(x) for x in f.qkv)
    grad_local_probs = grad_windows @ v.transpose(-1, -2)  # [H, B, N, w, w]
    memory_dot = (f.memory_probs * grad_memory_probs).sum(-1, keepdim=True)  # [H, B, C, 1]
    local_dot = (f.local_probs * grad_local_probs).sum(-1, keepdim=True)  # [H, B, N, w, 1]
    if s.joint:  # one softmax over both sets of logits: one shared correction term
        memory_dot = memory_dot + local_dot.flatten(-3, -2)
        local_dot = s.windows(memory_dot)
    grad_logits = f.memory_probs * (grad_memory_probs - memory_dot) * s.scale
    grad_scores = f.local_probs * (grad_local_probs - local_dot) * s.scale  # [H, B, N, w, w]
    counts = s.counts(start, grad.device)
    grad_coeffs = torch.empty_like(f.coeffs)  # [3, H, B, C, r]
    torch.mul(grad_logits, f.key_means, out=grad_coeffs[0])
    torch.mul(grad_logits, f.coeffs[0], out=grad_coeffs[1])  # reaching the key running sums
    torch.mul(grad_weighted, f.memory_probs, out=grad_coeffs[2])  # ... the value running sums
    grad_coeffs[1:] /= counts
    sums = grad_coeffs[1:].sum(-2, keepdim=True)
    # A running sum at t collects coefficients s <= t, so key s gets the sum over t >= s of the
    # gradients reaching the running sums: this chunk's (a reverse cumsum) and later chunks'.
    grad_coeffs[1:] = sums - torch.cumsum(grad_coeffs[1:], dim=-2) + grad_coeffs[1:] + carry
    grad_qkv = grad_coeffs @ s.bases  # [3, H, B, C, D]
    grad_qkv[0] += (grad_scores @ k).flatten(-3, -2)
    grad_qkv[1] += (grad_scores.transpose(-1, -2) @ q).flatten(-3, -2)
    grad_qkv[2] += (f.local_probs.transpose(-1, -2) @ grad_windows).flatten(-3, -2)
    grad_bases = None
    if with_bases:
        weighted = f.memory_probs * f.value_means
        grad_bases = ((grad_coeffs.transpose(-1, -2) @ f.qkv).sum((0, 2))
                      + (weighted.transpose(-1, -2) @ grad).sum(1))  # [H, r, D]
    return _Gradients(grad_qkv, grad_bases, grad_scores.sum((1, 2)) / s.scale, sums)


class _ChunkedLAVO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bases: Tensor,  # type: ignore[override]
                position_bias: Tensor | None, w: int, joint: bool, chunk: int) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            s = _setup(q, bases, position_bias, w, joint, chunk)
            out = torch.empty_like(q)
            state = torch.zeros(2, s.heads, s.batch, 1, bases.shape[1], device=q.device,
                                dtype=s.acc)
            starts = range(0, s.length, s.chunk)
            states = state.new_empty(len(starts), *state.shape)
            for index, start in enumerate(starts):
                states[index] = state
                f = _chunk_forward(s, s.load((q, k, v), start), state, start)
                s.store(out, _chunk_output(s, f), start)
                state = state + f.coeffs[1:].sum(-2, keepdim=True)
        ctx.save_for_backward(q, k, v, bases, position_bias, states)
        ctx.settings = (w, joint, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, bases, position_bias, states = ctx.saved_tensors
        w, joint, chunk = ctx.settings
        with_bases = ctx.needs_input_grad[3]
        with torch.autocast(q.device.type, enabled=False):
            s = _setup(q, bases, position_bias, w, joint, chunk)
            grads = [torch.empty_like(x) for x in (q, k, v)]
            grad_bases = torch.zeros(bases.shape, device=q.device, dtype=s.acc)
            grad_local_bias = torch.zeros(s.heads, w, w, device=q.device, dtype=s.acc)
            carry = torch.zeros_like(states[0])
            starts = range(0, s.length, s.chunk)
            for index in reversed(range(len(starts))):
                start = starts[index]
                f = _chunk_forward(s, s.load((q, k, v), start), states[index], start)
                g = _chunk_backward(s, f, s.load((grad_out,), start)[0], start, carry,
                                    with_bases)
                for target, part in zip(grads, g.qkv):
                    s.store(target, part, start)
                if g.bases is not None:
                    grad_bases += g.bases
                grad_local_bias += g.local_bias
                carry = carry + g.sums
        grad_position = None
        if position_bias is not None and ctx.needs_input_grad[4]:
            index = _relative_index(w, q.device).flatten()
            grad_position = torch.zeros(s.heads, 2 * w - 1, device=q.device, dtype=s.acc)
            grad_position.index_add_(1, index, grad_local_bias.flatten(1))
            grad_position = grad_position.to(position_bias.dtype)
        grad_bases_out = grad_bases.to(bases.dtype) if with_bases else None
        return (*grads, grad_bases_out, grad_position, None, None, None)


def _relative_index(w: int, device: torch.device) -> Tensor:
    """[w, w] index into P of query i and key j of one window: i - j + w - 1."""
    window = torch.arange(w, device=device)
    return window[:, None] - window[None, :] + w - 1


def _setup(q: Tensor, bases: Tensor, position_bias: Tensor | None, w: int, joint: bool,
           chunk: int) -> _Setup:
    batch, length, heads, dim = q.shape
    acc = _accumulation_dtype(q.dtype)
    local_bias = None
    if position_bias is not None:
        local_bias = position_bias.to(acc)[:, None, None, _relative_index(w, q.device)]
    future = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)
    chunk = max(1, chunk // w) * w
    return _Setup(batch, length, heads, dim, w, chunk, joint, acc, 1.0 / math.sqrt(dim),
                  bases.to(acc)[:, None], local_bias, future)


def lavo_causal_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bases: Tensor,
    position_bias: Tensor | None,
    w: int,
    joint: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """LAVO causal self-attention, chunk by chunk (the plain path's definition, no padding mask).

    Args:
        q, k, v: [B, L, H, D].
        bases: [H, r, D] orthonormal rows (their gradient is computed when they require it).
        position_bias: [H, 2w-1] relative bias of the local scores, or None.
        w: window size.
        joint: one softmax over memory and local logits (else the average of the two reads).
        chunk: tokens per chunk, rounded down to a multiple of ``w`` (at least ``w``).

    Returns:
        [B, L, H, D] in q's dtype (computed in float32 for half inputs).
    """
    if q.shape[1] == 0:
        return q.clone()
    return _ChunkedLAVO.apply(q, k, v, bases, position_bias, w, joint, chunk)
