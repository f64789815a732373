"""Efficiency benchmark: forward and forward+backward time and peak memory of each mechanism.

Timing follows the field's habits: warm-up first, the device synchronised around every timed
call, the median of several repeats, reported with the minimum and the interquartile range. The
mechanisms of one pattern and length are timed side by side, taking turns call by call, so that
a busy machine slows them alike; the machine's load average is recorded before and after.
Peak memory is the allocator's high-water mark on CUDA and,
on CPU, the high-water mark of the allocations PyTorch's profiler records during one call. Both
are measured above what was allocated before the call (inputs excluded). Out-of-memory is
recorded as such and the benchmark goes on.

On CUDA the timer is triton's ``do_bench`` when triton is importable (it also flushes the L2
cache between calls) and CUDA events otherwise; on the CPU, ``time.perf_counter`` around
synchronous calls. A cell measures either the mechanism alone (``scope="core"``, between the
projections, as CAB does) or the whole :class:`~attention_zoo.MultiHeadAttention` layer
(``scope="layer"``: projections included). flash-linear-attention's kernels (``fla-core``, GPU
only) can be measured beside the zoo under the names of :data:`FLA_KERNELS`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import importlib.util
import itertools
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attention_zoo import (
    Attention,
    LayerInput,
    MultiHeadAttention,
    Pattern,
    attention_spec,
    build_attention,
)
from runners.provenance import provenance
from runners.records import write_record
from tasks.base import attention_key

SCHEMA = "attnbench.efficiency/1"
SCOPES = ("core", "layer")
TIMERS = ("auto", "do_bench", "cuda_events")

PRESETS: dict[str, dict[str, Any]] = {
    # The quick default: one sequence, the two self patterns, up to 4K tokens.
    "default": {"batch": 1, "heads": 8, "head_dim": 64, "lengths": [256, 1024, 4096],
                "patterns": ["causal_self", "noncausal_self"]},
    # CAB's efficiency setting (Zhang et al., ICML 2023, section 5): batch 4, model width 512 in
    # 8 heads, lengths 256..8192, every pattern.
    "cab": {"batch": 4, "heads": 8, "head_dim": 64,
            "lengths": [256, 512, 1024, 2048, 4096, 8192],
            "patterns": [p.value for p in Pattern]},
}
"""Named settings of ``attnbench efficiency --preset``; explicit flags override them."""


@dataclass(frozen=True)
class FlaKernel:
    """A flash-linear-attention kernel and the zoo mechanism it is the fast counterpart of."""

    name: str
    counterpart: str
    module: str
    function: str
    patterns: tuple[str, ...] = ("causal_self",)

    def build(self, head_dim: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function of q, k, v [B, L, H, D] -> [B, L, H, D] (fla's own layout)."""
        kernel = getattr(importlib.import_module(self.module), self.function)
        if self.name == "fla_linear_attn":
            # The linear transformer's elu+1 feature map, normalised: the zoo's `linear`.
            return lambda q, k, v: kernel(torch.nn.functional.elu(q) + 1,
                                          torch.nn.functional.elu(k) + 1, v, normalize=True)[0]
        slots = min(64, head_dim)
        # ABC's slot logits; here a slice of q stands in for their projection ([B, L, H, M]).
        return lambda q, k, v: kernel(q, k, v, q[..., :slots].contiguous())[0]


FLA_KERNELS = {k.name: k for k in (
    FlaKernel("fla_linear_attn", "linear", "fla.ops.linear_attn", "chunk_linear_attn"),
    FlaKernel("fla_abc", "abc", "fla.ops.abc", "chunk_abc"),
)}


def fla_unavailable(device: str) -> str | None:
    """Why flash-linear-attention's kernels cannot run here, or None if they can (CUDA; or the
    CPU under Triton's interpreter once :func:`runners.interpreter.shim_fla_for_interpreter`
    has run, as the GPU suite's rehearsal does)."""
    from runners.interpreter import fla_runs_here

    if not device.startswith("cuda") and not (device == "cpu" and fla_runs_here()):
        return f"flash-linear-attention's kernels are Triton GPU kernels; the device is {device}"
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed: pip install fla-core (or attnbench[fla])"
    try:
        importlib.import_module("fla.ops")
    except Exception as error:
        return f"flash-linear-attention failed to import: {type(error).__name__}: {error}"
    return None


