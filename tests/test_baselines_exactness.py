"""Each baseline against what it claims: a float64 reference of its definition, or softmax.

The references here are written query by query (or token by token) from the papers' formulas,
independently of the vectorised implementations they check.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attention_zoo import AttentionConfigError, MultiHeadAttention, Pattern, attention_spec
from attention_zoo.mechanisms.softmax import softmax_attention
from attention_zoo.testing import build_for_test, random_inputs

pytestmark = pytest.mark.zoo

SELF_PATTERNS = [Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF]


def _right_padding(batch: int, length: int, pad: int) -> torch.Tensor:
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[-1, length - pad :] = True
    return padding


def _softmax_row(query, keys, values):
    """softmax(q . k_s / sqrt(D)) v for one query over a list of keys: [D], [n, D], [n, D]."""
    if keys.shape[0] == 0:
        return torch.zeros_like(query)
    weights = torch.softmax(keys @ query / math.sqrt(query.shape[-1]), dim=0)
    return weights @ values


# local -------------------------------------------------------------------------------------

def local_reference(q, k, v, *, window, kind, causal, key_padding_mask):
    batch, q_len, heads, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(q_len):
            if kind == "sliding":
                keys = [s for s in range(k.shape[1]) if (t - window < s <= t if causal
                                                          else abs(t - s) < window)]
            else:
                keys = [s for s in range(k.shape[1])
                        if s // window == t // window and (not causal or s <= t)]
            keys = [s for s in keys if key_padding_mask is None or not key_padding_mask[b, s]]
            for h in range(heads):
                out[b, t, h] = _softmax_row(q[b, t, h], k[b, keys, h], v[b, keys, h])
    return out


@pytest.mark.parametrize("pattern", SELF_PATTERNS)
@pytest.mark.parametrize(("kind", "window"), [("sliding", 1), ("sliding", 3), ("blocked", 4)])
def test_local_matches_loop_reference(pattern, kind, window):
    attention = build_for_test("local", pattern, window=window, kind=kind)
    q, k, v = random_inputs(2, 11, 11)
    padding = _right_padding(2, 11, 3)
    padding[0, 1] = True  # a hole inside a window as well
    expected = local_reference(q, k, v, window=window, kind=kind, causal=pattern.causal,
                               key_padding_mask=padding)
    torch.testing.assert_close(attention(q, k, v, padding), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", SELF_PATTERNS)
@pytest.mark.parametrize("kind", ["sliding", "blocked"])
def test_local_with_a_window_covering_everything_is_softmax(pattern, kind):
    q, k, v = random_inputs(2, 12, 12)
    padding = _right_padding(2, 12, 4)
    out = build_for_test("local", pattern, window=12, kind=kind)(q, k, v, padding)
    expected = softmax_attention(q, k, v, causal=pattern.causal, key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# s4d ---------------------------------------------------------------------------------------

def s4d_recurrent_reference(attention, q, k, v, key_padding_mask):
    """The SSM run as a recurrence, token by token (backwards too when non-causal)."""
    modes = attention.config.state_size // 2
    a = torch.complex(-torch.exp(attention.log_a_real), attention.a_imag)  # [H, D, N/2]
    a_bar = torch.exp(torch.exp(attention.log_dt)[..., None] * a)
    b_bar = (a_bar - 1) / a
    u = torch.sigmoid(k) * v
    if key_padding_mask is not None:
        u = u * ~key_padding_mask[:, :, None, None]

    def run(c, inputs):
        x = torch.zeros(*inputs.shape[:1], *inputs.shape[2:], modes, dtype=torch.complex128)
        outputs = []
        for t in range(inputs.shape[1]):
            x = a_bar * x + b_bar * inputs[:, t, ..., None]
            outputs.append(2 * (torch.view_as_complex(c) * x).sum(-1).real)
        return torch.stack(outputs, 1)

    y = run(attention.c_forward, u) + attention.skip * u
    if attention.c_backward is not None:
        y = y + run(attention.c_backward, u.flip(1)).flip(1)
    return torch.sigmoid(q) * y


@pytest.mark.parametrize("pattern", SELF_PATTERNS)
def test_s4d_convolution_equals_recurrence(pattern):
    attention = build_for_test("s4d", pattern, state_size=8)
    q, k, v = random_inputs(2, 23, 23)
    padding = _right_padding(2, 23, 5)
    with torch.no_grad():
        expected = s4d_recurrent_reference(attention, q, k, v, padding)
        torch.testing.assert_close(attention(q, k, v, padding), expected, rtol=0, atol=1e-10)


def test_s4d_steps_equal_the_convolution_in_float32():
    attention = build_for_test("s4d", Pattern.CAUSAL_SELF, dtype=torch.float32)
    q, k, v = random_inputs(1, 64, 64, dtype=torch.float32)
    parallel = attention(q, k, v)
    state = attention.init_state(1, dtype=torch.float32)
    steps = []
    for t in range(64):
        out, state = attention.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("config", "message"), [
    ({"state_size": 7}, "state_size must be even"),
    ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min <= dt_max"),
])
def test_s4d_rejects_inconsistent_settings(config, message):
    with pytest.raises(AttentionConfigError, match=message):
        build_for_test("s4d", Pattern.CAUSAL_SELF, **config)


# abc ---------------------------------------------------------------------------------------

def abc_reference(attention, q, k, v, *, causal, key_padding_mask):
    """ABC's definition per query: a slot-wise softmax control over the visible keys."""
    batch, q_len, heads, dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(q_len):
            keys = [s for s in range(k.shape[1]) if (not causal or s <= t)
                    and (key_padding_mask is None or not key_padding_mask[b, s])]
            if not keys:
                continue
            for h in range(heads):
                control = torch.softmax(k[b, keys, h] @ attention.control[h].T, dim=0)  # [s, n]
                memory_keys = control.T @ k[b, keys, h]  # [n, D]
                memory_values = control.T @ v[b, keys, h]
                read = torch.softmax(memory_keys @ q[b, t, h] / math.sqrt(dim), dim=0)
                out[b, t, h] = read @ memory_values
    return out


