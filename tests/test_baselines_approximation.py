"""Each baseline approximates, or equals, what it claims.

- linear, cosformer, performer, lln: the linear-time forms (chunked causal prefix sums with a
  prefix-only stabiliser, non-causal sums, token-by-token decoding) equal their quadratic
  definitions, written here independently in float64 (log space for exponential features).
- performer and lara approach softmax as their feature / landmark count grows; ra is unbiased
  (its mean over many samples approaches softmax, the deterministic evaluation plug-in does not).
- lln's moment matching gives log attention weights with (within 30%) the softmax logits' variance.

Errors are averaged over seeds, so the monotone trends asserted below hold by a wide margin.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from attention_zoo import Pattern, attention_spec, build_attention, masked_softmax
from attention_zoo.mechanisms.kernelized import CHUNK, kernelized_attention
from attention_zoo.mechanisms.softmax import softmax_attention

pytestmark = pytest.mark.zoo

HEADS, DIM = 2, 8
LENGTH = 2 * CHUNK + 22  # three chunks: exercises the carry across chunks


def draw(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def visible(pattern: Pattern, query_length: int, key_length: int, padding: Tensor | None) -> Tensor:
    """[B or 1, 1, Lq, Lk] bool: which keys each query sees (s <= t in causal self attention;
    the whole source in cross attention)."""
    allowed = torch.ones(1, 1, query_length, key_length, dtype=torch.bool)
    if pattern.triangular:
        allowed = allowed & torch.ones(query_length, key_length, dtype=torch.bool).tril()
    if padding is not None:
        allowed = allowed & ~padding[:, None, None, :]
    return allowed


def pattern_inputs(pattern: Pattern, seed: int, scale: float = 1.0):
    """q, k, v and padding for a pattern: right padding in self attention, scattered padding in
    cross attention (a shorter source in non-causal cross attention, a longer one in causal)."""
    key_length = {Pattern.NONCAUSAL_CROSS: LENGTH - 40, Pattern.CAUSAL_CROSS: LENGTH + 9}.get(
        pattern, LENGTH
    )
    q = draw(2, LENGTH, HEADS, DIM, seed=seed, scale=scale)
    k = draw(2, key_length, HEADS, DIM, seed=seed + 1, scale=scale)
    v = draw(2, key_length, HEADS, DIM, seed=seed + 2)
    padding = torch.zeros(2, key_length, dtype=torch.bool)
    if pattern.cross:
        padding[0, torch.randperm(key_length, generator=torch.Generator().manual_seed(seed))[:30]] = True
    else:
        padding[1, -17:] = True
    return q, k, v, padding


def weighted_average(weights: Tensor, v: Tensor, eps: float) -> Tensor:
    """sum_s w_ts v_s / (sum_s w_ts + eps) for nonnegative weights [B, H, Lq, Lk]."""
    out = torch.einsum("bhts,bshd->bthd", weights, v)
    return out / (weights.sum(-1).transpose(1, 2)[..., None] + eps)


def log_space_average(log_weights: Tensor, allowed: Tensor, v: Tensor) -> Tensor:
    """The same with weights exp(log_weights), normalised in log space (no overflow)."""
    return torch.einsum("bhts,bshd->bthd", masked_softmax(log_weights, allowed), v)


def real_queries(pattern: Pattern, padding: Tensor) -> Tensor:
    """[B, Lq, 1, 1] mask of the query rows whose outputs mean something."""
    if pattern.cross:
        return torch.ones(padding.shape[0], LENGTH, 1, 1, dtype=torch.bool)
    return ~padding[:, :, None, None]


def assert_close(name: str, pattern: Pattern, out: Tensor, reference: Tensor, rows: Tensor) -> None:
    difference = ((out - reference) * rows).abs().max().item()
    assert difference < 1e-9, f"{name}/{pattern}: differs from its quadratic form by {difference:.3g}"


@pytest.mark.parametrize("pattern", list(Pattern), ids=str)
def test_linear_equals_its_quadratic_form(pattern):
    q, k, v, padding = pattern_inputs(pattern, seed=10)
    attention = build_attention("linear", pattern=pattern, heads=HEADS, head_dim=DIM).double()
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = torch.einsum("bthd,bshd->bhts", phi_q, phi_k)
    weights = weights * visible(pattern, q.shape[1], k.shape[1], padding)
    reference = weighted_average(weights, v, eps=1e-6)
    assert_close("linear", pattern, attention(q, k, v, padding), reference,
                 real_queries(pattern, padding))


@pytest.mark.parametrize("pattern", sorted(attention_spec("cosformer").patterns), ids=str)
def test_cosformer_equals_its_quadratic_form(pattern):
    q, k, v, padding = pattern_inputs(pattern, seed=20)
    max_length = 200
    attention = build_attention(
        "cosformer", pattern=pattern, heads=HEADS, head_dim=DIM, max_length=max_length
    ).double()
    i = torch.arange(1, q.shape[1] + 1, dtype=torch.float64)[None, :, None]  # [1, Lq, 1]
    j = torch.arange(1, k.shape[1] + 1, dtype=torch.float64)[None, None, :]
    if pattern.causal:
        scale = torch.tensor(float(max_length))
    else:  # the sequence's own length, positions counted among the real keys
        j = (~padding).cumsum(1).to(torch.float64)[:, None, :]
        real = (~padding).sum(1).to(torch.float64)[:, None, None]
        if pattern.cross:
            scale = real.clamp(min=q.shape[1])
        else:
            i, scale = j.transpose(1, 2), real
    reweight = torch.cos(math.pi / 2 * (i - j) / scale)[:, None]  # [B or 1, 1, Lq, Lk]
    weights = torch.einsum("bthd,bshd->bhts", q.relu(), k.relu()) * reweight
    weights = weights * visible(pattern, q.shape[1], k.shape[1], padding)
    reference = weighted_average(weights, v, eps=1e-6)
    assert_close("cosformer", pattern, attention(q, k, v, padding), reference,
                 real_queries(pattern, padding))


def test_cosformer_refuses_causal_sequences_longer_than_max_length():
    attention = build_attention("cosformer", pattern="causal_self", heads=HEADS, head_dim=DIM,
                                max_length=16)
    q = draw(1, 17, HEADS, DIM, seed=0)
    with pytest.raises(ValueError, match="exceeds max_length=16"):
        attention(q, q, q)


@pytest.mark.parametrize("pattern", list(Pattern), ids=str)
def test_performer_equals_its_quadratic_form(pattern):
    # Keys of the second half are three times larger: exp features span many orders of magnitude.
    q, k, v, padding = pattern_inputs(pattern, seed=30)
    k[:, k.shape[1] // 2 :] *= 3
    torch.manual_seed(0)
    attention = build_attention("performer", pattern=pattern, heads=HEADS, head_dim=DIM,
                                features=32).double()

    def log_features(x: Tensor) -> Tensor:  # log phi(x) up to a constant: [B, L, H, m]
        x = x * DIM**-0.25
        return torch.einsum("blhd,hmd->blhm", x, attention.projection) - (x * x).sum(-1)[..., None] / 2

    log_q = log_features(q).transpose(1, 2)[:, :, :, None, :]  # [B, H, Lq, 1, m]
    log_k = log_features(k).transpose(1, 2)[:, :, None, :, :]  # [B, H, 1, Lk, m]
    log_weights = torch.logsumexp(log_q + log_k, dim=-1)  # log(phi(q_t) . phi(k_s))
    allowed = visible(pattern, q.shape[1], k.shape[1], padding)
    reference = log_space_average(log_weights, allowed, v)
    assert_close("performer", pattern, attention(q, k, v, padding), reference,
                 real_queries(pattern, padding))


def lln_reference(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, pattern: Pattern,
                  block: int | None) -> Tensor:
    """LLN (+ Diag) by its definition, query by query: per-sample, per-head variances over the
    real positions (the prefix <= t when causal; key s keeps the scale of its own prefix)."""
    a, b = 0.14855178144710912, -0.35487039130661086
    batch, length = q.shape[:2]

    def variance(x: Tensor) -> Tensor:  # [S, H, D] -> [H], unbiased over positions and features
        return x.transpose(0, 1).reshape(HEADS, -1).var(dim=1)

    out = torch.zeros_like(q)
    for n in range(batch):
        keep = ~padding[n]
        query_keep = torch.ones(length, dtype=torch.bool) if pattern.cross else keep
        if pattern.causal:
            var_q = torch.stack([variance(q[n, : t + 1][query_keep[: t + 1]]) for t in range(length)])
            var_k = torch.stack([variance(k[n, : t + 1][keep[: t + 1]]) for t in range(length)])
        else:
            var_q = variance(q[n][query_keep]).expand(length, HEADS)
            var_k = variance(k[n][keep]).expand(length, HEADS)
        matched = ((var_q * var_k - b) / (2 * a)).sqrt()  # [L, H]
        alpha, beta = matched / var_q.sqrt(), matched / var_k.sqrt()
        if not pattern.causal:
            beta = beta[:1].expand(k.shape[1], HEADS)
        for t in range(length):
            seen = keep & (torch.arange(k.shape[1]) <= t) if pattern.causal else keep
            log_q = alpha[t][:, None] * q[n, t]  # [H, D]
            log_k = (beta[:, :, None] * k[n])[seen].transpose(0, 1)  # [H, S, D]
            log_w = torch.logsumexp(log_q[:, None, :] + log_k, dim=-1)  # [H, S]
            out[n, t] = torch.einsum("hs,shd->hd", torch.softmax(log_w, dim=-1), v[n][seen])
    if block is None:
        return out
    diagonal = torch.zeros_like(q)
    for t in range(length):
        start = t // block * block
        end = t + 1 if pattern.causal else min(start + block, length)
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, start:end]) / math.sqrt(DIM)
        allowed = ~padding[:, None, start:end]
        diagonal[:, t] = torch.einsum("bhs,bshd->bhd", masked_softmax(scores, allowed), v[:, start:end])
    return (out + diagonal) / 2


@pytest.mark.parametrize("pattern", sorted(attention_spec("lln").patterns), ids=str)
def test_lln_equals_its_quadratic_form(pattern):
    # Scale 12: alpha q and beta k reach thousands, where unshifted exponentials overflow.
    q, k, v, padding = pattern_inputs(pattern, seed=40, scale=12.0)
    block = None if pattern.cross else 5
    attention = build_attention(
        "lln", pattern=pattern, heads=HEADS, head_dim=DIM, block_size=block or 5
    ).double()
    reference = lln_reference(q, k, v, padding, pattern, block)
    out = attention(q, k, v, padding)
    assert torch.isfinite(out).all()
    assert_close("lln", pattern, out, reference, real_queries(pattern, padding))


@pytest.mark.parametrize("rescaled", [False, True], ids=["cumulative_sum", "rescaled_scan"])
def test_kernelized_causal_pass_equals_its_quadratic_form_with_gradients(rescaled):
    """The chunked causal pass (three chunks: the sums carried by a cumulative sum, or by the
    scan that rescales them to each chunk's running maximum) against the quadratic form, in
    float64, forward and gradients, with right padding. Key log scales span e^-50 to e^50."""
    phi_q = draw(2, LENGTH, HEADS, 6, seed=70).exp().requires_grad_()
    phi_k = torch.sigmoid(draw(2, LENGTH, HEADS, 6, seed=71)).requires_grad_()
    v = draw(2, LENGTH, HEADS, DIM, seed=72).requires_grad_()
    log_scale = draw(2, LENGTH, HEADS, seed=73, scale=20.0) if rescaled else None
    padding = torch.zeros(2, LENGTH, dtype=torch.bool)
    padding[1, -17:] = True
    eps = 0.0 if rescaled else 1e-6  # eps is added to the normaliser relative to the reference
    out = kernelized_attention(phi_q, phi_k, v, causal=True, key_valid=~padding,
                               key_log_scale=log_scale, eps=eps)
    weights = torch.einsum("bthm,bshm->bhts", phi_q, phi_k)
    if rescaled:
        weights = weights * torch.exp(log_scale - log_scale.amax(1, keepdim=True)).transpose(1, 2)[:, :, None]
    weights = weights * visible(Pattern.CAUSAL_SELF, LENGTH, LENGTH, padding)
    reference = weighted_average(weights, v, eps=eps)
    rows = real_queries(Pattern.CAUSAL_SELF, padding)
    assert_close("kernelized", Pattern.CAUSAL_SELF, out, reference, rows)
    loss_weights = draw(*out.shape, seed=74) * rows
    grads = torch.autograd.grad((out * loss_weights).sum(), [phi_q, phi_k, v])
    expected = torch.autograd.grad((reference * loss_weights).sum(), [phi_q, phi_k, v])
    for name, grad, other in zip(["phi_q", "phi_k", "v"], grads, expected, strict=True):
        difference = ((grad - other) / (other.abs() + 1)).abs().max().item()
        assert difference < 1e-9, f"gradient of {name} differs by {difference:.3g}"


@pytest.mark.parametrize("name", ["linear", "cosformer", "performer", "lln"])
def test_decoding_over_several_chunks_equals_the_parallel_pass(name):
    torch.manual_seed(0)
    attention = build_attention(name, pattern="causal_self", heads=HEADS, head_dim=DIM).double()
    q, k, v = (draw(2, LENGTH, HEADS, DIM, seed=50 + i, scale=2.0) for i in range(3))
    parallel = attention(q, k, v)
    state = attention.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(LENGTH):
        out, state = attention.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
        steps.append(out)
    difference = (torch.cat(steps, dim=1) - parallel).abs().max().item()
    assert difference < 1e-9, f"{name}: decoding differs from the parallel pass by {difference:.3g}"


def assert_prefix_unchanged(name: str, attention, q: Tensor, k: Tensor, changed: Tensor, v: Tensor,
                            position: int) -> None:
    before, after = attention(q, k, v), attention(q, changed, v)
    assert torch.isfinite(before).all() and torch.isfinite(after).all(), f"{name}: non-finite output"
    difference = (after[:, :position] - before[:, :position]).abs().max().item()
    assert difference < 1e-5, (
        f"{name}: changing the key at {position} moved earlier outputs by {difference:.3g}"
    )


# A key stabiliser taken over all keys (the official codes' max) lets one future key with a
# large feature underflow every earlier key feature in float32: the outputs before it change
# (or become 0 / 0). The running maximum used here only ever sees the prefix.


def test_performer_a_future_key_with_large_features_changes_no_earlier_output():
    torch.manual_seed(0)
    attention = build_attention("performer", pattern="causal_self", heads=HEADS, head_dim=DIM)
    q, k, v = (draw(1, 100, HEADS, DIM, seed=60 + i).float() for i in range(3))
    k = k * 15  # large keys: log features around -250 (phi <= exp(|w|^2 / 2) at |k~| = |w|)
    changed = k.clone()
    changed[:, 90] /= 15  # an ordinary key: log features around 0
    assert_prefix_unchanged("performer", attention, q, k, changed, v, 90)


def test_lln_a_loud_future_key_changes_no_earlier_output():
    attention = build_attention("lln", pattern="causal_self", heads=HEADS, head_dim=DIM)
    q, k, v = (draw(1, 100, HEADS, DIM, seed=60 + i).float() for i in range(3))
    changed = k.clone()
    changed[:, 90] *= 1000  # beta k ~ 1000 sigma~ at position 90
    assert_prefix_unchanged("lln", attention, q, k, changed, v, 90)


def relative_error_to_softmax(name: str, *, training: bool, seeds: int, length: int = 32,
                              head_dim: int = 16, scale: float = 0.5, **config) -> float:
    """Mean over seeds of |out - softmax| / |softmax| (float64, non-causal self attention).

    Each seed draws new inputs and new randomness (features at construction, samples in
    training). Queries and keys have std ``scale``, values std 1.
    """
    errors = []
    for seed in range(seeds):
        q, k = (draw(2, length, HEADS, head_dim, seed=100 * seed + i, scale=scale) for i in (1, 2))
        v = draw(2, length, HEADS, head_dim, seed=100 * seed + 3)
        torch.manual_seed(seed)
        attention = build_attention(name, pattern="noncausal_self", heads=HEADS, head_dim=head_dim,
                                    **config).double().train(training)
        reference = softmax_attention(q, k, v, causal=False)
        with torch.no_grad():
            out = attention(q, k, v)
        errors.append(((out - reference).norm() / reference.norm()).item())
    return sum(errors) / len(errors)


def assert_decreasing(name: str, counts: list[int], errors: list[float]) -> None:
    table = ", ".join(f"{c}: {e:.3f}" for c, e in zip(counts, errors))
    assert all(a > b for a, b in itertools.pairwise(errors)), f"{name}: error does not decrease ({table})"


def test_performer_approaches_softmax_as_features_grow():
    counts = [16, 64, 256, 1024]
    errors = [relative_error_to_softmax("performer", training=False, seeds=4, features=m)
              for m in counts]
    assert_decreasing("performer", counts, errors)
    # Monte Carlo: error ~ 1 / sqrt(m), so 64 times the features should cut it about 8-fold.
    assert errors[-1] < errors[0] / 3, f"performer: {errors}"
    assert errors[-1] < 0.15, f"performer: {errors}"


def test_lara_approaches_softmax_as_landmarks_grow():
    # In training every proposal draws one sample: more landmarks, more importance samples.
    counts = [1, 4, 16, 32]
    errors = [relative_error_to_softmax("lara", training=True, seeds=8, landmarks=c)
              for c in counts]
    assert_decreasing("lara", counts, errors)
    assert errors[-1] < errors[0] / 2, f"lara: {errors}"


def test_ra_is_unbiased():
    # The mean of S samples converges to softmax at rate 1 / sqrt(S); a biased estimator would
    # stall at its bias, as the deterministic evaluation plug-in does.
    counts = [16, 256, 4096]
    errors = [relative_error_to_softmax("ra", training=True, seeds=3, length=16, head_dim=DIM,
                                        scale=1.0, samples=s) for s in counts]
    assert_decreasing("ra", counts, errors)
    assert errors[-1] < errors[0] / 8, f"ra: {errors}"
    assert errors[-1] < 0.05, f"ra: {errors}"
    plug_in = relative_error_to_softmax("ra", training=False, seeds=3, length=16, head_dim=DIM,
                                        scale=1.0)
    assert errors[-1] < plug_in / 5, f"ra: {errors}, evaluation plug-in {plug_in:.3f}"


def attention_log_weight_variance(name: str, q: Tensor, k: Tensor, **config) -> float:
    """Mean over queries of the variance of log attention weights, read off the mechanism by
    attending to one-hot values (head_dim keys, v = identity: row t of out is row t of A)."""
    _, length, heads, dim = k.shape
    attention = build_attention(name, pattern="noncausal_self", heads=heads, head_dim=dim,
                                **config).double()
    v = torch.eye(length, dtype=torch.float64)[None, :, None, :].expand(1, length, heads, dim)
    weights = attention(q, k, v)  # [1, L, H, L]
    return weights.log().var(dim=-1).mean().item()


@pytest.mark.parametrize(("q_std", "k_std"), [(1.0, 1.0), (1.5, 1.0), (1.5, 1.5), (2.0, 1.5)])
def test_lln_matches_the_variance_of_softmax_log_weights(q_std, k_std):
    # The paper's claim: with alpha, beta from moment matching, log(exp(alpha q) . exp(beta k))
    # has the variance of the softmax logits, s_q^2 s_k^2 (the constants a, b are fitted at
    # head dim 64, BERT's). Without it (alpha = beta = 1) the variance is far too small.
    dim = 64
    q = draw(1, dim, 2, dim, seed=70, scale=q_std)
    k = draw(1, dim, 2, dim, seed=71, scale=k_std)
    softmax_variance = attention_log_weight_variance("softmax", q, k)
    lln_variance = attention_log_weight_variance("lln", q, k, diagonal=False)
    target = (q_std * k_std) ** 2
    assert softmax_variance == pytest.approx(target, rel=0.25)
    assert lln_variance == pytest.approx(softmax_variance, rel=0.3)
    unmatched = torch.logsumexp(q[0, :, :, None, :].transpose(0, 1) + k[0].transpose(0, 1)[:, None],
                                dim=-1).var(dim=-1).mean().item()
    assert unmatched < softmax_variance / 4