@dataclass(frozen=True)
class EfficiencyCell:
    """One measurement: a mechanism with its hyperparameters, a pattern and a length."""

    attention: str
    pattern: str
    length: int
    attention_args: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    scope: str = "core"
    follows_length: tuple[str, ...] = ()

    @property
    def built_args(self) -> dict[str, Any]:
        """The hyperparameters the mechanism is built with: ``attention_args``, and each
        hyperparameter named in ``follows_length`` set to the timed length."""
        return {**self.attention_args, **{name: self.length for name in self.follows_length}}

    @property
    def key(self) -> str:
        scope = "-layer" if self.scope == "layer" else ""
        return (f"{attention_key(self.attention, self.attention_args)}{scope}-{self.pattern}"
                f"-L{self.length}-B{self.batch}"
                f"-H{self.heads}-D{self.head_dim}-{self.dtype}-{self.device.replace(':', '')}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_timer(choice: str = "auto") -> str:
    """The CUDA timer: triton's ``do_bench`` if triton is importable (for ``auto``), else events."""
    if choice not in TIMERS:
        raise ValueError(f"unknown timer {choice!r}; valid: {', '.join(TIMERS)}")
    if choice == "auto":
        return "do_bench" if importlib.util.find_spec("triton") is not None else "cuda_events"
    return choice


def do_bench_ms(fn: Callable[[], Any], *, grad_to_none: Sequence[torch.Tensor] | None = None) -> list[float]:
    """Times in ms from triton's ``do_bench`` (its own warm-up and repeat budget, L2 flushed)."""
    from triton.testing import do_bench

    try:
        times = do_bench(fn, grad_to_none=grad_to_none, return_mode="all")
    except (TypeError, ValueError, AssertionError):  # triton < 3 has no return_mode="all"
        times = [do_bench(fn, grad_to_none=grad_to_none, return_mode="median")]
    return [float(t) for t in (times if isinstance(times, list | tuple) else [times])]


def cuda_event_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Times in ms between CUDA events recorded around each call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int,
            timer: str = "auto", grad_to_none: Sequence[torch.Tensor] | None = None) -> list[float]:
    """Times of ``fn`` in ms: CUDA through :func:`gpu_timer`'s choice, CPU by :func:`median_ms`."""
    if device.type != "cuda":
        return median_ms(fn, device, warmup=warmup, repeats=repeats)
    if gpu_timer(timer) == "do_bench":
        return do_bench_ms(fn, grad_to_none=grad_to_none)
    return cuda_event_ms(fn, warmup=warmup, repeats=repeats)


def median_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Wall time of ``fn`` in ms, ``repeats`` times after ``warmup`` calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory allocated during one call of ``fn``, above what was allocated before, in MiB."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own allocations (frees are negative), in time order; the running sum's maximum
    # is the high-water mark of the call.
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what native code prints while the block runs (the profiler's libraries print
    ``USDT ... profiler_start`` / ``profiler_stop`` lines and allocator notes straight to the
    process's stdout and stderr, past Python's ``sys.stdout``)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no C library to flush: leave the output alone
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    libc.fflush(None)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        yield
    finally:
        libc.fflush(None)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _module_under_test(cell: EfficiencyCell) -> tuple[Callable[..., torch.Tensor], list[torch.nn.Parameter]]:
    """The function a cell times (a zoo mechanism, the whole layer, or an fla kernel) and its
    parameters."""
    if cell.attention in FLA_KERNELS:
        if cell.scope != "core":
            raise ValueError(f"{cell.attention} is a kernel: only scope 'core' applies")
        return FLA_KERNELS[cell.attention].build(cell.head_dim), []
    if cell.scope == "layer":
        module: torch.nn.Module = MultiHeadAttention(
            cell.heads * cell.head_dim, cell.heads, cell.attention, pattern=cell.pattern,
            attention_args=cell.built_args)
    elif cell.scope == "core":
        attention = build_attention(cell.attention, pattern=cell.pattern, heads=cell.heads,
                                    head_dim=cell.head_dim, **cell.built_args)
        module = _CoreWithLayerInput(attention) if attention.needs_layer_input else attention
    else:
        raise ValueError(f"unknown scope {cell.scope!r}; valid: {', '.join(SCOPES)}")
    module.to(device=torch.device(cell.device), dtype=getattr(torch, cell.dtype))
    parameters = (module.attention if isinstance(module, _CoreWithLayerInput) else module).parameters()
    return module, list(parameters)


