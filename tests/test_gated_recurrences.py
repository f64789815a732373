"""retnet, gla, mamba2, deltanet, gated_deltanet, hgrn2 and based against flash-linear-attention's
plain PyTorch references (``fla/ops/*/naive.py`` of the installed ``fla-core``), in float64,
forward and gradients.

fla's references cast to float32 internally (they are written for half-precision inputs); the
tests run them with float32 read as float64 (:func:`float64_references`), so both sides are
float64 and the tolerance can be tight. The contract (shapes, causality, padding, decoding) is
checked for every mechanism by tests/test_contract.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attention_zoo import AttentionConfigError, Pattern, build_attention
from attention_zoo.mechanisms.chunk_scan import carried_states
from attention_zoo.mechanisms.deltanet import delta_features
from attention_zoo.mechanisms.gated_recurrence import (
    Recurrence,
    RecurrentState,
    chunked_delta_rule,
    chunked_gated_recurrence,
    chunked_value_gated_recurrence,
    recurrent_step,
)
from attention_zoo.testing import random_layer_input

pytestmark = pytest.mark.zoo

needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                               reason="fla-core is not installed (pip install fla-core)")

TOLERANCE = 1e-10
BATCH, LENGTH, HEADS, HEAD_DIM = 2, 19, 2, 8


@contextlib.contextmanager
def float64_references() -> Iterator[None]:
    """Run fla's references with float32 read as float64 (their casts become no-ops on float64)."""
    with mock.patch.object(torch, "float32", torch.float64), \
            mock.patch.object(torch, "float", torch.float64), \
            mock.patch.object(torch.Tensor, "float", torch.Tensor.double):
        yield


def reference(module: str, function: str) -> Callable[..., object]:
    return getattr(importlib.import_module(f"fla.ops.{module}.naive"), function)


def head_major(*tensors: Tensor) -> tuple[Tensor, ...]:
    """[B, L, H, D] -> [B, H, L, D] (the layout of the older references)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def retnet_reference(attention, q, k, v, layer_input) -> Tensor:
    out = reference("retention", "naive_retention")(*head_major(q, k, v))
    return out.transpose(1, 2)


def gla_reference(attention, q, k, v, layer_input) -> Tensor:
    log_alpha = attention.recurrence(q, k, v, layer_input).log_decay
    return reference("gla", "naive_recurrent_gla")(q, k, v, log_alpha)[0]


def mamba2_reference(attention, q, k, v, layer_input) -> Tensor:
    terms = attention.recurrence(q, k, v, layer_input)  # C = q, Delta B = k, x = v, Delta A
    return reference("simple_gla", "naive_recurrent_simple_gla")(
        terms.q, terms.k, terms.v, terms.log_decay, scale=1.0)[0]


def deltanet_reference(attention, q, k, v, layer_input) -> Tensor:
    beta = attention.recurrence(q, k, v, layer_input).beta
    out, _ = reference("delta_rule", "delta_rule_recurrence")(
        *head_major(delta_features(q), delta_features(k), v, beta[..., None]))
    return out.transpose(1, 2)


def gated_deltanet_reference(attention, q, k, v, layer_input) -> Tensor:
    terms = attention.recurrence(q, k, v, layer_input)
    return reference("gated_delta_rule", "naive_recurrent_gated_delta_rule")(
        delta_features(q), delta_features(k), v, terms.beta, terms.log_decay)[0]


def hgrn2_reference(attention, q, k, v, layer_input) -> Tensor:
    forget = torch.sigmoid(k)  # HGRN2: f = sigmoid(f_proj x), input gate 1 - f, g = log f
    return reference("gla", "naive_recurrent_gla")(F.silu(q), 1 - forget, v, forget.log())[0]


def based_reference(attention, q, k, v, layer_input) -> Tensor:
    q_features, k_features = attention.features(q, k)
    out = reference("based", "naive_parallel_based")(*head_major(q_features, k_features, v))
    return out.transpose(1, 2)


def recurrence_read(attention, q, k, v, layer_input) -> Tensor:
    """The mechanism's chunked PyTorch form before its output normalisation."""
    return attention.run(attention.recurrence(q, k, v, layer_input))


def based_read(attention, q, k, v, layer_input) -> Tensor:
    return attention.taylor_read(q, k, v, None)


