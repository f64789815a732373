"""LAVO's causal self-attention with ``memory="input"`` (the paper's single memory), chunk by
chunk, with a hand-written backward pass.

The memory of the layer input needs less than ``memory="kv"`` (``chunked.py``): its running mean
is one stream of r coefficients c_s = B x_s per position, shared by every head, and the slots'
keys and values are fixed directions, the projected bases (W_k b_j and W_v b_j per head, plus
the projections' biases), scaled by that mean. For query t in head h:

    logit_tj = (H_tj (q_t . Kb_hj) + q_t . kb_h) / sqrt(D),   H_t = (sum_{s<=t} c_s) / t
    F_global(t) = sum_j alpha_tj (H_tj Vb_hj + vb_h)

and the local read is the same windowed attention as ``chunked.py``'s. The pass walks chunks of
``chunk`` tokens (whole windows) carrying the running sum of c ([B, r]); the backward pass walks
them in reverse, recomputing each chunk from its inputs and the running sum at its start, and
carries the sum of the gradients that reach the running sums from later queries.

Inputs are the coefficients and the projected bases (computed by autograd outside, so that the
layer input, B and the projections get their gradients through them); saved for the backward
pass: the inputs and [chunks, B, r] running sums. Scope: causal self attention without a
padding mask, either combination, relative bias or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attention_zoo.mechanisms.lavo.chunked import (
    DEFAULT_CHUNK,
    _relative_index,
    _Setup,
    _setup,
    chunk_probabilities,
)


@dataclass(frozen=True)
class _Slots:
    """The slots' value directions and the projections' biases, in the accumulation dtype."""

    value_bases: Tensor  # [H, 1, r, D]
    key_bias: Tensor | None  # [H, 1, D, 1]: q @ key_bias is q . kb_h, [H, B, C, 1]
    value_bias: Tensor | None  # [H, 1, 1, D]


@dataclass
class _Forward:
    """Intermediates of one chunk, [H, B, C, *] (the means: [1, B, C, r])."""

    qkv: Tensor  # [3, H, B, C, D]
    query_coeffs: Tensor  # [H, B, C, r] q_t . Kb_hj
    means: Tensor  # [1, B, C, r] H_t
    memory_probs: Tensor  # [H, B, C, r]
    local_probs: Tensor  # [H, B, C / w, w, w]


def _load_coeffs(s: _Setup, coeffs: Tensor, start: int) -> Tensor:
    """Chunk of c [B, L, r] from ``start``: [1, B, C, r] in acc, zero past the end."""
    stop = min(start + s.chunk, s.length)
    out = coeffs.new_zeros(1, s.batch, s.chunk, coeffs.shape[-1], dtype=s.acc)
    out[0, :, : stop - start] = coeffs[:, start:stop]
    return out


def _chunk_forward(s: _Setup, slots: _Slots, qkv: Tensor, coeffs: Tensor, state: Tensor,
                   start: int) -> _Forward:
    """Probabilities of one chunk from q, k, v [3, H, B, C, D], its coefficients [1, B, C, r]
    and the running sum before it (``state`` [1, B, 1, r])."""
    query_coeffs = qkv[0] @ s.bases.transpose(-1, -2)  # [H, B, C, r]; s.bases: key bases
    means = (state + torch.cumsum(coeffs, dim=-2)) / s.counts(start, qkv.device)
    memory_logits = query_coeffs * means
    if slots.key_bias is not None:
        memory_logits = memory_logits + qkv[0] @ slots.key_bias
    memory_logits = memory_logits * s.scale
    memory_probs, local_probs = chunk_probabilities(s, qkv, memory_logits)
    return _Forward(qkv, query_coeffs, means, memory_probs, local_probs)


def _chunk_output(s: _Setup, slots: _Slots, f: _Forward) -> Tensor:
    """[H, B, C, D] the chunk's output."""
    memory = (f.memory_probs * f.means) @ slots.value_bases
    if slots.value_bias is not None:
        memory = memory + f.memory_probs.sum(-1, keepdim=True) * slots.value_bias
    local = (f.local_probs @ s.windows(f.qkv[2])).flatten(-3, -2)
    return (memory + local) * (1.0 if s.joint else 0.5)


