"""ProbSparse attention (Informer): only the top-u "active" queries attend; the others read a mean."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_zoo.base import Attention, Complexity, LayerInput, Pattern, masked_softmax
from attention_zoo.registry import register_attention


@dataclass(frozen=True)
class ProbSparseConfig:
    """Hyperparameters of ProbSparse attention (Informer's default factor)."""

    factor: int = field(
        default=5,
        metadata={"help": "c: c*ceil(ln n) active queries, and as many sampled keys per query",
                  "min": 1},
    )


def budget(count: Tensor, factor: int) -> Tensor:
    """Informer's u = c * ceil(ln n), at least c and at most n, elementwise on counts (long)."""
    logs = torch.log(count.clamp(min=1).float()).ceil().clamp(min=1)
    return torch.minimum(count, (factor * logs).long())


@register_attention("probsparse")
class ProbSparseAttention(Attention):
    """ProbSparse attention: softmax attention for the u most "active" queries only.

    Query sparsity measurement on sampled keys: M(q_t) = max_j s_tj - mean_j s_tj with
    s_tj = q_t . k_j / sqrt(D) over m = c ceil(ln n) keys of the n the query sees. The
    u = c ceil(ln n_q) queries with the largest M get exact softmax attention over their visible
    keys; every other query outputs the mean of its visible values. Default c = 5 (``factor``),
    as in Informer. With c >= n every query is active and it equals softmax attention.

    Differences from Informer, for the zoo's contract:

    - Key sampling is stratified over each query's visible valid keys (m equal strata, one key
      each): at random inside each stratum in training, the strata's midpoints in evaluation.
      Informer draws key indices uniformly over all positions at every call (the same for every
      sample and head), which makes evaluation random and lets padded keys into the measurement.
    - The measurement divides by the number of sampled keys (Informer divides the sum by the
      full key length).
    - Causal: query t's measurement uses only keys s <= t, and t is active when fewer than
      u(t) = c ceil(ln t') of the t' queries up to t have a larger M (a top-u over the prefix).
      Informer's decoder ranks all queries at once, so whether an early query attends depends
      on later queries: a future leak. Lazy causal queries read the mean of their visible values
      (Informer uses the cumulative sum).

    Time O(n log n D) for the measurement and the active queries; the causal prefix ranking
    adds O(n^2) scalar comparisons (in chunks of 256 queries, so memory stays O(256 n)). The
    causal ranking activates many more queries than Informer's u = c ceil(ln n): every query
    that is in the top u(t) of its own prefix is active, about sum_t u(t) / t ~ c (ln n)^2 / 2
    of them when the measurements come in random order (Informer: c ln n), so its causal cost
    and efficiency figures are those of that larger active set.
    """

    Config = ProbSparseConfig
    # The active queries are chosen among all queries, so in cross attention a query alone does
    # not give its row of the whole pass: no causal_cross (a decoder's cross attention).
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    complexity = Complexity.LOGLINEAR
    reference = (
        "Zhou et al., Informer: Beyond Efficient Transformer for Long Sequence Time-Series "
        "Forecasting, AAAI 2021"
    )
    rank_chunk = 256

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        batch, q_len, heads, dim = q.shape
        k_len = k.shape[1]
        causal = self.pattern.causal
        key_valid = (
            torch.ones(batch, k_len, dtype=torch.bool, device=k.device)
            if key_padding_mask is None else ~key_padding_mask
        )
        aligned = torch.arange(q_len, device=q.device).clamp(max=k_len - 1)  # query t -> key t
        if causal:
            visible = key_valid.long().cumsum(dim=1)[:, aligned]  # [B, Lq] keys each query sees
        else:
            visible = key_valid.long().sum(dim=1, keepdim=True).expand(batch, q_len)
        query_valid = key_valid if not self.pattern.cross else torch.ones(
            batch, q_len, dtype=torch.bool, device=q.device
        )
        candidate = query_valid & (visible > 0)  # [B, Lq]
        measure = self._measure(q, k, key_valid, visible, candidate)  # [B, H, Lq]
        active = self._select(measure, candidate)  # [B, H, Lq]

        # Exact softmax attention for the active queries, gathered into [B, H, A, D].
        active_count = active.sum(dim=-1)  # [B, H]
        width = max(int(active_count.max()), 1)
        order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[..., :width]
        filled = torch.arange(width, device=q.device) < active_count[..., None]  # [B, H, A]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        index = order[..., None].expand(-1, -1, -1, dim)
        logits = torch.gather(qh, 2, index) @ kh.transpose(-1, -2) / math.sqrt(dim)  # [B, H, A, Lk]
        allowed = key_valid[:, None, None, :]
        if causal:
            allowed = allowed & (
                torch.arange(k_len, device=q.device) <= order[..., None]
            )  # [B, H, A, Lk]
        attended = masked_softmax(logits, allowed) @ vh  # [B, H, A, D]

        # Lazy queries: the mean of the values they see.
        values = v * key_valid[:, :, None, None]
        if causal:
            sums = values.cumsum(dim=1)[:, aligned]  # [B, Lq, H, D]
        else:
            sums = values.sum(dim=1, keepdim=True).expand(batch, q_len, heads, dim)
        lazy = (sums / visible.clamp(min=1)[:, :, None, None]).transpose(1, 2)  # [B, H, Lq, D]
        attended = torch.where(filled[..., None], attended, torch.gather(lazy, 2, index))
        return lazy.scatter(2, index, attended).transpose(1, 2)

    def _measure(
        self, q: Tensor, k: Tensor, key_valid: Tensor, visible: Tensor, candidate: Tensor
    ) -> Tensor:
        """M(q_t) = max - mean of q_t . k_j / sqrt(D) over stratified samples of visible keys.

        Args:
            q: [B, Lq, H, D]; k: [B, Lk, H, D]; key_valid: [B, Lk]; visible: [B, Lq] number of
                keys query t sees (the first ``visible`` valid keys, in order); candidate: [B, Lq].

        Returns:
            [B, H, Lq], -inf where the query is no candidate.
        """
        batch, q_len = visible.shape
        samples = budget(visible, self.config.factor)  # [B, Lq]
        width = max(int(samples.max()), 1)
        slot = torch.arange(width, device=q.device)
        n, m = visible[..., None], samples.clamp(min=1)[..., None]  # [B, Lq, 1]
        # Sample j of query t: the key of rank floor((j + offset) n / m) among its visible keys.
        if self.training:
            offset = torch.rand(q_len, width, device=q.device)
            rank = ((slot + offset) * (n / m)).floor().long()  # [B, Lq, W]
        else:  # offset 1/2, in integers so that no rounding moves a sample
            rank = torch.div((2 * slot + 1) * n, 2 * m, rounding_mode="floor")
        rank = torch.minimum(rank, (visible - 1).clamp(min=0)[..., None])
        valid_positions = torch.argsort((~key_valid).to(torch.int8), dim=1, stable=True)  # [B, Lk]
        positions = torch.gather(valid_positions, 1, rank.flatten(1)).view(batch, q_len, width)
        sampled_keys = k[torch.arange(batch, device=k.device)[:, None, None], positions]
        if q.dtype in (torch.float16, torch.bfloat16):  # rank queries on float32 measurements
            q, sampled_keys = q.float(), sampled_keys.float()
        scores = torch.einsum("bqhd,bqwhd->bhqw", q, sampled_keys) / math.sqrt(q.shape[-1])
        sampled = (torch.arange(width, device=q.device) < samples[..., None])[:, None]  # [B,1,Lq,W]
        maximum = scores.masked_fill(~sampled, float("-inf")).amax(dim=-1)
        mean = (scores * sampled).sum(dim=-1) / samples.clamp(min=1)[:, None]
        return (maximum - mean).masked_fill(~candidate[:, None], float("-inf")).detach()

    def _select(self, measure: Tensor, candidate: Tensor) -> Tensor:
        """Active queries [B, H, Lq]: the top u by measure (causal: top u(t) of the prefix)."""
        if not self.pattern.causal:
            u = budget(candidate.long().sum(dim=1), self.config.factor)  # [B]
            order = torch.argsort(measure, dim=-1, descending=True, stable=True)
            position_in_order = torch.argsort(order, dim=-1)
            return (position_in_order < u[:, None, None]) & candidate[:, None]
        q_len = measure.shape[-1]
        u = budget(candidate.long().cumsum(dim=1), self.config.factor)[:, None]  # [B, 1, Lq]
        ahead = torch.empty_like(measure, dtype=torch.long)  # larger measures among s <= t
        positions = torch.arange(q_len, device=measure.device)
        for start in range(0, q_len, self.rank_chunk):
            stop = min(start + self.rank_chunk, q_len)
            larger = measure[:, :, None, :stop] > measure[:, :, start:stop, None]  # [B, H, c, stop]
            earlier = positions[None, :stop] <= positions[start:stop, None]  # [c, stop]
            ahead[..., start:stop] = (larger & earlier).sum(dim=-1)
        return (ahead < u) & candidate[:, None]