CASES = {
    "retnet": ({"chunk_size": 8}, recurrence_read, retnet_reference),
    "gla": ({"chunk_size": 4}, recurrence_read, gla_reference),
    "mamba2": ({"chunk_size": 8}, recurrence_read, mamba2_reference),
    "deltanet": ({"chunk_size": 8}, recurrence_read, deltanet_reference),
    "gated_deltanet": ({"chunk_size": 8}, recurrence_read, gated_deltanet_reference),
    "hgrn2": ({"chunk_size": 4}, recurrence_read, hgrn2_reference),
    "based": ({"feature_dim": 4}, based_read, based_reference),
}


def _build(name: str, config: dict, pattern: Pattern = Pattern.CAUSAL_SELF):
    torch.manual_seed(0)
    attention = build_attention(name, pattern=pattern, heads=HEADS, head_dim=HEAD_DIM,
                                backend="torch", **config).double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0.0, 0.5)
    return attention


def _inputs() -> tuple[Tensor, Tensor, Tensor, object, Tensor]:
    """q, k, v [B, L, H, D] computed from a layer input x [B, L, E] (a gradient leaf)."""
    _, _, _, layer_input = random_layer_input(BATCH, LENGTH, LENGTH, input_dim=HEADS * HEAD_DIM,
                                              heads=HEADS, head_dim=HEAD_DIM)
    x = layer_input.query.clone().requires_grad_()
    layer_input = type(layer_input)(query=x, source=x, q_proj=layer_input.q_proj,
                                    k_proj=layer_input.k_proj, v_proj=layer_input.v_proj)

    def split(t: Tensor) -> Tensor:
        return t.view(BATCH, LENGTH, HEADS, HEAD_DIM)

    q, k, v = (split(p(x)) for p in (layer_input.q_proj, layer_input.k_proj, layer_input.v_proj))
    return q, k, v, layer_input, x