@dataclass
class _Gradients:
    """One chunk's gradients: q, k, v [3, H, B, C, D]; c [1, B, C, r]; the chunk's sums of the
    gradients of Kb, Vb [H, r, D], kb, vb [H, D] and the bias table [H, w, w]; and the sum over
    the chunk of the gradients reaching the running sum, [1, B, 1, r]."""

    qkv: Tensor
    coeffs: Tensor
    key_bases: Tensor
    value_bases: Tensor
    key_bias: Tensor
    value_bias: Tensor
    local_bias: Tensor
    sums: Tensor


def _chunk_backward(s: _Setup, slots: _Slots, f: _Forward, grad_out: Tensor, start: int,
                    carry: Tensor) -> _Gradients:
    """Gradients of one chunk. ``carry`` [1, B, 1, r]: the sum over all later queries of the
    gradients reaching the running sum (it flows into every coefficient here)."""
    grad = grad_out * (1.0 if s.joint else 0.5)  # [H, B, C, D]
    weighted = f.memory_probs * f.means  # [H, B, C, r]
    grad_weighted = grad @ slots.value_bases.transpose(-1, -2)  # [H, B, C, r]
    grad_memory_probs = grad_weighted * f.means
    if slots.value_bias is not None:
        grad_memory_probs = grad_memory_probs + grad @ slots.value_bias.transpose(-1, -2)
    grad_windows = s.windows(grad)
    q, k, v = (s.windows(x) for x in f.qkv)
    grad_local_probs = grad_windows @ v.transpose(-1, -2)  # [H, B, N, w, w]
    memory_dot = (f.memory_probs * grad_memory_probs).sum(-1, keepdim=True)  # [H, B, C, 1]
    local_dot = (f.local_probs * grad_local_probs).sum(-1, keepdim=True)  # [H, B, N, w, 1]
    if s.joint:  # one softmax over both sets of logits: one shared correction term
        memory_dot = memory_dot + local_dot.flatten(-3, -2)
        local_dot = s.windows(memory_dot)
    grad_logits = f.memory_probs * (grad_memory_probs - memory_dot) * s.scale  # [H, B, C, r]
    grad_scores = f.local_probs * (grad_local_probs - local_dot) * s.scale  # [H, B, N, w, w]
    grad_query_coeffs = grad_logits * f.means
    grad_means = (grad_logits * f.query_coeffs + grad_weighted * f.memory_probs).sum(
        0, keepdim=True) / s.counts(start, grad.device)  # [1, B, C, r], the heads share H_t
    sums = grad_means.sum(-2, keepdim=True)
    # Coefficient s enters every running sum at t >= s: this chunk's (a reverse cumsum) and the
    # later chunks' (the carry).
    grad_coeffs = sums - torch.cumsum(grad_means, dim=-2) + grad_means + carry
    grad_key_logit = grad_logits.sum(-1, keepdim=True)  # [H, B, C, 1] d/d(q . kb_h)
    grad_qkv = torch.empty_like(f.qkv)
    grad_qkv[0] = grad_query_coeffs @ s.bases + (grad_scores @ k).flatten(-3, -2)
    if slots.key_bias is not None:
        grad_qkv[0] += grad_key_logit * slots.key_bias.transpose(-1, -2)
    grad_qkv[1] = (grad_scores.transpose(-1, -2) @ q).flatten(-3, -2)
    grad_qkv[2] = (f.local_probs.transpose(-1, -2) @ grad_windows).flatten(-3, -2)
    return _Gradients(
        grad_qkv, grad_coeffs,
        key_bases=(grad_query_coeffs.transpose(-1, -2) @ f.qkv[0]).sum(1),
        value_bases=(weighted.transpose(-1, -2) @ grad).sum(1),
        key_bias=(grad_key_logit * f.qkv[0]).sum((1, 2)),
        value_bias=(f.memory_probs.sum(-1, keepdim=True) * grad).sum((1, 2)),
        local_bias=grad_scores.sum((1, 2)) / s.scale, sums=sums)


def _slots(s: _Setup, value_bases: Tensor, key_bias: Tensor | None,
           value_bias: Tensor | None) -> _Slots:
    return _Slots(value_bases.to(s.acc)[:, None],
                  None if key_bias is None else key_bias.to(s.acc)[:, None, :, None],
                  None if value_bias is None else value_bias.to(s.acc)[:, None, None, :])


