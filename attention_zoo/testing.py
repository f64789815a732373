"""The zoo's contract checks, usable on any registered mechanism (yours too).

Every registered mechanism runs these through ``tests/test_contract.py``, parametrised over the
registry, with no per-mechanism test code. A plug-in author can run them directly::

    from attention_zoo.testing import check_contract
    check_contract("my_attention")

Each check raises ``AssertionError`` with a message that says what broke. Inputs are float64 and
seeded; every parameter is re-drawn from a normal distribution first, so that zero-initialised
parameters (biases, position tables) cannot hide a bug.

A mechanism that declares ``uses_layer_input`` gets the same checks through a layer: the drawn
query-side tensor [B, Lq, H, D] is read as the layer input [B, Lq, H*D] (and the drawn key-side
tensor as the cross-attention source), q, k and v are its projections by seeded ``nn.Linear``
layers with biases, and the :class:`~attention_zoo.LayerInput` goes along with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attention_zoo.base import Attention, AttentionConfigError, LayerInput, Pattern
from attention_zoo.registry import attention_spec, build_attention

HEADS = 2
HEAD_DIM = 8
TOLERANCE = 1e-9  # float64 throughout


def build_for_test(
    name: str, pattern: Pattern, *, dtype: torch.dtype = torch.float64, seed: int = 0, **config: Any
) -> Attention:
    """Build ``name`` with every parameter re-drawn from N(0, 0.5^2), in eval mode."""
    torch.manual_seed(seed)
    attention = build_attention(name, pattern=pattern, heads=HEADS, head_dim=HEAD_DIM, **config)
    attention = attention.to(dtype)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0.0, 0.5)
    return attention.eval()


def random_inputs(
    batch: int, query_length: int, key_length: int, *, dtype: torch.dtype = torch.float64,
    seed: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded q [B, Lq, H, D], k and v [B, Lk, H, D]."""
    generator = torch.Generator().manual_seed(seed)

    def draw(length: int) -> Tensor:
        return torch.randn(batch, length, HEADS, HEAD_DIM, generator=generator, dtype=dtype)

    return draw(query_length), draw(key_length), draw(key_length)


