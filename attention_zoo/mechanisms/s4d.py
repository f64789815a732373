"""S4D: a diagonal state space layer standing in for attention (self attention only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attention_zoo.base import Attention, AttentionConfigError, Complexity, LayerInput, Pattern
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class S4DConfig:
    """Hyperparameters of S4D (defaults of the paper's S4D-Lin layer)."""

    state_size: int = field(
        default=64,
        metadata={"help": "state size N per channel, even (N/2 complex conjugate modes)", "min": 2},
    )
    dt_min: float = field(default=0.001, metadata={"help": "smallest initial step size", "min": 0.0})
    dt_max: float = field(default=0.1, metadata={"help": "largest initial step size", "min": 0.0})


@dataclass
class S4DState:
    """Decoding state: the complex SSM state x_t of every channel, [B, H, D, N/2]."""

    x: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # FFTs and complex exponentials in half precision lose the kernel's tail: use float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_convolution(u: Tensor, kernel: Tensor) -> Tensor:
    """y_t = sum_{s <= t} kernel[t - s] u_s along dim 1, by FFT.

    Args:
        u: [B, L, H, D]; kernel: [L, H, D].

    Returns:
        [B, L, H, D].
    """
    length = u.shape[1]
    n = 2 * length  # zero padding turns the circular convolution into a linear one
    spectrum = torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(kernel, n=n, dim=0)[None]
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, :length]


