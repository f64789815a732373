"""The shared core of kernelized (feature-map) linear attention: parallel and token by token.

A kernelized mechanism replaces exp(q . k) by a feature product phi(q_t) . phi(k_s) >= 0 and gets

    out_t = sum_s (phi(q_t) . phi(k_s)) v_s / sum_s phi(q_t) . phi(k_s)

over the keys s that query t sees, in O(n m D) time for m features. ``linear``, ``cosformer``,
``performer`` and ``lln`` all run through :func:`kernelized_attention` (parallel) and
:class:`RunningSums` (decoding), so that the causal prefix sums are written once.

Exponential features (Performer's exp(w . x - |x|^2 / 2), LLN's exp(beta k)) overflow unless
they are shifted, and a key shift that looks at later keys leaks the future. Here a key feature
is passed as ``phi_k * exp(key_log_scale)`` with ``phi_k`` in [0, 1], and every sum is kept
relative to the running maximum R_t = max_{s <= t} key_log_scale_s, which only sees the prefix.
The causal pass is chunked (chunks of :data:`CHUNK`): inside a chunk it builds the masked
[C, C] feature-product matrix with the factor exp(l_s - R_t) <= 1; across chunks a scan carries
the [m, D] sums rescaled to each chunk's reference (a cumulative sum when nothing is rescaled).
Every exponent is <= 0, nothing overflows, and it never builds the [n, m, D] tensor of
per-position sums nor a chunk-by-chunk matrix. A query shift (per token) cancels in the ratio
and needs no care.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo.mechanisms.chunk_scan import carried_states

CHUNK = 64
"""Chunk length of the causal pass: cost O(n C m) inside chunks, O(n m D) across."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (running sums over long sequences), the input's dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _exp_below(exponent: Tensor, keep: Tensor) -> Tensor:
    """exp(exponent) where ``keep`` (where the exponent is finite and <= 0), 0 elsewhere."""
    return torch.exp(exponent.masked_fill(~keep, float("-inf")))


def kernelized_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_valid: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """Feature-map attention, exact for the given features (parallel form).

    Args:
        phi_q: [B, Lq, H, m] nonnegative query features.
        phi_k: [B, Lk, H, m] nonnegative key features (in [0, 1] when ``key_log_scale`` is given).
        v: [B, Lk, H, D] values.
        causal: query t sees keys s <= t (causal self attention: Lq == Lk).
        key_valid: [B, Lk] bool, False at padded keys, or None.
        key_log_scale: [B, Lk, H] or None: the true key feature is phi_k * exp(key_log_scale).
            Treated as a constant for autograd (it only fixes a scale that cancels).
        eps: added to the normaliser (0: a query that sees no key mass gets zeros).

    Returns:
        [B, Lq, H, D] in the dtype of ``v``.
    """
    dtype = accumulation_dtype(v.dtype)
    phi_q, phi_k, v_acc = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    batch, key_length, heads, _ = phi_k.shape
    if key_log_scale is None:
        log_scale = phi_k.new_zeros(batch, key_length, heads)
    else:
        log_scale = key_log_scale.detach().to(dtype)
    ones = v_acc.new_ones(batch, key_length, heads, 1)
    values = torch.cat([v_acc, ones], dim=-1)  # [B, Lk, H, D + 1]: the last column normalises
    if causal and phi_q.shape[1] != key_length:
        raise ValueError(f"causal feature-map attention needs as many queries as keys, got "
                         f"{phi_q.shape[1]} and {key_length}")
    if key_valid is not None:
        log_scale = log_scale.masked_fill(~key_valid[:, :, None], float("-inf"))
        phi_k = phi_k * key_valid[:, :, None, None]
    if causal:
        rescale = key_log_scale is not None or key_valid is not None
        augmented = _causal(phi_q, phi_k, values, log_scale, rescale=rescale)
    else:
        reference = log_scale.amax(dim=1, keepdim=True)  # [B, 1, H]
        weight = _exp_below(log_scale - reference, torch.isfinite(log_scale))
        sums = torch.einsum("bshm,bshd->bhmd", phi_k * weight[..., None], values)
        augmented = torch.einsum("bthm,bhmd->bthd", phi_q, sums)
    return _normalise(augmented, eps).to(v.dtype)


def _normalise(augmented: Tensor, eps: float) -> Tensor:
    numerator, normaliser = augmented[..., :-1], augmented[..., -1:]
    if eps > 0:
        return numerator / (normaliser + eps)
    return numerator / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))