def layer_projections(
    input_dim: int, source_dim: int, *, heads: int = HEADS, head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float64, seed: int = 2, device: torch.device | str = "cpu",
) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Seeded q, k, v projections (input_dim -> H*D, source_dim -> H*D) with nonzero biases, on
    ``device`` (drawn on the CPU, so equal seeds give equal weights on every device)."""
    generator = torch.Generator().manual_seed(seed)
    projections = []
    for width in (input_dim, source_dim, source_dim):
        linear = nn.Linear(width, heads * head_dim, dtype=dtype, device=device)
        with torch.no_grad():
            weight = torch.randn(linear.weight.shape, generator=generator, device="cpu")
            bias = torch.randn(linear.bias.shape, generator=generator, device="cpu")
            linear.weight.copy_(weight / width**0.5)
            linear.bias.copy_(bias * 0.5)
        projections.append(linear)
    q_proj, k_proj, v_proj = projections
    return q_proj, k_proj, v_proj


def project(
    query: Tensor, source: Tensor, projections: tuple[nn.Linear, nn.Linear, nn.Linear],
    *, heads: int = HEADS,
) -> tuple[Tensor, Tensor, Tensor, LayerInput]:
    """q, k, v [B, L, H, D] and the :class:`LayerInput` of a layer's input query [B, Lq, E] and
    source [B, Lk, E_s] (pass ``source=query`` for self attention)."""
    q_proj, k_proj, v_proj = projections

    def split(x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], heads, -1)

    layer_input = LayerInput(query=query, source=source, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj)
    return split(q_proj(query)), split(k_proj(source)), split(v_proj(source)), layer_input


def random_layer_input(
    batch: int, query_length: int, key_length: int, *, input_dim: int, source_dim: int | None = None,
    cross: bool = False, heads: int = HEADS, head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float64, seed: int = 1,
) -> tuple[Tensor, Tensor, Tensor, LayerInput]:
    """Seeded layer inputs with real projections: q [B, Lq, H, D], k, v [B, Lk, H, D] and the
    :class:`LayerInput` they come from (self attention: one input; ``key_length`` must equal
    ``query_length``)."""
    source_dim = input_dim if source_dim is None else source_dim
    if not cross and (key_length != query_length or source_dim != input_dim):
        raise ValueError("self attention has one input: key_length == query_length, source_dim == "
                         f"input_dim; got {key_length}, {query_length}, {source_dim}, {input_dim}")
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, query_length, input_dim, generator=generator, dtype=dtype)
    source = torch.randn(batch, key_length, source_dim, generator=generator, dtype=dtype) if cross else query
    projections = layer_projections(input_dim, source_dim, heads=heads, head_dim=head_dim, dtype=dtype,
                                    seed=seed + 1)
    return project(query, source, projections, heads=heads)


def run(
    attention: Attention, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """``attention(q, k, v, key_padding_mask)``; for a mechanism that ``uses_layer_input``, q (and
    in cross attention k) [B, L, H, D] are read as the layer's input [B, L, H*D] and projected
    (v is then unused: values come from the same source as keys)."""
    if not attention.needs_layer_input:
        return attention(q, k, v, key_padding_mask)
    q, k, v, layer_input = _through_layer(attention, q, k)
    return attention(q, k, v, key_padding_mask, layer_input=layer_input)


def _through_layer(attention: Attention, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, LayerInput]:
    query = q.flatten(2)  # [B, Lq, H*D]
    source = k.flatten(2) if attention.pattern.cross else query
    projections = layer_projections(query.shape[-1], source.shape[-1], heads=attention.heads,
                                    head_dim=attention.head_dim, dtype=q.dtype, device=q.device)
    return project(query, source, projections, heads=attention.heads)


def _used_inputs(attention: Attention) -> tuple[str, ...]:
    """Which of the drawn q, k, v a check's call reads (see :func:`run`)."""
    if not attention.needs_layer_input:
        return ("q", "k", "v")
    return ("q", "k") if attention.pattern.cross else ("q",)


def _lengths(pattern: Pattern, length: int) -> tuple[int, int]:
    # Cross attention gets a source of another length to catch Lq/Lk mix-ups.
    return (length, length + 3) if pattern.cross else (length, length)


