"""LAVO self-attention with ``memory="input"`` (the paper's single memory) in Triton: forward and
backward kernels and their autograd Function.

The layout follows ``triton_kernels.py`` (``memory="kv"``): one program per chunk of ``CT``
tokens (whole windows) of one (batch, head), everything in fp32. What differs is the memory:

- the coefficients c_s = B x_s of the layer input ([B, L, r], one stream shared by the heads)
  come in precomputed, and their running sums by a chunked scan: the sum over earlier chunks is a
  per-(batch, chunk) state ``[B, NC, r]``, the sum inside the chunk ``tl.cumsum``; non-causal
  attention takes the total;
- slot j's key in head h is ``H_tj Kb_hj + kb_h`` and its value ``H_tj Vb_hj + vb_h``, with Kb, Vb
  [H, r, D] the projected bases (W_k b_j, W_v b_j) and kb, vb the projections' biases:
  ``logit_tj = (H_tj (q_t . Kb_hj) + q_t . kb_h) / sqrt(D)``, read ``(alpha (.) H) Vb + (sum alpha) vb``;
- the local read (windows of w, relative bias) and the combination are those of the kv kernels.

The backward pass recomputes each chunk and runs twice: pass 0 stores per (batch*head, chunk) the
sums of the gradients reaching the running sums; a reverse exclusive cumsum over chunks (the
total, non-causal) gives what flows in from later queries; pass 1 writes dq, dk, dv, each head's
gradient of the coefficients, and per token what the parameter gradients need (the gradient of
q . Kb, alpha (.) H, and the two bias terms), which PyTorch contracts with q and the output's
gradient, and sums over the heads. Those are [B, H, L, r] tensors: O(L H r) of working memory in
the backward pass (the forward saves only [B, NC, r] states).

Supported: self-attention (causal and non-causal), no key padding mask, fp32/fp16/bf16 inputs;
gradients for q, k, v, the coefficients, the projected bases and biases, and the position bias.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from attention_zoo.mechanisms.lavo.triton_kernels import _NEG, _NUM_WARPS, _blocks


@triton.jit
def _chunk_input(
    Q, K, V, C, KB, VB, KBias, VBias, P, State,
    pid_c, pid_bh, L, H, D, R, NC, scale,
    stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_VBIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one chunk: everything forward and backward share, all fp32."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = tl.arange(0, BLOCK_C)
    t = pid_c.to(tl.int64) * CT + rows  # [C] absolute position
    row_ok = (rows < CT) & (t < L)
    dd = tl.arange(0, BLOCK_D)
    jj = tl.arange(0, BLOCK_R)
    offs = b * stride_b + h * stride_h + t[:, None] * stride_l + dd[None, :]  # [C, D]
    io_mask = row_ok[:, None] & (dd[None, :] < D)
    q = tl.load(Q + offs, mask=io_mask, other=0.0).to(tl.float32)
    k = tl.load(K + offs, mask=io_mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=io_mask, other=0.0).to(tl.float32)
    r_mask = jj < R
    coeff_offs = b * L * R + t[:, None] * R + jj[None, :]  # [C, R] into C [B, L, R]
    coeff_mask = row_ok[:, None] & r_mask[None, :]
    bases_offs = h * R * D + jj[:, None] * D + dd[None, :]
    bases_mask = r_mask[:, None] & (dd[None, :] < D)
    key_bases = tl.load(KB + bases_offs, mask=bases_mask, other=0.0)  # [R, D]
    value_bases = tl.load(VB + bases_offs, mask=bases_mask, other=0.0)
    qc = tl.dot(q, tl.trans(key_bases), input_precision=PRECISION)  # [C, R] q_t . Kb_hj
    state = tl.load(State + (b * NC + pid_c) * R + jj, mask=r_mask, other=0.0)  # [R]
    if CAUSAL:
        coeffs = tl.load(C + coeff_offs, mask=coeff_mask, other=0.0)  # [C, R]
        running = state[None, :] + tl.cumsum(coeffs, axis=0)
        count = (t + 1).to(tl.float32)
    else:
        running = state[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        count = tl.zeros((BLOCK_C,), tl.float32) + L
    mean = running / count[:, None]  # H_t, [C, R]
    memory_logits = qc * mean
    if HAS_KBIAS:
        key_bias = tl.load(KBias + h * D + dd, mask=dd < D, other=0.0)  # [D]
        memory_logits += tl.sum(q * key_bias[None, :], axis=1)[:, None]
    memory_logits = tl.where(r_mask[None, :], memory_logits * scale, _NEG)

    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [C, C]
    same_window = (rows[:, None] // W) == (rows[None, :] // W)
    allowed = same_window & (rows[None, :] < CT) & (t[None, :] < L)
    if CAUSAL:
        allowed = allowed & (rows[None, :] <= rows[:, None])
    offset = rows[:, None] - rows[None, :] + W - 1
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
    return (offs, io_mask, coeff_offs, coeff_mask, q, k, v, key_bases, value_bases, qc, mean,
            count, alpha, probs, allowed, offset)


@triton.jit
def _lavo_input_forward(
    Q, K, V, C, KB, VB, KBias, VBias, P, State, Out,
    L, H, D, R, NC, scale, stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_VBIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    (offs, io_mask, _co, _cm, _q, _k, v, _kb, value_bases, _qc, mean, _count, alpha, probs,
     _allowed, _offset) = _chunk_input(
        Q, K, V, C, KB, VB, KBias, VBias, P, State, pid_c, pid_bh, L, H, D, R, NC, scale,
        stride_b, stride_l, stride_h, W, CT, BLOCK_C, BLOCK_D, BLOCK_R, CAUSAL, JOINT, HAS_BIAS,
        HAS_KBIAS, HAS_VBIAS, PRECISION,
    )
    out = tl.dot(alpha * mean, value_bases, input_precision=PRECISION)  # [C, D]
    if HAS_VBIAS:
        dd = tl.arange(0, BLOCK_D)
        value_bias = tl.load(VBias + (pid_bh % H) * D + dd, mask=dd < D, other=0.0)
        out += tl.sum(alpha, axis=1)[:, None] * value_bias[None, :]
    out += tl.dot(probs, v, input_precision=PRECISION)
    if not JOINT:
        out = out * 0.5
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=io_mask)


@triton.jit
def _lavo_input_backward(
    Q, K, V, C, KB, VB, KBias, VBias, P, State, DO, Flow, DQ, DK, DV, DC, GQC, AM, GQB, AS, DP,
    L, H, D, R, NC, scale, stride_b, stride_l, stride_h,
    W: tl.constexpr, CT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, CAUSAL: tl.constexpr, JOINT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KBIAS: tl.constexpr, HAS_VBIAS: tl.constexpr, PRECISION: tl.constexpr,
    PASS: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    (offs, io_mask, _co, coeff_mask, q, k, v, key_bases, value_bases, qc, mean, count, alpha,
     probs, allowed, offset) = _chunk_input(
        Q, K, V, C, KB, VB, KBias, VBias, P, State, pid_c, pid_bh, L, H, D, R, NC, scale,
        stride_b, stride_l, stride_h, W, CT, BLOCK_C, BLOCK_D, BLOCK_R, CAUSAL, JOINT, HAS_BIAS,
        HAS_KBIAS, HAS_VBIAS, PRECISION,
    )
    h = pid_bh % H
    dd = tl.arange(0, BLOCK_D)
    jj = tl.arange(0, BLOCK_R)
    grad_out = tl.load(DO + offs, mask=io_mask, other=0.0).to(tl.float32)  # [C, D]
    if not JOINT:
        grad_out = grad_out * 0.5
    grad_read = tl.dot(grad_out, tl.trans(value_bases), input_precision=PRECISION)  # [C, R]
    grad_alpha = grad_read * mean
    if HAS_VBIAS:
        value_bias = tl.load(VBias + h * D + dd, mask=dd < D, other=0.0)
        grad_alpha += tl.sum(grad_out * value_bias[None, :], axis=1)[:, None]
    grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)  # [C, C]
    memory_dot = tl.sum(alpha * grad_alpha, axis=1)
    local_dot = tl.sum(probs * grad_probs, axis=1)
    if JOINT:
        memory_dot = memory_dot + local_dot
        local_dot = memory_dot
    grad_logits = alpha * (grad_alpha - memory_dot[:, None]) * scale  # [C, R]
    grad_scores = probs * (grad_probs - local_dot[:, None])  # [C, C]
    grad_sum = (grad_logits * qc + grad_read * alpha) / count[:, None]  # d/d(running sum)
    flow = Flow + (pid_bh * NC + pid_c) * R
    if PASS == 0:
        tl.store(flow + jj, tl.sum(grad_sum, axis=0), mask=jj < R)
    else:
        later = tl.load(flow + jj, mask=jj < R, other=0.0)  # from later chunks, [R]
        if CAUSAL:
            grad_coeffs = later[None, :] + tl.cumsum(grad_sum, axis=0, reverse=True)
        else:
            grad_coeffs = later[None, :] + tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        grad_qc = grad_logits * mean
        dq = tl.dot(grad_qc, key_bases, input_precision=PRECISION)
        dq += tl.dot(grad_scores, k, input_precision=PRECISION) * scale
        grad_key_logit = tl.sum(grad_logits, axis=1)  # [C] d/d(q . kb_h)
        if HAS_KBIAS:
            key_bias = tl.load(KBias + h * D + dd, mask=dd < D, other=0.0)
            dq += grad_key_logit[:, None] * key_bias[None, :]
        dk = tl.dot(tl.trans(grad_scores), q, input_precision=PRECISION) * scale
        dv = tl.dot(tl.trans(probs), grad_out, input_precision=PRECISION)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=io_mask)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=io_mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=io_mask)
        rows = tl.arange(0, BLOCK_C)
        t = pid_c.to(tl.int64) * CT + rows
        row_ok = (rows < CT) & (t < L)
        per_head = pid_bh.to(tl.int64) * L * R + t[:, None] * R + jj[None, :]  # [B*H, L, R]
        tl.store(DC + per_head, grad_coeffs, mask=coeff_mask)
        tl.store(GQC + per_head, grad_qc, mask=coeff_mask)
        tl.store(AM + per_head, alpha * mean, mask=coeff_mask)
        tl.store(GQB + pid_bh.to(tl.int64) * L + t, grad_key_logit, mask=row_ok)
        tl.store(AS + pid_bh.to(tl.int64) * L + t, tl.sum(alpha, axis=1), mask=row_ok)
        if HAS_BIAS:
            grad_bias = DP + (pid_bh * NC + pid_c) * (2 * W - 1)
            masked = tl.where(allowed, grad_scores, 0.0)
            for o in range(2 * W - 1):
                tl.store(grad_bias + o, tl.sum(tl.sum(tl.where(offset == o, masked, 0.0), 1), 0))


def _states(coeffs: Tensor, ct: int, causal: bool) -> Tensor:
    """[B, NC, r] fp32: sums of c over earlier chunks (causal) or over all positions (not)."""
    batch, length, r = coeffs.shape
    chunks = triton.cdiv(length, ct)
    padded = coeffs.new_zeros(batch, chunks * ct, r, dtype=torch.float32)
    padded[:, :length] = coeffs
    sums = padded.view(batch, chunks, ct, r).sum(2)
    if causal:
        return torch.cat([torch.zeros_like(sums[:, :1]), torch.cumsum(sums, 1)[:, :-1]], 1).contiguous()
    return sums.sum(1, keepdim=True).expand_as(sums).contiguous()


def _flow(chunk_flow: Tensor, causal: bool) -> Tensor:
    """What reaches each chunk's running sums from the queries of other chunks: [B*H, NC, r]."""
    if causal:
        later = chunk_flow.flip(1).cumsum(1).flip(1)
        return torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1).contiguous()
    return chunk_flow.sum(1, keepdim=True).expand_as(chunk_flow).contiguous()


