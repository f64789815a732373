"""LAVO: Linear Attention Via Orthogonal memory (Zhang et al., arXiv 2312.11135).

The project's definition is ``specs/lavo.md`` (copied into the docstring below): an orthogonal
memory of r slots for global context, context dissection into windows of w for local context,
a relative position bias inside the windows, and the two reads combined.

This is the plain PyTorch path. It keeps the causal global read factorised, so that it only
ever builds [B, L, H, r] tensors, never the [B, L, H, r, D] tensor of per-position memories.
The other backends (``backends.py``): causal self-attention chunk by chunk (``chunked.py``),
the plain path under ``torch.compile``, and the fused Triton kernels (``triton_kernels.py``);
``backend="auto"`` (the default) picks per device the fastest one verified there.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from attention_zoo.base import (
    Attention,
    AttentionConfigError,
    Complexity,
    LayerInput,
    Pattern,
    masked_softmax,
)
from attention_zoo.mechanisms.lavo import backends
from attention_zoo.mechanisms.lavo.chunked import lavo_causal_chunked
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class LAVOConfig:
    """Hyperparameters of LAVO (defaults from specs/lavo.md section 7)."""

    r: int | None = field(
        default=None,
        metadata={"help": "orthogonal memory slots, r <= head_dim (None: min(64, head_dim))",
                  "min": 1},
    )
    w: int = field(default=16, metadata={"help": "window size of the local attention", "min": 1})
    bases: Literal["fixed", "learned"] = field(
        default="fixed",
        metadata={"help": "fixed: QR of a Gaussian, a buffer; learned: kept orthogonal"},
    )
    position: Literal["relative", "none"] = field(
        default="relative", metadata={"help": "learned relative bias inside the window"}
    )
    combine: Literal["average", "joint"] = field(
        default="average",
        metadata={"help": "average of global and local reads, or one joint softmax"},
    )
    backend: Literal["auto", "torch", "chunked", "compile", "triton"] = field(
        default="auto",
        metadata={"help": "auto: per device the fastest backend verified there (backends.py); "
                          "torch: the plain path; chunked: causal self-attention chunk by chunk; "
                          "compile: the plain path under torch.compile; triton: fused kernels"},
    )


@dataclass
class LAVOState:
    """Decoding state of one LAVO layer: O(r + w D) numbers per head, whatever the context.

    Attributes:
        key_sum: [B, H, r] running sum of the key coefficients B k_s (fp32 or wider).
        value_sum: [B, H, r] running sum of the value coefficients.
        count: tokens seen so far (the position of the next token).
        window_keys: [B, j, H, D] keys of the current window before the next token, j < w.
        window_values: [B, j, H, D].
    """

    key_sum: Tensor
    value_sum: Tensor
    count: int
    window_keys: Tensor
    window_values: Tensor


def orthonormal_rows(heads: int, rows: int, dim: int) -> Tensor:
    """[heads, rows, dim] with orthonormal rows per head: QR of a Gaussian (rows <= dim)."""
    gaussian = torch.randn(heads, dim, rows)
    q, r = torch.linalg.qr(gaussian)  # q: [heads, dim, rows]
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # unique, Haar-uniform
    return q.transpose(1, 2).contiguous()


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can.

    They run on CUDA, and on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1``
    was set before ``triton_kernels`` was first imported (its kernels are decorated then).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels run on cuda (or on cpu with TRITON_INTERPRET=1), "
            f"not on {device.type}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Running sums over 64K+ tokens overflow or lose precision in half types (spec section 8).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Bases(nn.Module):
    """Holder of learned bases, so that ``parametrizations.orthogonal`` can own the weight."""

    def __init__(self, initial: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(initial.clone())


@register_attention("lavo")
class LAVOAttention(Attention):
    """LAVO: orthogonal memory (global) + windowed attention with relative bias (local).

    Per head, with bases B in R^{r x d} (orthonormal rows), c^k_s = B k_s and c^v_s = B v_s:

    - Global: H^k_t = mean of c^k_s over visible s (all valid keys, or s <= t when causal);
      slots m^k_j = H^k_{t,j} b_j. F_global(t) = sum_j softmax_j(q_t . m^k_j / sqrt(d)) m^v_j,
      computed as (alpha_t * H^v_t) B with alpha_tj = softmax_j(H^k_tj (q_t . b_j) / sqrt(d)).
    - Local (self only): windows of w; query t sees its window (up to t when causal):
      F_local(t) = softmax_s(q_t . k_s / sqrt(d) + P[t - s + w - 1]) v_s.
    - out = (F_global + F_local) / 2 (``combine="average"``), or one softmax over both sets of
      logits (``combine="joint"``). Cross attention: out = F_global.

    Causal cross attention uses the running mean over source positions s <= t. Time
    O(n (r + w) d), activations O(n (r + w)). Decoding state O(r + w d) per head.
    """

    Config = LAVOConfig
    patterns = frozenset(Pattern)
    decoding = True
    complexity = Complexity.LINEAR
    reference = "Zhang et al., Linear Attention via Orthogonal Memory, arXiv 2312.11135 (2023)"

    def __init__(
        self, config: LAVOConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        r = config.r if config.r is not None else min(64, head_dim)
        if r > head_dim:
            raise AttentionConfigError(
                f"lavo: r={r} exceeds head_dim={head_dim}: no {r} orthonormal rows exist in "
                f"R^{head_dim}; choose r <= {head_dim}"
            )
        if config.backend == "triton" and (pattern.cross or config.bases == "learned"):
            raise AttentionConfigError(
                f"lavo: backend='triton' supports self-attention with bases='fixed'; got pattern "
                f"{pattern.value!r}, bases={config.bases!r}; use backend='auto' or 'torch'"
            )
        self.r = r
        self.w = config.w
        initial = orthonormal_rows(heads, r, head_dim)  # [H, r, D]
        self.learned_bases: _Bases | None = None
        if config.bases == "learned":
            self.learned_bases = _Bases(initial)
            # matrix_exp, not the default Householder map for r < d: Householder's output stops
            # being orthonormal when its raw parameter is set to arbitrary values.
            parametrizations.orthogonal(self.learned_bases, "weight", orthogonal_map="matrix_exp")
        else:
            self.register_buffer("fixed_bases", initial)
        self.local = not pattern.cross
        self.position_bias: nn.Parameter | None = None
        if self.local and config.position == "relative":
            self.position_bias = nn.Parameter(torch.zeros(heads, 2 * self.w - 1))
        if self.local:
            window = torch.arange(self.w)
            # offset of query i from key j inside a window, shifted to index P: [w, w]
            self.register_buffer(
                "relative_index", window[:, None] - window[None, :] + self.w - 1, persistent=False
            )

    @property
    def bases(self) -> Tensor:
        """[H, r, D] orthonormal rows."""
        if self.learned_bases is not None:
            return self.learned_bases.weight
        return self.fixed_bases

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        backend = self._backend(q, key_padding_mask)
        if backend == "triton":
            from attention_zoo.mechanisms.lavo.triton_kernels import lavo_triton

            return lavo_triton(
                q, k, v, bases=self.bases, position_bias=self.position_bias, w=self.w,
                causal=self.pattern.causal, joint=self.config.combine == "joint",
            )
        if backend == "chunked":
            return lavo_causal_chunked(q, k, v, bases=self.bases, position_bias=self.position_bias,
                                       w=self.w, joint=self.config.combine == "joint")
        if backend == "compile":
            return backends.compiled(LAVOAttention._attend_torch)(self, q, k, v, key_padding_mask)
        return self._attend_torch(q, k, v, key_padding_mask)

    def _attend_torch(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> Tensor:
        """The plain path: every pattern, vectorised over the whole sequence."""
        acc = _accumulation_dtype(q.dtype)
        bases = self.bases.to(acc)  # [H, r, D]
        memory_logits, has_memory, value_coeffs = self._memory(
            q.to(acc), k.to(acc), v.to(acc), bases, key_padding_mask
        )
        if not self.local:
            probs = masked_softmax(memory_logits, has_memory)  # [B, Lq, H, r]
            return torch.einsum("blhr,hrd->blhd", probs * value_coeffs, bases).to(q.dtype)
        return self._with_local(
            q, k, v, key_padding_mask, memory_logits, has_memory, value_coeffs, bases
        )

    def _triton_unsupported(self, q: Tensor, key_padding_mask: Tensor | None) -> str | None:
        """Why this call cannot run on the Triton kernels, or None when it can."""
        if self.pattern.cross:
            return "cross attention"
        if key_padding_mask is not None:
            return "a key_padding_mask"
        if q.shape[1] == 0:
            return "an empty sequence"
        if self.learned_bases is not None and torch.is_grad_enabled():
            return "bases='learned' with gradients enabled (the kernels give no gradient for B)"
        if q.dtype not in _TRITON_DTYPES:
            return f"dtype {q.dtype} (supported: float32, float16, bfloat16)"
        return triton_unavailable(q.device)

    def _backend(self, q: Tensor, key_padding_mask: Tensor | None) -> str:
        """The backend that runs this call (``backends.choose``)."""
        if self.config.backend == "torch":
            return "torch"
        reasons = {
            "triton": self._triton_unsupported(q, key_padding_mask),
            "chunked": backends.chunked_unsupported(
                causal=self.pattern.causal, cross=self.pattern.cross,
                masked=key_padding_mask is not None, empty=q.shape[1] == 0,
                memory=getattr(self.config, "memory", "kv")),
        }
        return backends.choose(self.config.backend, q.device, reasons)

    def _memory(
        self, q: Tensor, k: Tensor, v: Tensor, bases: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The global read's logits and its value coefficients, factorised.

        Returns:
            memory_logits: [B, Lq, H, r] = H^k_t * (q_t . b_j) / sqrt(d).
            has_memory: [B, Lq or 1, 1, 1] bool, whether query t sees any key.
            value_coeffs: [B, Lq or 1, H, r] = H^v_t.
        """
        key_coeffs = torch.einsum("blhd,hrd->blhr", k, bases)  # [B, Lk, H, r]
        value_coeffs = torch.einsum("blhd,hrd->blhr", v, bases)
        counts = torch.ones(k.shape[0], k.shape[1], 1, 1, dtype=k.dtype, device=k.device)
        if key_padding_mask is not None:
            counts = (~key_padding_mask).to(k.dtype)[:, :, None, None]  # [B, Lk, 1, 1]
            key_coeffs = key_coeffs * counts
            value_coeffs = value_coeffs * counts
        if self.pattern.causal:
            counts = counts.cumsum(dim=1)
            key_coeffs = key_coeffs.cumsum(dim=1)
            value_coeffs = value_coeffs.cumsum(dim=1)
            if self.pattern.cross:  # index-aligned: query t reads the source prefix s <= t
                aligned = torch.arange(q.shape[1], device=q.device).clamp(max=k.shape[1] - 1)
                counts, key_coeffs, value_coeffs = (
                    x[:, aligned] for x in (counts, key_coeffs, value_coeffs)
                )
        else:
            counts = counts.sum(dim=1, keepdim=True)
            key_coeffs = key_coeffs.sum(dim=1, keepdim=True)
            value_coeffs = value_coeffs.sum(dim=1, keepdim=True)
        safe_counts = counts.clamp(min=1)
        key_means = key_coeffs / safe_counts
        value_means = value_coeffs / safe_counts
        query_coeffs = torch.einsum("blhd,hrd->blhr", q, bases)  # [B, Lq, H, r]
        memory_logits = query_coeffs * key_means / math.sqrt(q.shape[-1])
        return memory_logits, counts > 0, value_means

    def _with_local(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        memory_logits: Tensor,
        has_memory: Tensor,
        value_coeffs: Tensor,
        bases: Tensor,
    ) -> Tensor:
        batch, length, heads, dim = q.shape
        w = self.w
        pad = (-length) % w
        windows = (length + pad) // w
        padding = torch.zeros(batch, length, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            padding = key_padding_mask
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            padding = F.pad(padding, (0, pad), value=True)
        qw, kw, vw = (x.view(batch, windows, w, heads, dim) for x in (q, k, v))
        scores = torch.einsum("bnihd,bnjhd->bnhij", qw, kw) / math.sqrt(dim)  # [B, N, H, w, w]
        scores = scores.to(memory_logits.dtype)
        if self.position_bias is not None:
            scores = scores + self.position_bias[:, self.relative_index].to(scores.dtype)
        allowed = ~padding.view(batch, windows, 1, 1, w)  # [B, N, 1, 1, w]
        if self.pattern.causal:
            allowed = allowed & torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
        value_dtype = memory_logits.dtype

        def to_windows(x: Tensor) -> Tensor:  # [B, L, H, r] -> [B, N, H, w, r]
            x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
            return x.view(batch, windows, w, heads, x.shape[-1]).transpose(2, 3)

        def from_windows(x: Tensor) -> Tensor:  # [B, N, H, w, r] -> [B, L, H, r]
            return x.transpose(2, 3).reshape(batch, windows * w, heads, x.shape[-1])[:, :length]

        if self.config.combine == "joint":
            has_memory = has_memory.expand(batch, length, heads, self.r)
            logits = torch.cat([to_windows(memory_logits), scores], dim=-1)
            visible = torch.cat(
                [to_windows(has_memory), allowed.expand(batch, windows, heads, w, w)], dim=-1
            )
            probs = masked_softmax(logits, visible)
            memory_probs, local_probs = from_windows(probs[..., : self.r]), probs[..., self.r :]
            scale = 1.0
        else:
            memory_probs = masked_softmax(memory_logits, has_memory)
            local_probs = masked_softmax(scores, allowed)
            scale = 0.5
        local = torch.einsum("bnhij,bnjhd->bnihd", local_probs, vw.to(value_dtype))
        local = local.reshape(batch, windows * w, heads, dim)[:, :length]
        memory = torch.einsum("blhr,hrd->blhd", memory_probs * value_coeffs, bases)
        return ((memory + local) * scale).to(q.dtype)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LAVOState:
        acc = _accumulation_dtype(dtype)
        sums = torch.zeros(batch_size, self.heads, self.r, device=device, dtype=acc)
        window = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return LAVOState(sums, sums.clone(), 0, window, window.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LAVOState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, LAVOState]:
        acc = state.key_sum.dtype
        bases = self.bases.to(acc)
        query = q[:, 0].to(acc)  # [B, H, D]
        key_sum = state.key_sum + torch.einsum("bhd,hrd->bhr", k[:, 0].to(acc), bases)
        value_sum = state.value_sum + torch.einsum("bhd,hrd->bhr", v[:, 0].to(acc), bases)
        count = state.count + 1
        scale = 1.0 / math.sqrt(self.head_dim)
        memory_logits = torch.einsum("bhd,hrd->bhr", query, bases) * key_sum / count * scale
        value_means = value_sum / count

        window_keys = torch.cat([state.window_keys, k], dim=1)  # [B, j+1, H, D]
        window_values = torch.cat([state.window_values, v], dim=1)
        scores = torch.einsum("bhd,bjhd->bhj", query, window_keys.to(acc)) * scale
        if self.position_bias is not None:
            i = window_keys.shape[1] - 1  # the new token's offset inside its window
            offsets = i - torch.arange(i + 1, device=q.device) + self.w - 1
            scores = scores + self.position_bias[:, offsets].to(acc)
        if self.config.combine == "joint":
            probs = torch.softmax(torch.cat([memory_logits, scores], dim=-1), dim=-1)
            memory_probs, local_probs, scale_out = probs[..., : self.r], probs[..., self.r :], 1.0
        else:
            memory_probs = torch.softmax(memory_logits, dim=-1)
            local_probs, scale_out = torch.softmax(scores, dim=-1), 0.5
        memory = torch.einsum("bhr,hrd->bhd", memory_probs * value_means, bases)
        local = torch.einsum("bhj,bjhd->bhd", local_probs, window_values.to(acc))
        out = ((memory + local) * scale_out).to(q.dtype)[:, None]  # [B, 1, H, D]
        if window_keys.shape[1] == self.w:  # window complete: the next token starts a new one
            window_keys, window_values = window_keys[:, :0], window_values[:, :0]
        return out, LAVOState(key_sum, value_sum, count, window_keys, window_values)