def check_shapes_and_dtypes(name: str, pattern: Pattern, **config: Any) -> None:
    """The output is [B, Lq, H, D], finite, in the input's dtype, for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        attention = build_for_test(name, pattern, dtype=dtype, **config)
        q_len, k_len = _lengths(pattern, 13)
        q, k, v = random_inputs(2, q_len, k_len, dtype=dtype)
        out = run(attention, q, k, v)
        assert out.shape == q.shape, f"{name}/{pattern}: output {list(out.shape)} != {list(q.shape)}"
        assert out.dtype == dtype, f"{name}/{pattern}: output dtype {out.dtype} != input {dtype}"
        assert torch.isfinite(out).all(), f"{name}/{pattern}: non-finite output in {dtype}"


def check_gradients(name: str, pattern: Pattern, **config: Any) -> None:
    """Training-mode backward gives finite gradients to q, k, v and to every parameter."""
    attention = build_for_test(name, pattern, **config).train()
    q_len, k_len = _lengths(pattern, 11)
    q, k, v = (t.requires_grad_() for t in random_inputs(2, q_len, k_len))
    padding = torch.zeros(2, k_len, dtype=torch.bool)
    padding[1, -2:] = True
    out = run(attention, q, k, v, padding)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * weights).sum().backward()
    for label, tensor in (("q", q), ("k", k), ("v", v)):
        if label not in _used_inputs(attention):
            continue
        assert tensor.grad is not None, f"{name}/{pattern}: no gradient reaches {label}"
        assert torch.isfinite(tensor.grad).all(), f"{name}/{pattern}: non-finite grad of {label}"
        assert tensor.grad.abs().sum() > 0, f"{name}/{pattern}: zero gradient of {label}"
    for parameter_name, parameter in attention.named_parameters():
        assert parameter.grad is not None, (
            f"{name}/{pattern}: parameter {parameter_name} gets no gradient "
            "(create only the parameters the pattern uses)"
        )
        assert torch.isfinite(parameter.grad).all(), (
            f"{name}/{pattern}: non-finite gradient of {parameter_name}"
        )


def check_no_future_leak(name: str, pattern: Pattern, **config: Any) -> None:
    """Causal self attention: changing positions >= t0 (queries, keys, values) never changes
    outputs < t0. (Causal cross attention: :func:`check_causal_cross`.)"""
    if pattern != Pattern.CAUSAL_SELF:
        return
    attention = build_for_test(name, pattern, **config)
    q, k, v = random_inputs(2, 17, 17)
    before = run(attention, q, k, v)
    for cut in (1, 6, 12):
        q2, k2, v2 = random_inputs(2, 17, 17, seed=100 + cut)
        q2[:, :cut], k2[:, :cut], v2[:, :cut] = q[:, :cut], k[:, :cut], v[:, :cut]
        after = run(attention, q2, k2, v2)
        difference = (after[:, :cut] - before[:, :cut]).abs().max().item()
        assert difference < TOLERANCE, (
            f"{name}/{pattern}: the future leaks: changing positions >= {cut} moved earlier "
            f"outputs by {difference:.3g}"
        )


PROBE_TARGET, PROBE_SOURCE = 50, 100
"""Query and source lengths of CAB's causal-cross probe."""
PROBE_QUERIES = (0, 1, 24, 25, 37, 48, 49)
"""The queries whose prefix pass is compared (CAB's probe compares queries 25 to 49)."""


def _probe_padding() -> Tensor:
    """[2, PROBE_SOURCE] source padding: scattered in sample 0, trailing in sample 1."""
    padding = torch.zeros(2, PROBE_SOURCE, dtype=torch.bool)
    padding[0, 3::7] = True
    padding[1, 60:] = True
    return padding


def check_causal_cross(name: str, pattern: Pattern, **config: Any) -> None:
    """Causal cross attention, CAB's probe: with 50 queries on a source of 100 positions, with
    and without source padding, the output at query i equals row i of the pass over queries
    0..i alone (queries after i change nothing), and the last valid source position reaches
    query 0 (every query sees the whole source; an index-aligned mask would hide it). The
    prefix pass is run for the queries in ``PROBE_QUERIES``."""
    if pattern != Pattern.CAUSAL_CROSS:
        return
    attention = build_for_test(name, pattern, **config)
    q, k, v = random_inputs(2, PROBE_TARGET, PROBE_SOURCE)
    for padding in (None, _probe_padding()):
        where = "without" if padding is None else "with"
        whole = run(attention, q, k, v, padding)
        for i in PROBE_QUERIES:
            prefix = run(attention, q[:, : i + 1], k, v, padding)[:, i]
            difference = (prefix - whole[:, i]).abs().max().item()
            assert difference < TOLERANCE, (
                f"{name}/{pattern}: query {i} moves by {difference:.3g} when the queries after it "
                f"are removed (CAB's causal-cross probe, {where} source padding)"
            )
        valid = torch.ones(2, PROBE_SOURCE, dtype=torch.bool) if padding is None else ~padding
        last = torch.arange(PROBE_SOURCE).masked_fill(~valid, -1).amax(dim=1)  # [B]
        moved_k, moved_v = k.clone(), v.clone()
        moved_k[torch.arange(2), last] += 2.0
        moved_v[torch.arange(2), last] += 2.0
        change = (run(attention, q, moved_k, moved_v, padding)[:, 0] - whole[:, 0]).abs()
        reached = change.flatten(1).amax(dim=1)  # [B]
        assert bool((reached > 1e-6).all()), (
            f"{name}/{pattern}: the last source position does not reach query 0 ({where} source "
            f"padding; change {reached.tolist()}): causal cross attention sees the whole source"
        )


