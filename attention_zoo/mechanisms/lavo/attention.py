"""LAVO: Linear Attention Via Orthogonal memory (Zhang et al., arXiv 2312.11135).

``SPEC.md`` beside this file is the definition, and says which parts are the paper's: an
orthogonal memory of r slots for global context, context dissection into windows of w for local
context, a relative position bias inside the windows, and the two reads combined.

This is the plain PyTorch path. It keeps the causal global read factorised (``memory.py``), so
that it only ever builds [B, L, H, r] tensors, never the [B, L, H, r, D] tensor of per-position
memories. The other backends (``backends.py``): causal self-attention chunk by chunk
(``chunked.py``, ``chunked_input.py``), the plain path under ``torch.compile``, and the fused Triton kernels
(``triton_kernels.py``, ``triton_input.py``); ``backend="auto"`` (the default) picks per device the
fastest one verified there.
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
from attention_zoo.mechanisms.lavo.chunked_input import lavo_input_chunked
from attention_zoo.mechanisms.lavo.memory import (
    OrthogonalMemory,
    global_read,
    input_memory,
    kv_memory,
    memory_logits,
    memory_values,
)
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class LAVOConfig:
    """Hyperparameters of LAVO (SPEC.md section 7 says which defaults are whose)."""

    r: int | None = field(
        default=None,
        metadata={"help": "orthogonal memory slots, at most the memory's width (the layer input "
                          "for memory='input', head_dim for 'kv'); None: 64 or that width if "
                          "smaller (our choice, the paper's r is not known)",
                  "min": 1},
    )
    w: int = field(default=16, metadata={"help": "window size of the local attention (the seeds' "
                                                 "value)", "min": 1})
    memory: Literal["input", "kv"] = field(
        default="input",
        metadata={"help": "input: one memory of the layer input, projected like any context "
                          "(the paper); kv: per-head memories of the projected keys and values "
                          "(an ablation)"},
    )
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
                          "torch: the plain path; chunked: causal self-attention chunk by chunk "
                          "(both memories); compile: the plain path under torch.compile; triton: "
                          "fused kernels (self attention; CUDA, or the CPU in Triton's interpreter)"},
    )


@dataclass
class LAVOState:
    """Decoding state of one LAVO layer: O(r + w D) numbers per head, whatever the context.

    Attributes:
        key_sum: [B, G, r] running sum of the coefficients (fp32 or wider): of the layer input,
            B x_s, shared by the heads (G = 1, ``memory="input"``), or of the keys, B k_s, per
            head (G = H, ``memory="kv"``).
        value_sum: [B, H, r] running sum of the value coefficients B v_s (``memory="kv"``), or
            None (``memory="input"``: keys and values read one memory).
        count: tokens seen so far (the position of the next token).
        window_keys: [B, j, H, D] keys of the current window before the next token, j < w.
        window_values: [B, j, H, D].
    """

    key_sum: Tensor
    value_sum: Tensor | None
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


@dataclass(frozen=True)
class _Windows:
    """The local attention of a self-attention pass, cut into N windows of w (the last padded).

    Attributes:
        scores: [B, N, H, w, w] q_i . k_j / sqrt(D) (+ the relative bias) inside each window.
        allowed: [B, N, 1 or H, w, w] bool, which keys each query of the window sees.
        values: [B, N, w, H, D] the window's values.
        length: the sequence length L before padding.
    """

    scores: Tensor
    allowed: Tensor
    values: Tensor
    length: int

    def split(self, x: Tensor) -> Tensor:
        """[B, L, H, r] -> [B, N, H, w, r]."""
        batch, windows, w = self.values.shape[:3]
        x = F.pad(x, (0, 0, 0, 0, 0, windows * w - self.length))
        return x.view(batch, windows, w, x.shape[2], x.shape[3]).transpose(2, 3)

    def merge(self, x: Tensor) -> Tensor:
        """[B, N, H, w, r] -> [B, L, H, r]."""
        batch, windows, heads, w, width = x.shape
        return x.transpose(2, 3).reshape(batch, windows * w, heads, width)[:, : self.length]

    def read(self, probs: Tensor) -> Tensor:
        """sum_j p_ij v_j in each window: probs [B, N, H, w, w] -> [B, L, H, D]."""
        out = torch.einsum("bnhij,bnjhd->bnihd", probs, self.values.to(probs.dtype))
        return out.reshape(out.shape[0], -1, *out.shape[3:])[:, : self.length]


@register_attention("lavo")
class LAVOAttention(Attention):
    """LAVO: orthogonal memory (global) + windowed attention with relative bias (local).

    Global read, ``memory="input"`` (the default; the paper's single memory): one memory per
    layer of its key/value-side input x. With bases B in R^{r x E} (orthonormal rows),
    c_s = B x_s and H_t the mean of c_s over the visible positions (all valid source positions,
    or s <= t in causal self attention), the memory X~_t = B (.) H_t is projected like any
    context: slot j's key is H_tj W_k b_j (+ the key bias) and its value H_tj W_v b_j (+ the
    value bias), split into heads. F_global(t) = sum_j softmax_j(q_t . key_tj / sqrt(d)) value_tj.
    ``memory="kv"`` (an ablation): per head, B_h in R^{r x d}, separate memories of the
    projected keys and values, key_tj = mean(B_h k_s)_j b_j and value_tj = mean(B_h v_s)_j b_j.

    Local read (self attention only): windows of w; query t sees its window (up to t when
    causal): F_local(t) = softmax_s(q_t . k_s / sqrt(d) + P[t - s + w - 1]) v_s.
    out = (F_global + F_local) / 2 (``combine="average"``), or one softmax over both sets of
    logits (``combine="joint"``). Cross attention (causal or not) reads the memory of the whole
    source: out = F_global.

    Time O(n (r + w) d), activations O(n (r + w)): the causal pass builds [B, L, H, r] tensors
    and the r x d projected bases, never the n x r x d per-position memories. Decoding state
    O(r + w d) per head.
    """

    Config = LAVOConfig
    patterns = frozenset(Pattern)
    decoding = True
    uses_layer_input = True  # memory="input"; an instance with memory="kv" does without
    complexity = Complexity.LINEAR
    reference = "Zhang et al., Linear Attention via Orthogonal Memory, arXiv 2312.11135 (2023)"

    def __init__(
        self, config: LAVOConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        self._check_config(config, pattern)
        width = self.source_dim if config.memory == "input" else head_dim
        self.r = config.r if config.r is not None else min(64, width)
        self.w = config.w
        # [r, E]: one memory of the layer input; [H, r, D]: a key and a value memory per head.
        initial = (orthonormal_rows(1, self.r, width)[0] if config.memory == "input"
                   else orthonormal_rows(heads, self.r, width))
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

    def _check_config(self, config: LAVOConfig, pattern: Pattern) -> None:
        width, what = ((self.source_dim, "the layer input width") if config.memory == "input"
                       else (self.head_dim, "head_dim"))
        if config.r is not None and config.r > width:
            raise AttentionConfigError(
                f"lavo: r={config.r} exceeds {what}={width} (memory={config.memory!r}): no "
                f"{config.r} orthonormal rows exist in R^{width}; choose r <= {width}"
            )
        if config.backend == "triton" and (
            pattern.cross or (config.bases == "learned" and config.memory == "kv")
        ):
            raise AttentionConfigError(
                f"lavo: backend='triton' supports self-attention (and, with memory='kv', "
                f"bases='fixed' only); got pattern {pattern.value!r}, bases={config.bases!r}, "
                f"memory={config.memory!r}; use backend='auto' or 'torch'"
            )

    @property
    def needs_layer_input(self) -> bool:
        return self.config.memory == "input"

    @property
    def bases(self) -> Tensor:
        """[r, E] (``memory="input"``) or [H, r, D] (``memory="kv"``) orthonormal rows."""
        if self.learned_bases is not None:
            return self.learned_bases.weight
        return self.fixed_bases

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        backend = self._backend(q, key_padding_mask)
        if backend == "triton" and self.config.memory == "input":
            assert layer_input is not None  # forward() checked it
            return self._attend_triton_input(q, k, v, layer_input)
        if backend == "triton":
            from attention_zoo.mechanisms.lavo.triton_kernels import lavo_triton

            return lavo_triton(
                q, k, v, bases=self.bases, position_bias=self.position_bias, w=self.w,
                causal=self.pattern.causal, joint=self.config.combine == "joint",
            )
        if backend == "chunked" and self.config.memory == "input":
            assert layer_input is not None  # forward() checked it
            return self._attend_chunked_input(q, k, v, layer_input)
        if backend == "chunked":
            return lavo_causal_chunked(q, k, v, bases=self.bases, position_bias=self.position_bias,
                                       w=self.w, joint=self.config.combine == "joint")
        if backend == "compile":
            return backends.compiled(LAVOAttention._attend_torch)(
                self, q, k, v, key_padding_mask, layer_input)
        return self._attend_torch(q, k, v, key_padding_mask, layer_input)

    def _attend_chunked_input(self, q: Tensor, k: Tensor, v: Tensor, layer_input: LayerInput) -> Tensor:
        """Causal self attention with ``memory="input"``, chunk by chunk (``chunked_input.py``):
        the coefficients [B, L, r] and projected bases [H, r, D] come from autograd here, so the
        layer input, the bases and the projections get their gradients through them."""
        acc = _accumulation_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            memory = self._memory(k, v, layer_input, acc)
        return lavo_input_chunked(
            q, k, v, coeffs=memory.key_coeffs[:, :, 0], key_bases=memory.key_bases,
            value_bases=memory.value_bases, key_bias=memory.key_bias,
            value_bias=memory.value_bias, position_bias=self.position_bias, w=self.w,
            joint=self.config.combine == "joint")

    def _attend_triton_input(self, q: Tensor, k: Tensor, v: Tensor, layer_input: LayerInput) -> Tensor:
        """Self attention with ``memory="input"`` on the Triton kernels (``triton_input.py``); the
        coefficients and projected bases come from autograd here, in float32."""
        from attention_zoo.mechanisms.lavo.triton_input import lavo_input_triton

        with torch.autocast(q.device.type, enabled=False):
            memory = self._memory(k, v, layer_input, torch.float32)
        return lavo_input_triton(
            q, k, v, coeffs=memory.key_coeffs[:, :, 0], key_bases=memory.key_bases,
            value_bases=memory.value_bases, key_bias=memory.key_bias,
            value_bias=memory.value_bias, position_bias=self.position_bias, w=self.w,
            causal=self.pattern.causal, joint=self.config.combine == "joint")

    def _attend_torch(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None,
    ) -> Tensor:
        """The plain path: every pattern and memory, vectorised over the whole sequence."""
        acc = _accumulation_dtype(q.dtype)
        memory = self._memory(k, v, layer_input, acc)
        valid = None if key_padding_mask is None else ~key_padding_mask
        causal = self.pattern.triangular
        query = q.to(acc)
        if not self.local:
            return global_read(query, memory, valid, causal=False).to(q.dtype)
        windows = self._windows(q, k, v, key_padding_mask, acc)
        if self.config.combine == "average":
            local = windows.read(masked_softmax(windows.scores, windows.allowed))
            return ((global_read(query, memory, valid, causal=causal) + local) / 2).to(q.dtype)
        read = memory_logits(query, memory, valid, causal=causal)
        logits = torch.cat([windows.split(read.logits), windows.scores], dim=-1)
        batch, length, heads = q.shape[:3]
        visible = torch.cat([
            windows.split(read.visible.expand(batch, length, heads, self.r)),
            windows.allowed.expand_as(windows.scores),
        ], dim=-1)
        probs = masked_softmax(logits, visible)  # [B, N, H, w, r + w]
        global_part = memory_values(windows.merge(probs[..., : self.r]), read.value_means, memory)
        return (global_part + windows.read(probs[..., self.r :])).to(q.dtype)

    def _memory(
        self, k: Tensor, v: Tensor, layer_input: LayerInput | None, dtype: torch.dtype
    ) -> OrthogonalMemory:
        """The memory of the context: of the layer input (``memory="input"``) or of k and v."""
        bases = self.bases.to(dtype)
        if self.config.memory == "kv":
            return kv_memory(k.to(dtype), v.to(dtype), bases)
        assert layer_input is not None  # forward() checked it
        return input_memory(layer_input.source.to(dtype), bases, layer_input.k_proj,
                            layer_input.v_proj, self.heads)

    def _windows(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, dtype: torch.dtype
    ) -> _Windows:
        batch, length, heads, dim = q.shape
        w = self.w
        pad = (-length) % w
        padding = torch.zeros(batch, length, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            padding = key_padding_mask
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            padding = F.pad(padding, (0, pad), value=True)
        windows = (length + pad) // w
        qw, kw, vw = (x.view(batch, windows, w, heads, dim) for x in (q, k, v))
        scores = (torch.einsum("bnihd,bnjhd->bnhij", qw, kw) / math.sqrt(dim)).to(dtype)
        if self.position_bias is not None:
            scores = scores + self.position_bias[:, self.relative_index].to(dtype)
        allowed = ~padding.view(batch, windows, 1, 1, w)  # [B, N, 1, 1, w]
        if self.pattern.causal:
            allowed = allowed & torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
        return _Windows(scores, allowed, vw, length)

    def triton_unsupported(self, q: Tensor, key_padding_mask: Tensor | None) -> str | None:
        """Why this call cannot run on the Triton kernels, or None when it can."""
        if self.pattern.cross:
            return "cross attention"
        if key_padding_mask is not None:
            return "a key_padding_mask"
        if q.shape[1] == 0:
            return "an empty sequence"
        if self.learned_bases is not None and torch.is_grad_enabled() and self.config.memory == "kv":
            return ("bases='learned' with gradients enabled (the memory='kv' kernels give no "
                    "gradient for B)")
        if q.dtype not in _TRITON_DTYPES:
            return f"dtype {q.dtype} (supported: float32, float16, bfloat16)"
        return triton_unavailable(q.device)

    def _backend(self, q: Tensor, key_padding_mask: Tensor | None) -> str:
        """The backend that runs this call (``backends.choose``)."""
        if self.config.backend == "torch":
            return "torch"
        reasons = {
            "triton": self.triton_unsupported(q, key_padding_mask),
            "chunked": backends.chunked_unsupported(
                causal=self.pattern.causal, cross=self.pattern.cross,
                masked=key_padding_mask is not None, empty=q.shape[1] == 0),
        }
        return backends.choose(self.config.backend, q.device, reasons)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> LAVOState:
        acc = _accumulation_dtype(dtype)
        groups = 1 if self.config.memory == "input" else self.heads
        key_sum = torch.zeros(batch_size, groups, self.r, device=device, dtype=acc)
        value_sum = None if self.config.memory == "input" else key_sum.clone()
        window = torch.zeros(batch_size, 0, self.heads, self.head_dim, device=device, dtype=dtype)
        return LAVOState(key_sum, value_sum, 0, window, window.clone())

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: LAVOState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, LAVOState]:
        if self.needs_layer_input:
            layer_input = self.require_layer_input(layer_input, q, k)
        acc = state.key_sum.dtype
        query = q[:, 0].to(acc)  # [B, H, D]
        key_sum, value_sum = self._updated_sums(k, v, layer_input, state)
        count = state.count + 1
        scale = 1.0 / math.sqrt(self.head_dim)
        key_means = key_sum / count
        value_means = key_means if value_sum is None else value_sum / count
        memory_logits = self._step_logits(query, key_means, layer_input) * scale  # [B, H, r]

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
        memory = self._step_values(memory_probs, value_means, layer_input)
        local = torch.einsum("bhj,bjhd->bhd", local_probs, window_values.to(acc))
        out = ((memory + local) * scale_out).to(q.dtype)[:, None]  # [B, 1, H, D]
        if window_keys.shape[1] == self.w:  # window complete: the next token starts a new one
            window_keys, window_values = window_keys[:, :0], window_values[:, :0]
        return out, LAVOState(key_sum, value_sum, count, window_keys, window_values)

    def _updated_sums(
        self, k: Tensor, v: Tensor, layer_input: LayerInput | None, state: LAVOState
    ) -> tuple[Tensor, Tensor | None]:
        acc = state.key_sum.dtype
        bases = self.bases.to(acc)
        if state.value_sum is None:
            assert layer_input is not None  # step() checked it
            coeffs = torch.einsum("be,re->br", layer_input.source[:, 0].to(acc), bases)
            return state.key_sum + coeffs[:, None], None
        key_sum = state.key_sum + torch.einsum("bhd,hrd->bhr", k[:, 0].to(acc), bases)
        return key_sum, state.value_sum + torch.einsum("bhd,hrd->bhr", v[:, 0].to(acc), bases)

    def _step_logits(self, query: Tensor, key_means: Tensor, layer_input: LayerInput | None) -> Tensor:
        """q . key_j of the new query [B, H, D] (unscaled): [B, H, r].

        With ``memory="input"`` the slot keys are never formed: q . W_k b_j = (W_k^T q) . b_j,
        O(E (D + r)) per head instead of the O(r E D) projection of the bases.
        """
        bases = self.bases.to(query.dtype)
        if self.config.memory == "kv":
            return key_means * torch.einsum("bhd,hrd->bhr", query, bases)
        assert layer_input is not None
        weight = layer_input.k_proj.weight.to(query.dtype).view(self.heads, self.head_dim, -1)
        in_input_space = torch.einsum("bhd,hde->bhe", query, weight)  # W_k^T q: [B, H, E]
        logits = key_means * torch.einsum("bhe,re->bhr", in_input_space, bases)
        bias = layer_input.k_proj.bias
        if bias is not None:
            logits = logits + torch.einsum("bhd,hd->bh", query, bias.to(query.dtype).view(
                self.heads, self.head_dim))[..., None]
        return logits

    def _step_values(self, probs: Tensor, value_means: Tensor, layer_input: LayerInput | None) -> Tensor:
        """sum_j p_j value_j of the new query: probs [B, H, r] -> [B, H, D]."""
        bases = self.bases.to(probs.dtype)
        if self.config.memory == "kv":
            return torch.einsum("bhr,hrd->bhd", probs * value_means, bases)
        assert layer_input is not None
        in_input_space = torch.einsum("bhr,re->bhe", probs * value_means, bases)  # [B, H, E]
        weight = layer_input.v_proj.weight.to(probs.dtype).view(self.heads, self.head_dim, -1)
        out = torch.einsum("bhe,hde->bhd", in_input_space, weight)
        bias = layer_input.v_proj.bias
        if bias is not None:
            out = out + probs.sum(dim=-1, keepdim=True) * bias.to(probs.dtype).view(
                self.heads, self.head_dim)
        return out
