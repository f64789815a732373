"""Efficiency benchmark: forward and forward+backward time and peak memory of each mechanism.

Timing follows the field's habits: warm-up first, the device synchronised around every timed
call, the median of several repeats. Peak memory is the allocator's high-water mark on CUDA and,
on CPU, the high-water mark of the allocations PyTorch's profiler records during one call. Both
are measured above what was allocated before the call (inputs excluded). Out-of-memory is
recorded as such and the benchmark goes on.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attention_zoo import Pattern, attention_spec, build_attention
from runners.provenance import provenance
from runners.records import write_record

SCHEMA = "attnbench.efficiency/1"


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

    @property
    def key(self) -> str:
        args = "".join(f"-{k}{v}" for k, v in sorted(self.attention_args.items()))
        return (f"{self.attention}{args}-{self.pattern}-L{self.length}-B{self.batch}"
                f"-H{self.heads}-D{self.head_dim}-{self.dtype}-{self.device.replace(':', '')}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(cell: EfficiencyCell, *, warmup: int, repeats: int) -> dict[str, Any]:
    """Measure one cell and return its metrics."""
    device = torch.device(cell.device)
    dtype = getattr(torch, cell.dtype)
    torch.manual_seed(0)
    attention = build_attention(
        cell.attention, pattern=cell.pattern, heads=cell.heads, head_dim=cell.head_dim,
        **cell.attention_args,
    ).to(device=device, dtype=dtype)
    shape = (cell.batch, cell.length, cell.heads, cell.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v)

    leaves = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        attention.zero_grad(set_to_none=True)
        attention(*leaves).backward(grad_out)

    forward_times = median_ms(forward, device, warmup=warmup, repeats=repeats)
    backward_times = median_ms(forward_backward, device, warmup=warmup, repeats=repeats)
    return {
        "forward_ms": statistics.median(forward_times),
        "forward_backward_ms": statistics.median(backward_times),
        "forward_peak_mib": peak_mib(forward, device),
        "forward_backward_peak_mib": peak_mib(forward_backward, device),
        "parameters": sum(p.numel() for p in attention.parameters()),
        "forward_ms_repeats": forward_times,
        "forward_backward_ms_repeats": backward_times,
    }


def run_efficiency(
    cells: Sequence[EfficiencyCell],
    *,
    results_dir: Path,
    warmup: int = 2,
    repeats: int = 5,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every cell, write one record per cell to ``results_dir/efficiency/<run id>/``."""
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    records = []
    for cell in cells:
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "kind": "efficiency",
            "run_id": run_id,
            "cell": asdict(cell),
            "settings": {"warmup": warmup, "repeats": repeats},
            "provenance": provenance(torch.device(cell.device)),
        }
        try:
            record["metrics"] = measure(cell, warmup=warmup, repeats=repeats)
            record["status"] = "ok"
        except Exception as error:  # recorded, and the benchmark goes on
            record["status"] = "oom" if is_out_of_memory(error) else "error"
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
        finally:
            if cell.device.startswith("cuda"):
                torch.cuda.empty_cache()
        write_record(results_dir / "efficiency" / run_id / f"{cell.key}.json", record)
        records.append(record)
        if on_result is not None:
            on_result(record)
    return records


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


def default_cells(
    attentions: Sequence[str],
    patterns: Sequence[str],
    lengths: Sequence[int],
    *,
    attention_args: dict[str, dict[str, Any]] | None = None,
    **shape: Any,
) -> list[EfficiencyCell]:
    """The cross product of mechanisms x patterns x lengths, skipping unsupported patterns."""
    cells = []
    for name in attentions:
        spec = attention_spec(name)
        for pattern in patterns:
            if not spec.supports(pattern):
                continue
            for length in lengths:
                cells.append(EfficiencyCell(
                    attention=name, pattern=Pattern.parse(pattern).value, length=length,
                    attention_args=dict((attention_args or {}).get(name, {})), **shape,
                ))
    return cells