class _CoreWithLayerInput(torch.nn.Module):
    """A mechanism that reads the layer's input, timed alone: the core inputs q and k
    [B, L, H, D] double as the layer's input [B, L, H*D] (query side, and source in cross
    attention), and the projections it reads are never run on them (their weights still get
    gradients). ``parameters`` of the cell count the mechanism's own only."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention
        width = attention.heads * attention.head_dim
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        query = q.flatten(2)  # [B, L, H*D]
        source = k.flatten(2) if self.attention.pattern.cross else query
        layer_input = LayerInput(query, source, self.q_proj, self.k_proj, self.v_proj)
        return self.attention(q, k, v, layer_input=layer_input)


@dataclass
class _Prepared:
    """A cell ready to time: its two calls (forward; forward+backward) on fixed inputs."""

    forward: Callable[[], None]
    forward_backward: Callable[[], None]
    leaves: list[torch.Tensor]
    parameters: list[torch.nn.Parameter]


def prepare(cell: EfficiencyCell) -> _Prepared:
    """Build a cell's module and inputs (seeded) and the two calls that are timed."""
    device = torch.device(cell.device)
    dtype = getattr(torch, cell.dtype)
    torch.manual_seed(0)
    function, parameters = _module_under_test(cell)
    if cell.scope == "layer":
        shape: tuple[int, ...] = (cell.batch, cell.length, cell.heads * cell.head_dim)  # [B, L, E]
    else:
        shape = (cell.batch, cell.length, cell.heads, cell.head_dim)  # [B, L, H, D]
    cross = Pattern.parse(cell.pattern).cross
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        if cell.scope == "layer":
            # Self attention projects one input; cross attention reads a second sequence.
            return function(inputs[0], inputs[1], inputs[1]) if cross else function(inputs[0])
        return function(*inputs)

    def forward() -> None:
        with torch.no_grad():
            call(q, k, v)

    leaves = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]

    def forward_backward() -> None:
        for tensor in (*leaves, *parameters):
            tensor.grad = None
        call(*leaves).backward(grad_out)

    return _Prepared(forward, forward_backward, leaves, parameters)


def spread(times: Sequence[float]) -> dict[str, float]:
    """Median, minimum and interquartile range of repeated times."""
    if len(times) > 1:
        first, _, third = statistics.quantiles(times, n=4, method="inclusive")
    else:
        first = third = times[0]
    return {"median": statistics.median(times), "min": min(times), "iqr": third - first}


def _interleaved_times(
    cells: Sequence[EfficiencyCell], prepared: dict[int, _Prepared], kind: str, *, warmup: int,
    repeats: int, timer: str, failures: dict[int, BaseException],
) -> dict[int, list[float]]:
    """Times in ms of each prepared cell's ``kind`` call ("forward" or "forward_backward"), by
    the cell's index in ``cells``.

    On the CPU (and with CUDA events) the cells take turns, one call each per round, the
    starting cell rotating: whatever the machine's load does during the run, it touches every
    cell alike, so their ratios stay comparable. triton's ``do_bench`` times each cell in one go
    (it repeats internally and flushes the L2 cache)."""
    times: dict[int, list[float]] = {index: [] for index in prepared}
    order = list(prepared)
    device = torch.device(cells[order[0]].device) if order else torch.device("cpu")
    per_call = device.type != "cuda" or gpu_timer(timer) != "do_bench"
    rounds = warmup + repeats if per_call else 1
    for round_index in range(rounds):
        for offset in range(len(order)):
            index = order[(round_index + offset) % len(order)]
            if index in failures:
                continue
            calls = prepared[index]
            try:
                if not per_call:
                    times[index] = do_bench_ms(getattr(calls, kind),
                                               grad_to_none=[*calls.leaves, *calls.parameters])
                    continue
                measured = (cuda_event_ms(getattr(calls, kind), warmup=0, repeats=1)
                            if device.type == "cuda"
                            else median_ms(getattr(calls, kind), device, warmup=0, repeats=1))
                if round_index >= warmup:
                    times[index] += measured
            except Exception as error:  # recorded, and the other cells go on
                failures[index] = error
    return times