class _ChunkedInputLAVO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, coeffs: Tensor,  # type: ignore[override]
                key_bases: Tensor, value_bases: Tensor, key_bias: Tensor | None,
                value_bias: Tensor | None, position_bias: Tensor | None, w: int, joint: bool,
                chunk: int) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            s = _setup(q, key_bases, position_bias, w, joint, chunk)
            slots = _slots(s, value_bases, key_bias, value_bias)
            out = torch.empty_like(q)
            state = torch.zeros(1, s.batch, 1, coeffs.shape[-1], device=q.device, dtype=s.acc)
            starts = range(0, s.length, s.chunk)
            states = state.new_empty(len(starts), *state.shape)
            for index, start in enumerate(starts):
                states[index] = state
                chunk_coeffs = _load_coeffs(s, coeffs, start)
                f = _chunk_forward(s, slots, s.load((q, k, v), start), chunk_coeffs, state, start)
                s.store(out, _chunk_output(s, slots, f), start)
                state = state + chunk_coeffs.sum(-2, keepdim=True)
        ctx.save_for_backward(q, k, v, coeffs, key_bases, value_bases, key_bias, value_bias,
                              position_bias, states)
        ctx.settings = (w, joint, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, coeffs, key_bases, value_bases, key_bias, value_bias, position_bias, states = (
            ctx.saved_tensors)
        w, joint, chunk = ctx.settings
        with torch.autocast(q.device.type, enabled=False):
            s = _setup(q, key_bases, position_bias, w, joint, chunk)
            slots = _slots(s, value_bases, key_bias, value_bias)
            grads = [torch.empty_like(x) for x in (q, k, v)]
            grad_coeffs = torch.empty_like(coeffs)
            totals: dict[str, Tensor] = {}
            carry = torch.zeros_like(states[0])
            starts = range(0, s.length, s.chunk)
            for index in reversed(range(len(starts))):
                start = starts[index]
                f = _chunk_forward(s, slots, s.load((q, k, v), start),
                                   _load_coeffs(s, coeffs, start), states[index], start)
                g = _chunk_backward(s, slots, f, s.load((grad_out,), start)[0], start, carry)
                for target, part in zip(grads, g.qkv, strict=True):
                    s.store(target, part, start)
                stop = min(start + s.chunk, s.length)
                grad_coeffs[:, start:stop] = g.coeffs[0, :, : stop - start]
                for name in ("key_bases", "value_bases", "key_bias", "value_bias", "local_bias"):
                    totals[name] = totals.get(name, 0) + getattr(g, name)
                carry = carry + g.sums
        return (*grads, grad_coeffs, totals["key_bases"].to(key_bases.dtype),
                totals["value_bases"].to(value_bases.dtype),
                None if key_bias is None else totals["key_bias"].to(key_bias.dtype),
                None if value_bias is None else totals["value_bias"].to(value_bias.dtype),
                _position_gradient(totals["local_bias"], position_bias, w), None, None, None)


def _position_gradient(local: Tensor, position_bias: Tensor | None, w: int) -> Tensor | None:
    """The gradient of P [H, 2w - 1] from that of the [H, w, w] table it fills."""
    if position_bias is None:
        return None
    index = _relative_index(w, local.device).flatten()
    grad = local.new_zeros(local.shape[0], 2 * w - 1)
    grad.index_add_(1, index, local.flatten(1))
    return grad.to(position_bias.dtype)


def lavo_input_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    coeffs: Tensor,
    key_bases: Tensor,
    value_bases: Tensor,
    key_bias: Tensor | None,
    value_bias: Tensor | None,
    position_bias: Tensor | None,
    w: int,
    joint: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """LAVO causal self-attention with the memory of the layer input, chunk by chunk.

    Args:
        q, k, v: [B, L, H, D].
        coeffs: [B, L, r] the coefficients c_s = B x_s of the layer input.
        key_bases, value_bases: [H, r, D] the projected bases (W_k b_j, W_v b_j split in heads).
        key_bias, value_bias: [H, D] the key and value projections' biases, or None.
        position_bias: [H, 2w-1] relative bias of the local scores, or None.
        w: window size.
        joint: one softmax over memory and local logits (else the average of the two reads).
        chunk: tokens per chunk, rounded down to a multiple of ``w`` (at least ``w``).

    Returns:
        [B, L, H, D] in q's dtype (computed in float32 for half inputs); differentiable in
        every tensor argument.
    """
    if q.shape[1] == 0:
        return q.clone()
    return _ChunkedInputLAVO.apply(q, k, v, coeffs, key_bases, value_bases, key_bias,
                                   value_bias, position_bias, w, joint, chunk)