def check_batch_invariance(name: str, pattern: Pattern, **config: Any) -> None:
    """A sample's output does not depend on the other samples of its batch (their values or
    their padding)."""
    attention = build_for_test(name, pattern, **config)
    q_len, k_len = _lengths(pattern, 13)
    q, k, v = random_inputs(3, q_len, k_len)
    padding = torch.zeros(3, k_len, dtype=torch.bool)
    padding[2, -4:] = True  # samples differ in length, so per-batch statistics would show
    together = run(attention, q, k, v, padding)
    others = random_inputs(3, q_len, k_len, seed=7)
    for i in range(3):
        alone = run(attention, q[i : i + 1], k[i : i + 1], v[i : i + 1], padding[i : i + 1])
        difference = (together[i : i + 1] - alone).abs().max().item()
        assert difference < TOLERANCE, (
            f"{name}/{pattern}: sample {i} changes by {difference:.3g} when batched with others"
        )
        mixed = [t.clone() for t in others]
        for t, original in zip(mixed, (q, k, v)):
            t[i] = original[i]
        mixed_padding = torch.zeros_like(padding)
        mixed_padding[i] = padding[i]
        difference = (run(attention, *mixed, mixed_padding)[i] - together[i]).abs().max().item()
        assert difference < TOLERANCE, (
            f"{name}/{pattern}: sample {i} changes by {difference:.3g} when the other samples change"
        )


def check_padding_invariance(name: str, pattern: Pattern, **config: Any) -> None:
    """Padded keys (any values) change nothing: right padding in self attention, and padding at
    arbitrary positions in cross attention."""
    attention = build_for_test(name, pattern, **config)
    q_len, k_len = _lengths(pattern, 10)
    q, k, v = random_inputs(2, q_len, k_len)
    reference = run(attention, q, k, v)
    extra = 5
    junk_q, junk_k, junk_v = random_inputs(2, extra, extra, seed=11)
    junk_k, junk_v = junk_k * 10, junk_v * 10  # loud garbage
    if pattern.cross:
        positions = torch.randperm(k_len + extra, generator=torch.Generator().manual_seed(3))
        real, fake = positions[:k_len].sort().values, positions[k_len:]
        k_padded = torch.empty(2, k_len + extra, HEADS, HEAD_DIM, dtype=k.dtype)
        v_padded = torch.empty_like(k_padded)
        k_padded[:, real], v_padded[:, real] = k, v
        k_padded[:, fake], v_padded[:, fake] = junk_k, junk_v
        padding = torch.zeros(2, k_len + extra, dtype=torch.bool)
        padding[:, fake] = True
        out = run(attention, q, k_padded, v_padded, padding)
        where = "at random positions"
    else:
        k_padded, v_padded = torch.cat([k, junk_k], 1), torch.cat([v, junk_v], 1)
        padding = torch.zeros(2, k_len + extra, dtype=torch.bool)
        padding[:, k_len:] = True
        q_in = q if pattern.cross else torch.cat([q, junk_q], 1)
        out = run(attention, q_in, k_padded, v_padded, padding)[:, :q_len]
        where = "on the right"
    assert torch.isfinite(out).all(), f"{name}/{pattern}: non-finite output with padding"
    difference = (out - reference).abs().max().item()
    assert difference < TOLERANCE, (
        f"{name}/{pattern}: padding {where} changes the output by {difference:.3g}"
    )