@register_attention("s4d")
class S4DAttention(Attention):
    """S4D: a diagonal state space model (S4D-Lin) as a drop-in for self attention.

    Per channel c = (head, dim), with N/2 complex modes n (``state_size`` N = 64):
    A_n = -exp(a_n) + i b_n (S4D-Lin init: -1/2 + i pi n), B = 1, learned C_n, step
    Delta = exp(log_dt) (init log-uniform in [``dt_min``, ``dt_max``] = [0.001, 0.1]), and the
    zero-order-hold discretisation A' = exp(Delta A), B' = (A' - 1) / A. The kernel is
    K_l = 2 Re(sum_n C_n B'_n A'_n^l), and y = K * u + D u (a causal convolution, by FFT).
    Non-causal self attention runs a second kernel (own C) backwards and adds the two
    (the bidirectional S4 of the paper's classification tasks).

    How it uses q, k, v: an SSM mixes one input sequence, not queries against keys. Here the
    input is the value gated by the key, u = sigmoid(k) * v (k decides what enters the state),
    and the output is gated by the query, out = sigmoid(q) * y, as gated SSMs such as H3 (Fu et
    al., ICLR 2023) use their q/k/v projections; each of the H * D channels is its own SSM.
    Padded positions enter as u = 0. Recurrent form (decoding): x_t = A' x_{t-1} + B' u_t,
    y_t = 2 Re(C x_t) + D u_t, equal to the convolution. Time O(n log n) per channel.
    """

    Config = S4DConfig
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    decoding = True
    complexity = Complexity.LOGLINEAR
    reference = (
        "Gu, Gupta, Goel, Re, On the Parameterization and Initialization of Diagonal State "
        "Space Models (S4D), NeurIPS 2022"
    )

    def __init__(
        self, config: S4DConfig, *, pattern: Pattern, heads: int, head_dim: int,
        input_dim: int | None = None, source_dim: int | None = None,
    ) -> None:
        super().__init__(config, pattern=pattern, heads=heads, head_dim=head_dim,
                         input_dim=input_dim, source_dim=source_dim)
        if config.state_size % 2:
            raise AttentionConfigError(
                f"s4d: state_size must be even (N/2 conjugate pairs), got {config.state_size}"
            )
        if not 0 < config.dt_min <= config.dt_max:
            raise AttentionConfigError(
                f"s4d: need 0 < dt_min <= dt_max, got dt_min={config.dt_min}, dt_max={config.dt_max}"
            )
        modes = config.state_size // 2
        log_dt = torch.rand(heads, head_dim) * (
            math.log(config.dt_max) - math.log(config.dt_min)
        ) + math.log(config.dt_min)
        self.log_dt = nn.Parameter(log_dt)  # [H, D]
        self.log_a_real = nn.Parameter(torch.full((heads, head_dim, modes), math.log(0.5)))
        self.a_imag = nn.Parameter(math.pi * torch.arange(modes).float().expand(heads, head_dim, -1))
        # C ~ complex normal with variance 1, stored as (real, imag) pairs: [H, D, N/2, 2]
        self.c_forward = nn.Parameter(torch.randn(heads, head_dim, modes, 2) * math.sqrt(0.5))
        self.c_backward = (
            nn.Parameter(torch.randn(heads, head_dim, modes, 2) * math.sqrt(0.5))
            if not pattern.causal else None
        )
        self.skip = nn.Parameter(torch.randn(heads, head_dim))  # D

    def _discretised(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Delta A, A' = exp(Delta A) and B' = (A' - 1) / A, complex [H, D, N/2] each."""
        a = torch.complex(-torch.exp(self.log_a_real.to(dtype)), self.a_imag.to(dtype))
        dt_a = torch.exp(self.log_dt.to(dtype))[..., None] * a
        a_bar = torch.exp(dt_a)
        return dt_a, a_bar, (a_bar - 1) / a

    def kernel(self, length: int, c: Tensor, dtype: torch.dtype) -> Tensor:
        """K_l = 2 Re(sum_n C_n B'_n A'_n^l) for l < length: [length, H, D]."""
        dt_a, _, b_bar = self._discretised(dtype)
        weights = torch.view_as_complex(c.to(dtype).contiguous()) * b_bar  # C B': [H, D, N/2]
        # A'^l with l = i * s + j, as A'^(i s) A'^j: two [.., N/2, ~sqrt(L)] tables and one
        # batched matmul instead of H D (N/2) L complex exponentials.
        stride = math.isqrt(max(length - 1, 0)) + 1  # s >= sqrt(L), so L / s <= s rows
        rows = -(-length // stride)
        steps = torch.arange(stride, device=dt_a.device, dtype=dtype)
        fine = torch.exp(dt_a[..., None] * steps)  # A'^j: [H, D, N/2, s]
        coarse = torch.exp(dt_a[..., None] * (steps[:rows] * stride))  # A'^(i s): [H, D, N/2, rows]
        kernel = coarse.transpose(-1, -2) @ (weights[..., None] * fine)  # [H, D, rows, s]
        kernel = 2 * kernel.flatten(-2)[..., :length].real  # [H, D, L]
        return kernel.permute(2, 0, 1)

    def _gated_input(self, k: Tensor, v: Tensor) -> Tensor:
        return torch.sigmoid(k) * v

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        dtype = _compute_dtype(q.dtype)
        u = self._gated_input(k, v).to(dtype)  # [B, L, H, D]
        if key_padding_mask is not None:
            u = u.masked_fill(key_padding_mask[:, :, None, None], 0.0)
        length = u.shape[1]
        y = causal_convolution(u, self.kernel(length, self.c_forward, dtype))
        if self.c_backward is not None:
            backward_kernel = self.kernel(length, self.c_backward, dtype)
            y = y + causal_convolution(u.flip(1), backward_kernel).flip(1)
        y = y + self.skip.to(dtype) * u
        return (torch.sigmoid(q) * y.to(q.dtype)).to(q.dtype)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> S4DState:
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        modes = self.config.state_size // 2
        shape = (batch_size, self.heads, self.head_dim, modes)
        return S4DState(torch.zeros(shape, device=device, dtype=complex_dtype))

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: S4DState, *,
        layer_input: LayerInput | None = None,
    ) -> tuple[Tensor, S4DState]:
        dtype = _compute_dtype(q.dtype)
        _, a_bar, b_bar = self._discretised(dtype)
        u = self._gated_input(k, v)[:, 0].to(dtype)  # [B, H, D]
        x = a_bar * state.x + b_bar * u[..., None]  # [B, H, D, N/2]
        c = torch.view_as_complex(self.c_forward.to(dtype).contiguous())
        y = 2 * (c * x).sum(-1).real + self.skip.to(dtype) * u
        return (torch.sigmoid(q) * y[:, None].to(q.dtype)), S4DState(x)