class _LAVOInputFunction(torch.autograd.Function):
    """Autograd bridge: the Triton forward kernel and the two-pass Triton backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, coeffs: Tensor,  # type: ignore[override]
                key_bases: Tensor, value_bases: Tensor, key_bias: Tensor | None,
                value_bias: Tensor | None, position_bias: Tensor | None, w: int, causal: bool,
                joint: bool, block: int) -> Tensor:
        q, k, v = (x.contiguous() for x in (q, k, v))
        batch, length, heads, dim = q.shape
        r = key_bases.shape[1]
        ct, block_c, block_d, block_r = _blocks(w, dim, r, block)
        fp32 = [None if x is None else x.detach().to(torch.float32).contiguous()
                for x in (coeffs, key_bases, value_bases, key_bias, value_bias)]
        dummy = fp32[1]
        states = _states(fp32[0], ct, causal)  # [B, NC, r]
        bias_arg = position_bias.detach().contiguous() if position_bias is not None else dummy
        tensors = (q, k, v, fp32[0], fp32[1], fp32[2], fp32[3] if key_bias is not None else dummy,
                   fp32[4] if value_bias is not None else dummy, bias_arg, states)
        meta = dict(W=w, CT=ct, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_R=block_r,
                    CAUSAL=causal, JOINT=joint, HAS_BIAS=position_bias is not None,
                    HAS_KBIAS=key_bias is not None, HAS_VBIAS=value_bias is not None,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        sizes = (length, heads, dim, r, states.shape[1], 1.0 / math.sqrt(dim),
                 q.stride(0), q.stride(1), q.stride(2))
        out = torch.empty_like(q)
        _lavo_input_forward[(states.shape[1], batch * heads)](*tensors, out, *sizes,
                                                              num_warps=_NUM_WARPS, **meta)
        ctx.save_for_backward(*tensors)
        ctx.meta, ctx.sizes = meta, sizes
        ctx.dtypes = [None if x is None else x.dtype for x in
                      (coeffs, key_bases, value_bases, key_bias, value_bias, position_bias)]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        tensors = ctx.saved_tensors
        q = tensors[0]
        batch, length, heads, _ = q.shape
        r, chunks, w = ctx.sizes[3], ctx.sizes[4], ctx.meta["W"]
        grad_out = grad_out.contiguous()
        float32 = dict(dtype=torch.float32, device=q.device)
        chunk_flow = torch.zeros(batch * heads, chunks, r, **float32)
        dq, dk, dv = (torch.empty_like(x) for x in tensors[:3])
        per_token = [torch.zeros(batch * heads, length, r, **float32) for _ in range(3)]
        per_scalar = [torch.zeros(batch * heads, length, **float32) for _ in range(2)]
        grad_bias = torch.zeros(batch * heads, chunks, 2 * w - 1, **float32)
        outputs = (dq, dk, dv, *per_token, *per_scalar, grad_bias)
        grid = (chunks, batch * heads)
        for index, flow in ((0, chunk_flow), (1, None)):
            flow = flow if flow is not None else _flow(chunk_flow, ctx.meta["CAUSAL"])
            _lavo_input_backward[grid](*tensors, grad_out, flow, *outputs, *ctx.sizes, PASS=index,
                                       num_warps=_NUM_WARPS, **ctx.meta)
        return (dq, dk, dv, *_parameter_gradients(ctx, q, grad_out, per_token, per_scalar,
                                                   grad_bias), None, None, None, None)


def _parameter_gradients(ctx, q: Tensor, grad_out: Tensor, per_token: list[Tensor],
                         per_scalar: list[Tensor], grad_bias: Tensor) -> list[Tensor | None]:
    """Gradients of the coefficients, Kb, Vb, kb, vb and P from the kernel's per-token parts
    ([B*H, L, r] and [B*H, L]), contracted with q and the (halved, when averaging) grad_out."""
    batch, length, heads, _ = q.shape
    grad_coeffs, grad_qc, weighted = (x.view(batch, heads, length, -1) for x in per_token)
    grad_key_logit, alpha_sum = (x.view(batch, heads, length) for x in per_scalar)
    grad = grad_out.float() * (1.0 if ctx.meta["JOINT"] else 0.5)
    query = q.float()
    grads = [grad_coeffs.sum(1), torch.einsum("bhlr,blhd->hrd", grad_qc, query),
             torch.einsum("bhlr,blhd->hrd", weighted, grad),
             torch.einsum("bhl,blhd->hd", grad_key_logit, query),
             torch.einsum("bhl,blhd->hd", alpha_sum, grad)]
    # The kernel summed each chunk's bias gradient per offset already: [B*H, NC, 2w - 1].
    grads.append(grad_bias.view(batch, heads, -1, grad_bias.shape[-1]).sum((0, 2))
                 if ctx.meta["HAS_BIAS"] else None)
    return [None if g is None or dtype is None else g.to(dtype)
            for g, dtype in zip(grads, ctx.dtypes, strict=True)]


def lavo_input_triton(
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
    causal: bool,
    joint: bool,
    block: int = 32,
) -> Tensor:
    """LAVO self-attention with the memory of the layer input, by the Triton kernels.

    Args:
        q, k, v: [B, L, H, D] fp32, fp16 or bf16, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        coeffs: [B, L, r] the coefficients c_s = B x_s of the layer input.
        key_bases, value_bases: [H, r, D] the projected bases (W_k b_j, W_v b_j in heads).
        key_bias, value_bias: [H, D] the projections' biases, or None.
        position_bias: [H, 2w-1] relative bias of the local scores, or None.
        w: window size.
        causal: running means and causal windows; else the whole-sequence memory.
        joint: one softmax over memory and local logits; else the average of both reads.
        block: tokens per program, rounded to a power of two and down to whole windows.

    Returns:
        [B, L, H, D] in the dtype of q; differentiable in every tensor argument.
    """
    return _LAVOInputFunction.apply(q, k, v, coeffs, key_bases, value_bases, key_bias, value_bias,
                                    position_bias, w, causal, joint, block)