@needs_fla
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_fla_reference_forward_and_gradients(name):
    config, ours, theirs = CASES[name]
    attention = _build(name, config)
    q, k, v, layer_input, x = _inputs()
    leaves = [x, *attention.parameters()]
    weights = torch.randn(BATCH, LENGTH, HEADS, HEAD_DIM, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    out = ours(attention, q, k, v, layer_input)
    with float64_references():
        expected = theirs(attention, q, k, v, layer_input)
    assert out.dtype == expected.dtype == torch.float64
    assert (out - expected).abs().max().item() < TOLERANCE, f"{name}: forward differs from fla's"
    # allow_unused: parameters applied after the read (mamba2's skip) get no gradient on either side
    grads = torch.autograd.grad((out * weights).sum(), leaves, retain_graph=True, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves, allow_unused=True)
    for leaf_name, ours_grad, theirs_grad in zip(["x", *dict(attention.named_parameters())],
                                                 grads, expected_grads):
        if ours_grad is None or theirs_grad is None:
            assert ours_grad is theirs_grad, f"{name}: only one side reaches {leaf_name}"
            continue
        difference = (ours_grad - theirs_grad).abs().max().item()
        assert difference < TOLERANCE, f"{name}: gradient of {leaf_name} differs by {difference:.3g}"


def _random_terms(delta: bool, per_channel: bool) -> Recurrence:
    generator = torch.Generator().manual_seed(4)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = draw(BATCH, LENGTH, HEADS, 6), draw(BATCH, LENGTH, HEADS, 6), draw(BATCH, LENGTH, HEADS, 5)
    decay_shape = (BATCH, LENGTH, HEADS, 6) if per_channel else (BATCH, LENGTH, HEADS)
    log_decay = F.logsigmoid(draw(*decay_shape))
    if delta:
        return Recurrence(q, F.normalize(k, dim=-1), v, log_decay,
                          torch.sigmoid(draw(BATCH, LENGTH, HEADS)))
    return Recurrence(q, k, v, log_decay)


@needs_fla
@pytest.mark.parametrize(("delta", "per_channel"), [(False, False), (False, True), (True, False)])
def test_chunked_forms_carry_a_given_state(delta, per_channel):
    """From an initial state, the chunked forms give fla's outputs and final state."""
    terms = _random_terms(delta, per_channel)
    initial = torch.randn(BATCH, HEADS, 6, 5, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(5))
    chunked = chunked_delta_rule if delta else chunked_gated_recurrence
    out, final = chunked(terms, chunk_size=7, initial_state=initial)
    with float64_references():
        if delta:
            expected, expected_final = reference("gated_delta_rule", "naive_recurrent_gated_delta_rule")(
                terms.q, terms.k, terms.v, terms.beta, terms.log_decay, scale=1.0,
                initial_state=initial, output_final_state=True)
        elif per_channel:
            expected, expected_final = reference("gla", "naive_recurrent_gla")(
                terms.q * math.sqrt(6), terms.k, terms.v, terms.log_decay,  # it scales by 6^-0.5
                initial_state=initial, output_final_state=True)
        else:
            expected, expected_final = reference("simple_gla", "naive_recurrent_simple_gla")(
                terms.q, terms.k, terms.v, terms.log_decay, scale=1.0, initial_state=initial,
                output_final_state=True)
    assert (out - expected).abs().max().item() < TOLERANCE
    assert (final - expected_final).abs().max().item() < TOLERANCE


def test_bidirectional_retention_is_the_symmetric_decay():
    """Non-causal retnet: out_t = norm(sum_s gamma^|t - s| (q_t . k_s / sqrt(D)) v_s)."""
    attention = _build("retnet", {"chunk_size": 4}, Pattern.NONCAUSAL_SELF)
    q, k, v, _, _ = _inputs()
    gamma = 1 - 2.0 ** (-5 - torch.arange(HEADS, dtype=torch.float64))
    positions = torch.arange(LENGTH, dtype=torch.float64)
    decay = gamma[:, None, None] ** (positions[:, None] - positions[None, :]).abs()  # [H, L, L]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HEAD_DIM) * decay
    dense = torch.einsum("bhts,bshd->bthd", scores, v)
    expected = F.rms_norm(dense, (HEAD_DIM,), eps=1e-6)
    assert (attention(q, k, v) - expected).abs().max().item() < TOLERANCE


@needs_fla
@pytest.mark.parametrize("name", sorted(CASES))
def test_fla_backend_off_cuda_is_a_clear_error(name):
    attention = build_attention(name, pattern="causal_self", heads=HEADS, head_dim=HEAD_DIM,
                                backend="fla")
    q, k, v, layer_input, _ = _inputs()
    q, k, v = (t.float().detach() for t in (q, k, v))
    layer_input = type(layer_input)(query=layer_input.query.float().detach(),
                                    source=layer_input.query.float().detach(),
                                    q_proj=layer_input.q_proj, k_proj=layer_input.k_proj,
                                    v_proj=layer_input.v_proj)
    with pytest.raises(ValueError, match="backend='fla' cannot run this call"):
        attention(q, k, v, layer_input=layer_input)


def test_fla_backend_without_fla_is_a_config_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fla" else real_find_spec(name, *args))
    with pytest.raises(AttentionConfigError, match="pip install fla-core"):
        build_attention("gla", pattern="causal_self", heads=HEADS, head_dim=HEAD_DIM, backend="fla")


# The chunked cores against the token-by-token recurrence (no fla needed) ---------------------

FORMS = ("scalar", "per_channel", "value_channel", "delta", "gated_delta")


def _terms_for(form: str, length: int, dtype: torch.dtype = torch.float64, *,
               decay_scale: float = 1.0) -> Recurrence:
    """Random terms of one form: q, k [2, L, 2, 6], v [2, L, 2, 5], its decay and write strength."""
    generator = torch.Generator().manual_seed(7)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q, k, v = draw(2, length, 2, 6), draw(2, length, 2, 6), draw(2, length, 2, 5)
    decay_channels = {"per_channel": (6,), "value_channel": (5,)}.get(form, ())
    log_decay = F.logsigmoid(draw(2, length, 2, *decay_channels)) * decay_scale
    if form in ("delta", "gated_delta"):
        beta = torch.sigmoid(draw(2, length, 2))
        return Recurrence(q, F.normalize(k, dim=-1), v,
                          log_decay if form == "gated_delta" else None, beta)
    return Recurrence(q, k, v, log_decay)


def _recurrent(form: str, terms: Recurrence, initial: Tensor) -> tuple[Tensor, Tensor]:
    """The definition, one token at a time: outputs [B, L, H, V] and the final state."""
    if form != "value_channel":
        state, outputs = RecurrentState(initial), []
        for t in range(terms.q.shape[1]):
            step = Recurrence(*(None if x is None else x[:, t : t + 1] for x in (
                terms.q, terms.k, terms.v, terms.log_decay, terms.beta)))
            out, state = recurrent_step(step, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1), state.memory
    memory, outputs = initial, []  # S_t = S_{t-1} diag(exp(g_t)) + k_t v_t^T
    for t in range(terms.q.shape[1]):
        memory = memory * torch.exp(terms.log_decay[:, t])[:, :, None, :]
        memory = memory + terms.k[:, t, :, :, None] * terms.v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", terms.q[:, t], memory)[:, None])
    return torch.cat(outputs, dim=1), memory


def _chunked(form: str, terms: Recurrence, chunk: int, initial: Tensor) -> tuple[Tensor, Tensor]:
    function = {"value_channel": chunked_value_gated_recurrence, "delta": chunked_delta_rule,
                "gated_delta": chunked_delta_rule}.get(form, chunked_gated_recurrence)
    return function(terms, chunk_size=chunk, initial_state=initial)


@pytest.mark.parametrize("chunk", [1, 3, 8, 16])
@pytest.mark.parametrize("form", FORMS)
def test_chunked_cores_equal_the_recurrence_forward_state_and_gradients(form, chunk):
    """Lengths 19 and 37 are no multiple of any chunk; 16 > 8 pads a chunk to a power of two."""
    for length in (19, 37):
        terms = _terms_for(form, length)
        leaves = [t.requires_grad_() for t in (terms.q, terms.k, terms.v, terms.log_decay,
                                               terms.beta) if t is not None]
        initial = torch.randn(2, 2, 6, 5, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(8)).requires_grad_()
        out, final = _chunked(form, terms, chunk, initial)
        expected, expected_final = _recurrent(form, terms, initial)
        assert (out - expected).abs().max().item() < TOLERANCE
        assert (final - expected_final).abs().max().item() < TOLERANCE
        weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        loss, expected_loss = ((o * weights).sum() + f.sum() for o, f in ((out, final),
                                                                         (expected, expected_final)))
        grads = torch.autograd.grad(loss, [*leaves, initial])
        expected_grads = torch.autograd.grad(expected_loss, [*leaves, initial])
        for ours, theirs in zip(grads, expected_grads, strict=True):
            assert (ours - theirs).abs().max().item() < TOLERANCE, f"{form}: gradients differ"


@pytest.mark.parametrize("form", ["per_channel", "value_channel"])
def test_per_channel_chunks_stay_finite_under_strong_decays_in_float32(form):
    """Decays of up to e^-60 per token: factors relative to a chunk's start would overflow
    float32 (e^(16 * 60)); the secondary chunking only ever takes exp of a value <= 0."""
    terms = _terms_for(form, 40, torch.float32, decay_scale=30.0)
    initial = torch.zeros(2, 2, 6, 5)
    out, _ = _chunked(form, terms, 16, initial)
    exact = Recurrence(*(t.double() for t in (terms.q, terms.k, terms.v, terms.log_decay)))
    expected, _ = _recurrent(form, exact, initial.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay_shape", [(6, 1), (1, 5), (1, 1), (6, 5)])
def test_the_chunk_scan_has_the_gradients_of_its_loop(decay_shape):
    """carried_states (one autograd node, reverse-scan backward) against the plain loop."""
    generator = torch.Generator().manual_seed(12)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    decay = torch.sigmoid(draw(2, 3, 7, *decay_shape)).detach().requires_grad_()
    writes, state = draw(2, 3, 7, 6, 5), draw(2, 3, 6, 5)
    starts, final = carried_states(decay, writes, state)
    expected, current = [], state
    for n in range(7):
        expected.append(current)
        current = decay[:, :, n] * current + writes[:, :, n]
    expected_starts = torch.stack(expected, dim=2)
    assert torch.allclose(starts, expected_starts, rtol=0, atol=1e-12)
    assert torch.allclose(final, current, rtol=0, atol=1e-12)
    weights = torch.randn(starts.shape, generator=generator, dtype=torch.float64)
    for with_final in (True, False):
        ours = (starts * weights).sum() + (final.sum() if with_final else 0)
        theirs = (expected_starts * weights).sum() + (current.sum() if with_final else 0)
        for a, b in zip(torch.autograd.grad(ours, [decay, writes, state], retain_graph=True),
                        torch.autograd.grad(theirs, [decay, writes, state], retain_graph=True),
                        strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