def _causal(
    phi_q: Tensor, phi_k: Tensor, values: Tensor, log_scale: Tensor, *, rescale: bool
) -> Tensor:
    """Chunked causal pass on aligned inputs: phi_q, phi_k [B, L, H, m], values [B, L, H, E],
    log_scale [B, L, H] (-inf at invalid keys; ``rescale`` False: zero everywhere).
    Head-major inside ([B, H, N, C, *]: one copy of each input, then contiguous matmuls).
    Returns [B, L, H, E]."""
    batch, length, heads = phi_q.shape[:3]
    pad = (-length) % CHUNK
    if pad:
        phi_q, phi_k, values = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (phi_q, phi_k, values))
        log_scale = F.pad(log_scale, (0, 0, 0, pad), value=float("-inf"))
    chunks = (length + pad) // CHUNK

    def split(x: Tensor) -> Tensor:  # [B, L, H, ...] -> [B, H, N, C, ...]
        x = x.transpose(1, 2)
        return x.reshape(batch, heads, chunks, CHUNK, *x.shape[3:])

    q_c, k_c, v_c = split(phi_q), split(phi_k), split(values)
    # Inside each chunk: (phi_q_t . phi_k_s) exp(l_s - R_t) for s <= t (padded keys: phi_k = 0).
    scores = q_c @ k_c.transpose(-1, -2)  # [B, H, N, C(t), C(s)]
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=phi_q.device).tril()
    if not rescale:
        intra = scores.masked_fill(~lower, 0.0) @ v_c
        # Across chunks: the sums of every earlier chunk, an exclusive cumulative sum.
        states = _chunk_states(k_c.transpose(-1, -2) @ v_c, None, None)  # [B, H, N, m, E]
        out = intra + q_c @ states
    else:
        l_c = split(log_scale[..., None])[..., 0]  # [B, H, N, C]
        r_c = split(torch.cummax(log_scale, dim=1).values[..., None])[..., 0]  # R_t, prefix only
        f_c = torch.isfinite(l_c)
        decay = _exp_below(l_c[..., None, :] - r_c[..., :, None], lower & f_c[..., None, :])
        intra = (scores * decay) @ v_c
        # U_n = sum_{s in n} exp(l_s - E_n) phi_k_s v_s^T, E_n = R at the chunk's end.
        chunk_end = r_c[..., -1]  # [B, H, N]
        local_weight = _exp_below(l_c - chunk_end[..., None], f_c)  # [B, H, N, C]
        local_sums = (k_c * local_weight[..., None]).transpose(-1, -2) @ v_c
        previous_end = F.pad(chunk_end, (1, -1), value=float("-inf"))  # E_{n-1}
        states = _chunk_states(local_sums, chunk_end, previous_end)
        query_weight = _exp_below(previous_end[..., None] - r_c,
                                  torch.isfinite(previous_end)[..., None])  # exp(E_{n-1} - R_t)
        out = intra + (q_c * query_weight[..., None]) @ states
    return out.reshape(batch, heads, chunks * CHUNK, -1).transpose(1, 2)[:, :length]


def _chunk_states(
    local_sums: Tensor, chunk_end: Tensor | None, previous_end: Tensor | None
) -> Tensor:
    """The sums before each chunk, relative to E_{n-1}: sum_{j < n} exp(E_j - E_{n-1}) U_j.

    local_sums U: [B, H, N, m, E]; chunk_end E_n and previous_end E_{n-1}: [B, H, N], or None
    when nothing is rescaled (every log scale 0): then an exclusive cumulative sum. Otherwise a
    scan over the chunks, S_{n+1} = exp(E_{n-1} - E_n) S_n + U_n (factors <= 1), linear in N.
    Returns [B, H, N, m, E].
    """
    if chunk_end is None or previous_end is None:
        return F.pad(local_sums.cumsum(dim=2), (0, 0, 0, 0, 1, -1))
    carry = _exp_below(previous_end - chunk_end, torch.isfinite(previous_end))  # [B, H, N]
    initial = torch.zeros_like(local_sums[:, :, 0])
    return carried_states(carry[..., None, None], local_sums, initial)[0]


@dataclass
class RunningSums:
    """Decoding state of kernelized attention: O(m D) numbers per head, whatever the context.

    Attributes:
        sums: [B, H, m, D + 1] sum over keys so far of phi_k_s exp(l_s - reference) [v_s, 1].
        reference: [B, H] running maximum of the key log scales (-inf before any key).
    """

    sums: Tensor
    reference: Tensor

    @classmethod
    def empty(
        cls, batch: int, heads: int, features: int, value_dim: int, *,
        device: torch.device | str | None, dtype: torch.dtype,
    ) -> RunningSums:
        dtype = accumulation_dtype(dtype)
        sums = torch.zeros(batch, heads, features, value_dim + 1, device=device, dtype=dtype)
        reference = torch.full((batch, heads), float("-inf"), device=device, dtype=dtype)
        return cls(sums, reference)

    def step(
        self, phi_q: Tensor, phi_k: Tensor, v: Tensor, key_log_scale: Tensor | None = None,
        eps: float = 0.0,
    ) -> tuple[Tensor, RunningSums]:
        """Add one key and read one query.

        Args:
            phi_q: [B, H, m]; phi_k: [B, H, m]; v: [B, H, D]; key_log_scale: [B, H] or None.

        Returns:
            ``(out [B, H, D] in the dtype of v, new state)``.
        """
        dtype = self.sums.dtype
        log_scale = (
            torch.zeros_like(self.reference) if key_log_scale is None
            else key_log_scale.detach().to(dtype)
        )
        reference = torch.maximum(self.reference, log_scale)
        old = _exp_below(self.reference - reference, torch.isfinite(self.reference))
        values = torch.cat([v.to(dtype), v.new_ones(*v.shape[:-1], 1).to(dtype)], dim=-1)
        new = phi_k.to(dtype) * torch.exp(log_scale - reference)[..., None]
        sums = self.sums * old[..., None, None] + new[..., :, None] * values[..., None, :]
        augmented = torch.einsum("bhm,bhme->bhe", phi_q.to(dtype), sums)
        return _normalise(augmented, eps).to(v.dtype), RunningSums(sums, reference)