def check_decoding(name: str, pattern: Pattern, **config: Any) -> None:
    """Decoding equals the parallel pass: token-by-token steps in causal self attention (where
    decoding is declared); in causal cross attention, each query alone against the whole
    (padded) source gives its row of the whole pass."""
    if pattern == Pattern.CAUSAL_CROSS:
        _check_cross_decoding(name, pattern, **config)
    if pattern != Pattern.CAUSAL_SELF or not attention_spec(name).decoding:
        return
    attention = build_for_test(name, pattern, **config)
    q, k, v = random_inputs(2, 37, 37)
    parallel = run(attention, q, k, v)
    state = attention.init_state(2, device=q.device, dtype=q.dtype)
    steps = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t = q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]
        if attention.needs_layer_input:
            q_t, k_t, v_t, layer_input = _through_layer(attention, q_t, k_t)
            out, state = attention.step(q_t, k_t, v_t, state, layer_input=layer_input)
        else:
            out, state = attention.step(q_t, k_t, v_t, state)
        steps.append(out)
    difference = (torch.cat(steps, 1) - parallel).abs().max().item()
    assert difference < 1e-8, (
        f"{name}: decoding differs from the parallel causal pass by {difference:.3g}"
    )


def _check_cross_decoding(name: str, pattern: Pattern, **config: Any) -> None:
    attention = build_for_test(name, pattern, **config)
    q, k, v = random_inputs(2, 9, 14)
    padding = torch.zeros(2, 14, dtype=torch.bool)
    padding[0, 2::5], padding[1, 10:] = True, True
    whole = run(attention, q, k, v, padding)
    for t in range(q.shape[1]):
        alone = run(attention, q[:, t : t + 1], k, v, padding)[:, 0]
        difference = (alone - whole[:, t]).abs().max().item()
        assert difference < TOLERANCE, (
            f"{name}/{pattern}: query {t} decoded alone against the whole source differs by "
            f"{difference:.3g} from its row of the whole pass"
        )


def check_unsupported_patterns(name: str, pattern: Pattern, **config: Any) -> None:
    """Asking for a pattern the mechanism does not declare raises, naming what it supports."""
    spec = attention_spec(name)
    for other in Pattern:
        if other in spec.patterns:
            continue
        try:
            build_attention(name, pattern=other, heads=HEADS, head_dim=HEAD_DIM, **config)
        except AttentionConfigError as error:
            assert "does not support" in str(error), f"{name}: unclear error {error}"
        else:
            raise AssertionError(f"{name}: building for unsupported {other} did not raise")


def check_hyperparameter_errors(name: str, pattern: Pattern, **config: Any) -> None:
    """Unknown keys raise naming every valid one; ill-typed values raise naming the type."""
    spec = attention_spec(name)
    try:
        build_attention(name, pattern=pattern, heads=HEADS, head_dim=HEAD_DIM, not_a_knob=1)
    except AttentionConfigError as error:
        for hp in spec.hyperparameters:
            assert hp.name in str(error), f"{name}: error {error} does not list {hp.name!r}"
    else:
        raise AssertionError(f"{name}: an unknown hyperparameter was accepted")
    for hp in spec.hyperparameters:
        try:
            build_attention(name, pattern=pattern, heads=HEADS, head_dim=HEAD_DIM,
                            **{hp.name: object()})
        except AttentionConfigError as error:
            assert hp.name in str(error), f"{name}: error {error} does not name {hp.name!r}"
        else:
            raise AssertionError(f"{name}: an object() was accepted as {hp.name!r}")


CHECKS: dict[str, Callable[..., None]] = {
    "shapes_and_dtypes": check_shapes_and_dtypes,
    "gradients": check_gradients,
    "no_future_leak": check_no_future_leak,
    "causal_cross": check_causal_cross,
    "batch_invariance": check_batch_invariance,
    "padding_invariance": check_padding_invariance,
    "decoding": check_decoding,
    "unsupported_patterns": check_unsupported_patterns,
    "hyperparameter_errors": check_hyperparameter_errors,
}


def check_contract(name: str, **config: Any) -> None:
    """Run every contract check on ``name`` for each pattern it declares."""
    for pattern in sorted(attention_spec(name).patterns):
        for check in CHECKS.values():
            check(name, pattern, **config)