def _metrics(calls: _Prepared, device: torch.device, times: dict[str, list[float]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for kind in ("forward", "forward_backward"):
        summary = spread(times[kind])
        metrics[f"{kind}_ms"] = summary["median"]
        metrics[f"{kind}_ms_min"] = summary["min"]
        metrics[f"{kind}_ms_iqr"] = summary["iqr"]
        metrics[f"{kind}_peak_mib"] = peak_mib(getattr(calls, kind), device)
        metrics[f"{kind}_ms_repeats"] = times[kind]
    metrics["parameters"] = sum(p.numel() for p in calls.parameters)
    return metrics


def measure_group(
    cells: Sequence[EfficiencyCell], *, warmup: int, repeats: int, timer: str = "auto"
) -> list[dict[str, Any] | BaseException]:
    """Measure cells side by side (interleaved; see :func:`_interleaved_times`): for each, its
    metrics, or the exception that stopped it."""
    failures: dict[int, BaseException] = {}
    prepared: dict[int, _Prepared] = {}
    for index, cell in enumerate(cells):
        try:
            prepared[index] = prepare(cell)
        except Exception as error:
            failures[index] = error
    load_before = os.getloadavg()
    times = {kind: _interleaved_times(cells, prepared, kind, warmup=warmup, repeats=repeats,
                                      timer=timer, failures=failures)
             for kind in ("forward", "forward_backward")}
    load = {"before": list(load_before), "after": list(os.getloadavg())}
    results: list[dict[str, Any] | BaseException] = []
    for index, cell in enumerate(cells):
        if index in failures:
            results.append(failures[index])
            continue
        try:
            metrics = _metrics(prepared[index], torch.device(cell.device),
                               {kind: times[kind][index] for kind in times})
        except Exception as error:
            results.append(error)
            continue
        results.append({**metrics, "load_average": load})
    return results


def measure(cell: EfficiencyCell, *, warmup: int, repeats: int, timer: str = "auto") -> dict[str, Any]:
    """Measure one cell alone and return its metrics."""
    result = measure_group([cell], warmup=warmup, repeats=repeats, timer=timer)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _group_key(cell: EfficiencyCell) -> tuple[Any, ...]:
    return (cell.pattern, cell.length, cell.batch, cell.heads, cell.head_dim, cell.dtype,
            cell.device, cell.scope)


def run_efficiency(
    cells: Sequence[EfficiencyCell],
    *,
    results_dir: Path,
    warmup: int = 2,
    repeats: int = 7,
    timer: str = "auto",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every cell, write one record per cell to ``results_dir/efficiency/<run id>/``.

    Cells of the same pattern, length and shape are measured together, interleaved."""
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    groups: dict[tuple[Any, ...], list[EfficiencyCell]] = {}  # insertion-ordered
    for cell in cells:
        groups.setdefault(_group_key(cell), []).append(cell)
    records = []
    for group in groups.values():
        results = measure_group(group, warmup=warmup, repeats=repeats, timer=timer)
        if group[0].device.startswith("cuda"):
            torch.cuda.empty_cache()
        for cell, result in zip(group, results):
            record = _record(cell, result, run_id=run_id, warmup=warmup, repeats=repeats,
                             timer=timer)
            write_record(results_dir / "efficiency" / run_id / f"{cell.key}.json", record)
            records.append(record)
            if on_result is not None:
                on_result(record)
    return records


def _record(cell: EfficiencyCell, result: dict[str, Any] | BaseException, *, run_id: str,
            warmup: int, repeats: int, timer: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "efficiency",
        "run_id": run_id,
        "cell": asdict(cell),
        "settings": {"warmup": warmup, "repeats": repeats, "interleaved": True,
                     "timer": gpu_timer(timer) if cell.device.startswith("cuda") else "perf_counter"},
        "provenance": provenance(torch.device(cell.device)),
    }
    if cell.attention in FLA_KERNELS:
        record["counterpart"] = FLA_KERNELS[cell.attention].counterpart
    if isinstance(result, BaseException):
        record["status"] = "oom" if is_out_of_memory(result) else "error"
        record["error"] = f"{type(result).__name__}: {result}"[:2000]
    else:
        metrics = dict(result)
        # The machine's load around the measurement: a record field, not a metric.
        record["load_average"] = metrics.pop("load_average", None)
        record["metrics"] = metrics
        record["status"] = "ok"
    return record


def scaling_exponent(lengths: Sequence[int], times: Sequence[float]) -> float | None:
    """k of a least-squares fit time ~ c * n^k in log-log space (None with < 2 points)."""
    points = [(math.log(n), math.log(t)) for n, t in zip(lengths, times) if t and t > 0]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def efficiency_length(
    lengths: Sequence[int], times: Sequence[float], reference_times: Sequence[float]
) -> float | None:
    """CAB's efficiency length: the sequence length from which a mechanism is faster than the
    reference (softmax), interpolated in log-log space between measured lengths.

    Returns the smallest measured length if it is faster everywhere, ``math.inf`` if it never
    becomes faster at the measured lengths, None without data.
    """
    ratios = [(n, math.log(t / r)) for n, t, r in zip(lengths, times, reference_times) if t and r]
    if not ratios:
        return None
    if ratios[0][1] < 0:
        return float(ratios[0][0])
    for (n0, g0), (n1, g1) in itertools.pairwise(ratios):
        if g0 >= 0 > g1:  # crosses between n0 and n1
            fraction = g0 / (g0 - g1)
            return math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0)))
    return math.inf


def length_bound(name: str) -> tuple[str, ...]:
    """The hyperparameters of mechanism ``name`` that bound the sequence length it accepts
    (``metadata["length_bound"]`` on its ``Config`` field, e.g. cosformer's ``max_length``)."""
    config = attention_spec(name).cls.Config
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get("length_bound"))


def default_cells(
    attentions: Sequence[str],
    patterns: Sequence[str],
    lengths: Sequence[int],
    *,
    attention_args: dict[str, list[dict[str, Any]]] | None = None,
    **shape: Any,
) -> list[EfficiencyCell]:
    """The cross product of mechanisms (each variant of its hyperparameters in
    ``attention_args``) x patterns x lengths, skipping unsupported patterns. A length-bound
    hyperparameter (:func:`length_bound`) that a variant leaves at its default follows the
    timed length; one the variant sets stays as set (longer cells then fail, saying why)."""
    cells = []
    for name in attentions:
        spec = attention_spec(name)
        bound = length_bound(name)
        for pattern in patterns:
            if not spec.supports(pattern):
                continue
            for length, variant in itertools.product(lengths, (attention_args or {}).get(name) or [{}]):
                cells.append(EfficiencyCell(
                    attention=name, pattern=Pattern.parse(pattern).value, length=length,
                    attention_args=dict(variant),
                    follows_length=tuple(b for b in bound if b not in variant), **shape,
                ))
    return cells


def fla_cells(patterns: Sequence[str], lengths: Sequence[int], **shape: Any) -> list[EfficiencyCell]:
    """Cells for every flash-linear-attention kernel of :data:`FLA_KERNELS` at the patterns it
    implements (its causal chunked form)."""
    return [EfficiencyCell(attention=kernel.name, pattern=Pattern.parse(pattern).value, length=length,
                           **shape)
            for kernel in FLA_KERNELS.values() for pattern in patterns
            if Pattern.parse(pattern).value in kernel.patterns for length in lengths]