@pytest.mark.parametrize("pattern", list(Pattern))
@pytest.mark.parametrize("chunk_size", [4, 32])
def test_abc_matches_its_definition(pattern, chunk_size):
    attention = build_for_test("abc", pattern, slots=5)
    attention.chunk_size = chunk_size  # several chunks, or one
    q_len, k_len = (13, 10) if pattern.cross else (14, 14)
    q, k, v = random_inputs(2, q_len, k_len)
    padding = _right_padding(2, k_len, 3)
    if pattern.cross:
        padding[0, 2] = True
    with torch.no_grad():
        expected = abc_reference(attention, q, k, v, causal=pattern.triangular,
                                 key_padding_mask=padding)
        torch.testing.assert_close(attention(q, k, v, padding), expected, rtol=0, atol=1e-12)


def test_abc_causal_is_stable_with_extreme_control_logits():
    attention = build_for_test("abc", Pattern.CAUSAL_SELF, dtype=torch.float32, slots=4)
    attention.chunk_size = 8
    q, k, v = random_inputs(1, 40, 40, dtype=torch.float32)
    with torch.no_grad():
        attention.control.mul_(200.0)  # logits in the thousands: exp() alone would overflow
        out = attention(q, k, v)
        expected = abc_reference(attention.double(), q.double(), k.double(), v.double(),
                                 causal=True, key_padding_mask=None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def assert_same_gradients(name, attention, ours, reference, leaves, rows) -> None:
    """Gradients of a weighted sum over the real query rows ([B, Lq, 1, 1] bool) agree in float64."""
    weights = torch.randn(ours.shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(11)) * rows
    leaves = [*leaves, *attention.parameters()]
    grads = torch.autograd.grad((ours * weights).sum(), leaves, allow_unused=True)
    expected = torch.autograd.grad((reference * weights).sum(), leaves, allow_unused=True)
    for index, (grad, other) in enumerate(zip(grads, expected, strict=True)):
        if grad is None or other is None:
            assert grad is None and other is None, f"{name}: only one side reaches leaf {index}"
            continue
        torch.testing.assert_close(grad, other, rtol=0, atol=1e-10,
                                   msg=lambda m, i=index: f"{name}: gradient of leaf {i}: {m}")


@pytest.mark.parametrize("chunk_size", [4, 5, 32])
def test_abc_causal_gradients_match_its_definition(chunk_size):
    """The chunked recurrences of the causal pass (lengths no multiple of the chunk) give the
    definition's gradients for q, k, v and the control."""
    attention = build_for_test("abc", Pattern.CAUSAL_SELF, slots=5)
    attention.chunk_size = chunk_size
    q, k, v = (x.requires_grad_() for x in random_inputs(2, 14, 14))
    padding = _right_padding(2, 14, 3)
    out = attention(q, k, v, padding)
    expected = abc_reference(attention, q, k, v, causal=True, key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert_same_gradients("abc", attention, out, expected, [q, k, v], ~padding[:, :, None, None])


# nystrom -----------------------------------------------------------------------------------

def _smooth_sequences(length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [1, L, 2, 8] made of a few low-frequency sinusoids along the sequence: the kind
    of input whose segment means summarise it well, where Nystrom's landmarks are meant to work."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length, dtype=torch.float64)[None, :, None, None]

    def draw():
        frequency, phase, amplitude = (
            torch.rand(1, 1, 2, 8, generator=generator, dtype=torch.float64) * 3,
            torch.rand(1, 1, 2, 8, generator=generator, dtype=torch.float64) * 2 * math.pi,
            torch.randn(1, 1, 2, 8, generator=generator, dtype=torch.float64),
        )
        return amplitude * torch.sin(2 * math.pi * frequency * t + phase)

    return draw(), draw(), draw()


def test_nystrom_with_a_landmark_per_token_is_softmax():
    q, k, v = random_inputs(2, 32, 32)
    padding = _right_padding(2, 32, 5)
    attention = build_for_test("nystrom", Pattern.NONCAUSAL_SELF, landmarks=32, pinv_iterations=40)
    expected = softmax_attention(q, k, v, causal=False, key_padding_mask=padding)
    torch.testing.assert_close(attention(q, k, v, padding)[0], expected[0], rtol=0, atol=1e-9)
    # The padded sample has 27 tokens: 27 of the 32 landmarks are used, one per token.
    torch.testing.assert_close(attention(q, k, v, padding)[1, :27], expected[1, :27],
                               rtol=0, atol=1e-9)


def test_nystrom_error_decreases_with_landmarks():
    q, k, v = _smooth_sequences(64, seed=0)
    expected = softmax_attention(q, k, v, causal=False)
    errors = []
    for landmarks in (2, 4, 8, 16, 32, 64):
        attention = build_for_test("nystrom", Pattern.NONCAUSAL_SELF, landmarks=landmarks,
                                   pinv_iterations=20)
        out = attention(q, k, v)
        errors.append(((out - expected).norm() / expected.norm()).item())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-5, errors


def test_nystrom_pinv_converges_to_the_inverse():
    from attention_zoo.mechanisms.nystrom import iterative_pinv

    matrix = torch.softmax(torch.randn(3, 10, 10, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(matrix, 40), torch.linalg.inv(matrix),
                               rtol=1e-8, atol=1e-8)


# probsparse --------------------------------------------------------------------------------

def _budget(n: int, factor: int) -> int:
    return min(n, factor * max(1, math.ceil(math.log(n)))) if n > 0 else 0


def probsparse_reference(q, k, v, *, factor, pattern, key_padding_mask):
    """Informer's ProbSparse rule, query by query, with the zoo's stratified key samples."""
    batch, q_len, heads, dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        valid = [s for s in range(k.shape[1]) if not key_padding_mask[b, s]]
        seen = [[s for s in valid if not pattern.causal or s <= t] for t in range(q_len)]
        candidates = [t for t in range(q_len)
                      if seen[t] and (pattern.cross or not key_padding_mask[b, t])]
        for h in range(heads):
            measure = {}
            for t in candidates:
                n, m = len(seen[t]), _budget(len(seen[t]), factor)
                sampled = [seen[t][math.floor((j + 0.5) * n / m)] for j in range(m)]
                scores = k[b, sampled, h] @ q[b, t, h] / math.sqrt(dim)
                measure[t] = (scores.max() - scores.mean()).item()
            for t in range(q_len):
                if not seen[t]:
                    continue
                if pattern.causal:
                    prefix = [s for s in candidates if s <= t]
                    larger = sum(measure[s] > measure.get(t, math.inf) for s in prefix)
                    active = t in measure and larger < _budget(len(prefix), factor)
                else:
                    ranked = sorted(candidates, key=lambda s: -measure[s])
                    active = t in ranked[: _budget(len(candidates), factor)]
                keys = seen[t]
                if active:
                    out[b, t, h] = _softmax_row(q[b, t, h], k[b, keys, h], v[b, keys, h])
                else:
                    out[b, t, h] = v[b, keys, h].mean(dim=0)
    return out


@pytest.mark.parametrize("pattern", sorted(attention_spec("probsparse").patterns))
@pytest.mark.parametrize("factor", [1, 2])
def test_probsparse_matches_its_definition(pattern, factor):
    attention = build_for_test("probsparse", pattern, factor=factor)
    q_len, k_len = (19, 16) if pattern.cross else (21, 21)
    q, k, v = random_inputs(2, q_len, k_len)
    padding = _right_padding(2, k_len, 4)
    if pattern == Pattern.NONCAUSAL_CROSS:
        padding[0, 3] = True
    expected = probsparse_reference(q, k, v, factor=factor, pattern=pattern,
                                    key_padding_mask=padding)
    out = attention(q, k, v, padding)
    if not pattern.cross:  # outputs at padded query positions are meaningless
        out[1, k_len - 4 :], expected[1, k_len - 4 :] = 0, 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pattern", sorted(attention_spec("probsparse").patterns))
def test_probsparse_with_every_query_active_is_softmax(pattern):
    q_len, k_len = (12, 15) if pattern.cross else (14, 14)
    q, k, v = random_inputs(2, q_len, k_len)
    padding = _right_padding(2, k_len, 3)
    attention = build_for_test("probsparse", pattern, factor=k_len)
    expected = softmax_attention(q, k, v, causal=pattern.triangular, key_padding_mask=padding)
    out = attention(q, k, v, padding)
    if not pattern.cross:
        out, expected = out[:, : k_len - 3], expected[:, : k_len - 3]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_probsparse_samples_keys_at_random_only_in_training():
    attention = build_for_test("probsparse", Pattern.NONCAUSAL_SELF, factor=1)
    q, k, v = random_inputs(1, 200, 200)
    assert torch.equal(attention(q, k, v), attention(q, k, v))
    attention.train()
    assert not torch.equal(attention(q, k, v), attention(q, k, v))


# longshort ---------------------------------------------------------------------------------

def longshort_reference(attention, q, k, v, *, causal, key_padding_mask):
    """Transformer-LS per query: window tokens and projected tokens under one softmax."""
    config = attention.config
    batch, length, heads, dim = q.shape

    def norm(module, x):
        return torch.nn.functional.layer_norm(x, (dim,), module.weight, module.bias, module.eps)

    def project(b, h, positions):  # dynamic projection of the given positions: [r, D] twice
        positions = [s for s in positions if s < length and not key_padding_mask[b, s]]
        weights = torch.softmax(k[b, positions, h] @ attention.projection[h], dim=0)  # [s, r]
        return weights.T @ k[b, positions, h], weights.T @ v[b, positions, h]

    out = torch.zeros_like(q)
    w, half = config.window, config.window // 2
    for b in range(batch):
        for h in range(heads):
            if causal:
                segments = [range(start, start + config.segment)
                            for start in range(0, length, config.segment)]
            else:
                segments = [range(length)]
            projected = {segment: project(b, h, segment) for segment in segments}
            for t in range(length):
                if causal:
                    window = [s for s in range(t - w + 1, t + 1) if s >= 0]
                    seen = [p for p in segments if p[-1] <= t]
                else:
                    start = (t // w) * w
                    window = [s for s in range(start - half, start + w + half) if 0 <= s < length]
                    seen = segments
                window = [s for s in window if not key_padding_mask[b, s]]
                keys = [norm(attention.norm_short, k[b, window, h])]
                values = [norm(attention.norm_short, v[b, window, h])]
                for segment in seen:
                    projected_keys, projected_values = projected[segment]
                    keys.append(norm(attention.norm_long, projected_keys))
                    values.append(norm(attention.norm_long, projected_values))
                out[b, t, h] = _softmax_row(q[b, t, h], torch.cat(keys), torch.cat(values))
    return out


@pytest.mark.parametrize("pattern", SELF_PATTERNS)
@pytest.mark.parametrize("config", [
    {"window": 4, "rank": 3, "segment": 3, "segment_rank": 2},
    {"window": 5, "rank": 1, "segment": 4, "segment_rank": 1},
])
def test_longshort_matches_its_definition(pattern, config):
    attention = build_for_test("longshort", pattern, **config)
    q, k, v = random_inputs(2, 14, 14)
    padding = _right_padding(2, 14, 4)
    with torch.no_grad():
        expected = longshort_reference(attention, q, k, v, causal=pattern.causal,
                                       key_padding_mask=padding)
        out = attention(q, k, v, padding)
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :10], expected[1, :10], rtol=0, atol=1e-12)


def test_longshort_causal_gradients_match_its_definition():
    """The causal joint read (the window folded into the fused kernel as a sink key) gives the
    definition's gradients, padding and projection parameters included."""
    config = {"window": 4, "rank": 3, "segment": 3, "segment_rank": 2}
    attention = build_for_test("longshort", Pattern.CAUSAL_SELF, **config)
    q, k, v = (x.requires_grad_() for x in random_inputs(2, 14, 14))
    padding = _right_padding(2, 14, 4)
    out = attention(q, k, v, padding)
    expected = longshort_reference(attention, q, k, v, causal=True, key_padding_mask=padding)
    rows = ~padding[:, :, None, None]
    torch.testing.assert_close(out * rows, expected * rows, rtol=0, atol=1e-12)
    assert_same_gradients("longshort", attention, out, expected, [q, k, v], rows)


# lara ---------------------------------------------------------------------------------------

def lara_reference(q, k, v, *, landmarks, real, query_axis=True):
    """LARA in evaluation (omega_c = mu_c) as the authors' "mis-opt" code computes it, one
    sample and head at a time over its ``real`` first positions: t_cn is a softmax over the
    queries n (``query_axis=False``: over the landmarks c instead), centred on its mean over the
    landmarks. Returns [B, L, H, D] (zeros at padded positions)."""
    out = torch.zeros_like(q)
    dim = q.shape[-1]
    for b in range(q.shape[0]):
        n = int(real[b])
        segment = torch.arange(n) * landmarks // n
        used = sorted(set(segment.tolist()))  # non-empty landmarks
        for h in range(q.shape[2]):
            qs, ks, vs = q[b, :n, h] * dim**-0.25, k[b, :n, h] * dim**-0.25, v[b, :n, h]
            q_bar = torch.stack([qs[segment == c].mean(0) for c in used])  # [C, D]
            mu = q_bar + torch.stack([ks[segment == c].mean(0) for c in used])

            def log_xi(x, w):  # [X, D], [C, D] -> [C, X]
                return w @ x.T - (x * x).sum(-1) / 2

            log_k = log_xi(ks, mu)
            f = torch.softmax(log_k, dim=-1) @ vs  # [C, D]
            log_mu = log_xi(mu, mu)  # [C (sample), C (proposal)]
            log_proposal = torch.diagonal(log_mu)[:, None]
            balance = torch.exp(log_proposal - torch.logsumexp(log_mu, dim=-1, keepdim=True))
            t = torch.softmax(q_bar @ qs.T, dim=-1 if query_axis else 0)  # [C, N]
            alpha = balance + t - t.mean(0, keepdim=True)
            log_ratio = (torch.log(alpha.clamp(min=1e-8)) + log_xi(qs, mu)
                         + torch.logsumexp(log_k, dim=-1, keepdim=True) - log_proposal)
            out[b, :n, h] = torch.softmax(log_ratio, dim=0).T @ f
    return out


@pytest.mark.parametrize("landmarks", [3, 4, 16])  # 16 > the shorter sample: empty landmarks
def test_lara_matches_the_authors_computation(landmarks):
    attention = build_for_test("lara", Pattern.NONCAUSAL_SELF, landmarks=landmarks)
    q, k, v = random_inputs(2, 14, 14)
    padding = _right_padding(2, 14, 4)
    real = (~padding).sum(1)
    with torch.no_grad():
        out = attention(q, k, v, padding)
        expected = lara_reference(q, k, v, landmarks=landmarks, real=real)
        other_axis = lara_reference(q, k, v, landmarks=landmarks, real=real, query_axis=False)
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :10], expected[1, :10], rtol=0, atol=1e-12)
    # The test tells the axes apart: t_nc normalised over the landmarks gives another output.
    assert (other_axis[0] - expected[0]).abs().max() > 1e-3


# through the multi-head layer the backbones use --------------------------------------------

@pytest.mark.parametrize(("name", "config"), [
    ("local", {"window": 3}), ("local", {"window": 4, "kind": "blocked"}),
    ("abc", {"slots": 4}), ("s4d", {}),
    ("longshort", {"window": 3, "segment": 4, "segment_rank": 2}),
])
def test_layer_decoding_equals_parallel(name, config):
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2, name, pattern="causal_self", attention_args=config).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    parallel = layer(x)
    state = layer.init_state(2, dtype=torch.float64)
    steps = []
    for t in range(11):
        out, state = layer.step(x[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=0, atol=1e-10)
