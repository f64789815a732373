"""The scan that carries a matrix state from chunk to chunk, shared by the chunked forms.

S_{n+1} = decay_n S_n + writes_n over the N chunks of a sequence, with its gradient by the
reverse scan. As one autograd node it stores only the states it returns (which the read of the
next chunk needs anyway) and adds no per-chunk graph: a Python loop under autograd would save
every state a second time, build several nodes per chunk, and, where it indexed the chunks,
allocate a full-size zero gradient per chunk (quadratic in the length).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def carried_states(decay: Tensor, writes: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The state before each chunk, S_{n+1} = decay_n S_n + writes_n, from S_0 = ``state``.

    decay: [B, H, N, K or 1, V or 1]; writes: [B, H, N, K, V]; state: [B, H, K, V]. Returns
    ``(starts [B, H, N, K, V], final [B, H, K, V])``. One autograd node for the whole scan
    (:class:`_CarriedStates`): it keeps only the states it returns and runs the backward as
    the reverse scan, instead of a graph of 3 nodes and a saved state per chunk.
    """
    return _CarriedStates.apply(decay, writes, state)


class _CarriedStates(torch.autograd.Function):
    """The chunk-state scan of :func:`carried_states` with its reverse-scan backward."""

    @staticmethod
    def forward(ctx: Any, decay: Tensor, writes: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        starts = writes.new_empty(writes.shape)
        for n in range(writes.shape[2]):
            starts[:, :, n] = state
            state = torch.addcmul(writes[:, :, n], decay[:, :, n], state)
        ctx.save_for_backward(decay, starts)
        ctx.state_shape = state.shape
        return starts, state

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, d_starts: Tensor | None, d_final: Tensor | None
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """dL/dS_n = d_starts_n + decay_n dL/dS_{n+1}; dL/dwrites_n = dL/dS_{n+1};
        dL/ddecay_n = sum over the broadcast dimensions of dL/dS_{n+1} S_n."""
        decay, starts = ctx.saved_tensors
        grad = starts.new_zeros(ctx.state_shape) if d_final is None else d_final.clone()
        d_writes = torch.empty_like(starts)
        d_decay = torch.empty_like(decay) if ctx.needs_input_grad[0] else None
        broadcast = [dim for dim in (-2, -1) if decay.shape[dim] == 1 < starts.shape[dim]]
        for n in reversed(range(starts.shape[2])):
            d_writes[:, :, n] = grad
            if d_decay is not None:
                product = grad * starts[:, :, n]
                d_decay[:, :, n] = product.sum(broadcast, keepdim=True) if broadcast else product
            grad = grad * decay[:, :, n]
            if d_starts is not None:
                grad = grad + d_starts[:, :, n]
        return d_decay, d_writes, grad
