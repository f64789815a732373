"""LAVO self-attention in Triton: forward and backward kernels and their autograd Function.

One program handles one chunk of ``CT`` tokens (a whole number of windows, ``CT = W * (BLOCK_C //
W)``, 32 by default) of one (batch, head). It reads q, k, v of its chunk once and computes, in fp32:

- the key and value coefficients ``c = x B^T`` and their running sums by a chunked scan: the sum
  over earlier chunks comes in as a per-chunk state (``[B*H, NC, 2, r]``, an exclusive cumsum
  of the chunk sums), the sum inside the chunk is ``tl.cumsum``; the non-causal pattern takes the total;
- the r-slot global read ``(alpha * H^v) B`` with ``alpha = softmax(H^k * (q B^T) / sqrt(d))``;
- the w-window local attention with its relative bias ``P[t - s + w - 1]``;
- the combination: the average of both reads, or one joint softmax over both sets of logits.

The per-chunk sums of k and v that seed the scan are one PyTorch reduction (a second read of k
and v); the output is written once.

The backward pass recomputes the chunk (of the forward's work only the [B*H, NC, 2, r] chunk
states are saved). It runs
the same kernel twice: pass 0 stores, per chunk, the sums of the gradients reaching the running
sums; a reverse exclusive cumsum over chunks (or the total, non-causal) turns them into the
gradient flowing in from later queries; pass 1 writes dq, dk, dv and per-chunk partial sums of
the position-bias gradient.

Supported: self-attention (causal and non-causal), fixed bases (no gradient for B), no key
padding mask, fp32/fp16/bf16 inputs. ``LAVOAttention`` falls back to the PyTorch path otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_NUM_WARPS = 8  # with 32-token chunks, no register spills on sm_90 in bf16 (ptxas, Triton 3.9)
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": fully masked rows (padding only) stay NaN-free


@triton.jit
def _chunk(
    Q, K, V, Bs, P, State,
    pid_c, pid_bh, L, H, D, R, NC, scale,
    stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Recompute one chunk: everything forward and backward share, all fp32."""
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B * L * H * D may pass 2**31
    h = pid_bh % H
    rows = tl.arange(0, BLOCK_C)  # position inside the chunk
    t = pid_c.to(tl.int64) * CT + rows  # [C] absolute position
    row_ok = (rows < CT) & (t < L)
    dd = tl.arange(0, BLOCK_D)
    jj = tl.arange(0, BLOCK_R)
    offs = b * stride_b + h * stride_h + t[:, None] * stride_l + dd[None, :]  # [C, D]
    io_mask = row_ok[:, None] & (dd[None, :] < D)
    q = tl.load(Q + offs, mask=io_mask, other=0.0).to(tl.float32)  # [C, D]
    k = tl.load(K + offs, mask=io_mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=io_mask, other=0.0).to(tl.float32)
    basis = tl.load(
        Bs + h * R * D + jj[:, None] * D + dd[None, :],
        mask=(jj[:, None] < R) & (dd[None, :] < D), other=0.0,
    ).to(tl.float32)  # [R, D]
    qc = tl.dot(q, tl.trans(basis), input_precision=PRECISION)  # [C, R]
    state = State + (pid_bh * NC + pid_c) * 2 * R
    key_state = tl.load(state + jj, mask=jj < R, other=0.0)  # [R]
    value_state = tl.load(state + R + jj, mask=jj < R, other=0.0)
    if CAUSAL:
        kc = tl.dot(k, tl.trans(basis), input_precision=PRECISION)  # [C, R]
        vc = tl.dot(v, tl.trans(basis), input_precision=PRECISION)
        key_sum = key_state[None, :] + tl.cumsum(kc, axis=0)  # running sums, [C, R]
        value_sum = value_state[None, :] + tl.cumsum(vc, axis=0)
        count = (t + 1).to(tl.float32)
    else:
        key_sum = key_state[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        value_sum = value_state[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        count = tl.zeros((BLOCK_C,), tl.float32) + L
    key_mean = key_sum / count[:, None]  # H^k_t, [C, R]
    value_mean = value_sum / count[:, None]
    memory_logits = tl.where(jj[None, :] < R, qc * key_mean * scale, _NEG)  # [C, R]

    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [C, C]
    same_window = (rows[:, None] // W) == (rows[None, :] // W)
    allowed = same_window & (rows[None, :] < CT) & (t[None, :] < L)
    if CAUSAL:
        allowed = allowed & (rows[None, :] <= rows[:, None])
    offset = rows[:, None] - rows[None, :] + W - 1  # index into P, [C, C]
    if HAS_BIAS:
        scores += tl.load(P + h * (2 * W - 1) + offset, mask=allowed, other=0.0).to(tl.float32)
    scores = tl.where(allowed, scores, _NEG)

    memory_max = tl.max(memory_logits, axis=1)
    local_max = tl.max(scores, axis=1)
    if JOINT:
        top = tl.maximum(memory_max, local_max)
        memory_exp = tl.exp(memory_logits - top[:, None])
        local_exp = tl.exp(scores - top[:, None])
        total = tl.sum(memory_exp, axis=1) + tl.sum(local_exp, axis=1)
        alpha = memory_exp / total[:, None]
        probs = local_exp / total[:, None]
    else:
        memory_exp = tl.exp(memory_logits - memory_max[:, None])
        alpha = memory_exp / tl.sum(memory_exp, axis=1)[:, None]
        local_exp = tl.exp(scores - local_max[:, None])
        probs = local_exp / tl.sum(local_exp, axis=1)[:, None]
    return (offs, io_mask, q, k, v, basis, qc, key_mean, value_mean, count, alpha, probs,
            allowed, offset)


@triton.jit
def _lavo_forward(
    Q, K, V, Bs, P, State, Out,
    L, H, D, R, NC, scale, stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    (offs, io_mask, _q, _k, v, basis, _qc, _key_mean, value_mean, _count, alpha, probs, _allowed,
     _offset) = _chunk(
        Q, K, V, Bs, P, State, pid_c, pid_bh, L, H, D, R, NC, scale,
        stride_b, stride_l, stride_h, W, CT, BLOCK_C, BLOCK_D, BLOCK_R, CAUSAL, JOINT, HAS_BIAS,
        PRECISION,
    )
    memory = tl.dot(alpha * value_mean, basis, input_precision=PRECISION)  # [C, D]
    local = tl.dot(probs, v, input_precision=PRECISION)
    out = memory + local
    if not JOINT:
        out = out * 0.5
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=io_mask)


@triton.jit
def _lavo_backward(
    Q, K, V, Bs, P, State, DO, Flow, DQ, DK, DV, DP,
    L, H, D, R, NC, scale, stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, PASS: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    (offs, io_mask, q, k, v, basis, qc, key_mean, value_mean, count, alpha, probs, allowed,
     offset) = _chunk(
        Q, K, V, Bs, P, State, pid_c, pid_bh, L, H, D, R, NC, scale,
        stride_b, stride_l, stride_h, W, CT, BLOCK_C, BLOCK_D, BLOCK_R, CAUSAL, JOINT, HAS_BIAS,
        PRECISION,
    )
    jj = tl.arange(0, BLOCK_R)
    grad_out = tl.load(DO + offs, mask=io_mask, other=0.0).to(tl.float32)  # [C, D]
    if not JOINT:
        grad_out = grad_out * 0.5
    grad_read = tl.dot(grad_out, tl.trans(basis), input_precision=PRECISION)  # d(alpha*H^v), [C, R]
    grad_alpha = grad_read * value_mean
    grad_value_mean = grad_read * alpha
    grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)  # [C, C]
    memory_dot = tl.sum(alpha * grad_alpha, axis=1)
    local_dot = tl.sum(probs * grad_probs, axis=1)
    if JOINT:
        memory_dot = memory_dot + local_dot
        local_dot = memory_dot
    grad_logits = alpha * (grad_alpha - memory_dot[:, None])  # [C, R]
    grad_scores = probs * (grad_probs - local_dot[:, None])  # [C, C]
    grad_key_sum = grad_logits * qc * scale / count[:, None]  # d/d(running key sum), [C, R]
    grad_value_sum = grad_value_mean / count[:, None]
    flow = Flow + (pid_bh * NC + pid_c) * 2 * R
    if PASS == 0:
        tl.store(flow + jj, tl.sum(grad_key_sum, axis=0), mask=jj < R)
        tl.store(flow + R + jj, tl.sum(grad_value_sum, axis=0), mask=jj < R)
    else:
        key_flow = tl.load(flow + jj, mask=jj < R, other=0.0)  # from later chunks, [R]
        value_flow = tl.load(flow + R + jj, mask=jj < R, other=0.0)
        if CAUSAL:
            grad_kc = key_flow[None, :] + tl.cumsum(grad_key_sum, axis=0, reverse=True)
            grad_vc = value_flow[None, :] + tl.cumsum(grad_value_sum, axis=0, reverse=True)
        else:
            grad_kc = key_flow[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
            grad_vc = value_flow[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        grad_qc = grad_logits * key_mean * scale
        dq = tl.dot(grad_qc, basis, input_precision=PRECISION)
        dq += tl.dot(grad_scores, k, input_precision=PRECISION) * scale
        dk = tl.dot(grad_kc, basis, input_precision=PRECISION)
        dk += tl.dot(tl.trans(grad_scores), q, input_precision=PRECISION) * scale
        dv = tl.dot(grad_vc, basis, input_precision=PRECISION)
        dv += tl.dot(tl.trans(probs), grad_out, input_precision=PRECISION)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=io_mask)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=io_mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=io_mask)
        if HAS_BIAS:
            grad_bias = DP + (pid_bh * NC + pid_c) * (2 * W - 1)
            masked = tl.where(allowed, grad_scores, 0.0)
            for o in range(2 * W - 1):
                tl.store(grad_bias + o, tl.sum(tl.sum(tl.where(offset == o, masked, 0.0), 1), 0))


def _blocks(w: int, dim: int, r: int, block: int) -> tuple[int, int, int, int]:
    """(CT, BLOCK_C, BLOCK_D, BLOCK_R): tokens per chunk and the power-of-two tile sizes."""
    block_c = max(triton.next_power_of_2(w), triton.next_power_of_2(block), 16)
    return (w * (block_c // w), block_c, max(16, triton.next_power_of_2(dim)),
            max(16, triton.next_power_of_2(r)))


def _chunk_states(k: Tensor, v: Tensor, bases: Tensor, ct: int, causal: bool) -> Tensor:
    """[B*H, NC, 2, r] fp32: sums of B k_s and B v_s over earlier chunks (causal) or all (not)."""
    batch, length, heads, dim = k.shape
    full = length // ct  # complete chunks; a partial last one is summed on its own (no copy)
    sums = []
    for x in (k, v):
        parts = [x[:, : full * ct].view(batch, full, ct, heads, dim).sum(2, dtype=torch.float32)]
        if full * ct < length:
            parts.append(x[:, full * ct :].sum(1, keepdim=True, dtype=torch.float32))
        chunk_sums = torch.cat(parts, dim=1)  # [B, NC, H, D]
        sums.append(torch.einsum("bnhd,hrd->bhnr", chunk_sums, bases))  # [B, H, NC, r]
    sums_t = torch.stack(sums, dim=3)  # [B, H, NC, 2, r]
    if causal:
        sums_t = torch.cat([torch.zeros_like(sums_t[:, :, :1]), _exclusive(sums_t)], dim=2)
    else:
        sums_t = sums_t.sum(2, keepdim=True).expand_as(sums_t)
    return sums_t.reshape(batch * heads, sums_t.shape[2], 2, -1).contiguous()


def _exclusive(sums: Tensor) -> Tensor:
    """Inclusive prefix sums of the chunks but the last along dim 2 (exact, no subtraction)."""
    return torch.cumsum(sums, dim=2)[:, :, :-1]


class _LAVOFunction(torch.autograd.Function):
    """Autograd bridge: the Triton forward kernel and the two-pass Triton backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        bases: Tensor,
        w: int,
        causal: bool,
        joint: bool,
        block: int,
    ) -> Tensor:
        q, k, v = (x.contiguous() for x in (q, k, v))
        batch, length, heads, dim = q.shape
        r = bases.shape[1]
        ct, block_c, block_d, block_r = _blocks(w, dim, r, block)
        bases32 = bases.detach().to(torch.float32).contiguous()  # [H, r, D]
        states = _chunk_states(k, v, bases32, ct, causal)  # [B*H, NC, 2, r]
        chunks = states.shape[1]
        has_bias = bias is not None
        bias_arg = bias.detach().contiguous() if has_bias else bases32
        out = torch.empty_like(q)
        meta = dict(W=w, CT=ct, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_R=block_r,
                    CAUSAL=causal, JOINT=joint, HAS_BIAS=has_bias,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        grid = (chunks, batch * heads)
        scale = 1.0 / math.sqrt(dim)
        _lavo_forward[grid](q, k, v, bases32, bias_arg, states, out, length, heads, dim, r, chunks,
                            scale, q.stride(0), q.stride(1), q.stride(2), num_warps=_NUM_WARPS,
                            **meta)
        ctx.save_for_backward(q, k, v, bases32, bias_arg, states)
        ctx.meta = meta
        ctx.has_bias = has_bias
        ctx.bias_dtype = bias.dtype if has_bias else None
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, bases32, bias_arg, states = ctx.saved_tensors
        meta = ctx.meta
        batch, length, heads, dim = q.shape
        r = bases32.shape[1]
        chunks = states.shape[1]
        grad_out = grad_out.contiguous()
        scale = 1.0 / math.sqrt(dim)
        grid = (chunks, batch * heads)
        common = (length, heads, dim, r, chunks, scale, q.stride(0), q.stride(1), q.stride(2))
        chunk_flow = torch.empty_like(states)  # [B*H, NC, 2, r]
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        w = meta["W"]
        grad_bias = torch.zeros(batch * heads, chunks, 2 * w - 1, dtype=torch.float32,
                                device=q.device)
        _lavo_backward[grid](q, k, v, bases32, bias_arg, states, grad_out, chunk_flow,
                             dq, dk, dv, grad_bias, *common, PASS=0, num_warps=_NUM_WARPS,
                             **meta)
        if meta["CAUSAL"]:  # gradient from queries of later chunks: reverse exclusive cumsum
            later = chunk_flow.flip(1).cumsum(1).flip(1)
            flow = torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1)
        else:
            flow = chunk_flow.sum(1, keepdim=True).expand_as(chunk_flow)
        flow = flow.contiguous()
        _lavo_backward[grid](q, k, v, bases32, bias_arg, states, grad_out, flow,
                             dq, dk, dv, grad_bias, *common, PASS=1, num_warps=_NUM_WARPS,
                             **meta)
        d_bias = None
        if ctx.has_bias:
            d_bias = grad_bias.view(batch, heads, chunks, -1).sum((0, 2)).to(ctx.bias_dtype)
        return dq, dk, dv, d_bias, None, None, None, None, None


def lavo_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bases: Tensor,
    position_bias: Tensor | None,
    w: int,
    causal: bool,
    joint: bool,
    block: int = 32,
) -> Tensor:
    """LAVO self-attention by the Triton kernels (differentiable in q, k, v and the bias).

    Args:
        q, k, v: [B, L, H, D] fp32, fp16 or bf16, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        bases: [H, r, D] orthonormal rows; treated as a constant (no gradient).
        position_bias: [H, 2w-1] relative bias of the local scores, or None.
        w: window size.
        causal: running memory and causal windows; else the whole-sequence memory.
        joint: one softmax over memory and local logits; else the average of both reads.
        block: tokens per program, rounded to a power of two and down to whole windows.

    Returns:
        [B, L, H, D] in the dtype of q.
    """
    return _LAVOFunction.apply(q, k, v, position_bias, bases, w, causal, joint, block)
