"""The GPU validation suite's tests (``tox -e gpu``): collected everywhere, skipped without CUDA
unless rehearsing (``ATTNBENCH_REHEARSAL=1``: ``python -m runners.gpu_suite --rehearse`` runs
them on the CPU at tiny sizes, the kernels under Triton's interpreter).

- LAVO's chunked pass, compiled path and Triton kernels, both memories, against the float64
  plain path, forward and gradients, in the suite's precisions, at lengths that are multiples
  of neither the window (16), the kernels' chunk (32) nor the chunked pass's (256);
- the mechanisms with ``backend="fla"`` against their PyTorch path;
- every task's own ``presets/tiny.yaml`` through the executor, in-process tasks under bf16
  autocast;
- the LM task's token-by-token stream with LAVO: the decoding state's size stays constant.

The checks themselves are :mod:`runners.suite_checks`; the sizes :data:`~runners.suite_checks.SCALES`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from runners.suite_checks import (
    FLA_MECHANISMS,
    TOLERANCE,
    fla_backend_errors,
    lavo_backend_errors,
    rehearsing,
    run_task_smoke,
    stream_check,
    suite_scale,
)
from tasks.registry import get_task, list_tasks

SCALE = suite_scale()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not rehearsing(),
                       reason="needs a CUDA device (the GPU suite: tox -e gpu), or "
                              "ATTNBENCH_REHEARSAL=1 (python -m runners.gpu_suite --rehearse)"),
]

BACKENDS = {"kv": ("chunked", "compile", "triton"), "input": ("chunked", "compile", "triton")}
"""The fast backends of each LAVO memory."""
CASES = [(backend, memory) for memory, names in BACKENDS.items() for backend in names]
FLA_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 6e-2, torch.float16: 3e-2}


def _runnable(backend: str, dtype: torch.dtype, *, variant: bool = False) -> None:
    """Skip what this process cannot run: Triton without a GPU or the interpreter; in the
    rehearsal, the compiled path beyond causal average float32 (``variant``: another pattern or
    combination): each compiles anew, minutes each on a loaded 2-core CPU."""
    if backend == "triton" and SCALE.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU under TRITON_INTERPRET=1 only")
    if backend == "compile" and rehearsing() and (dtype != torch.float32 or variant):
        pytest.skip("the rehearsal compiles causal average float32 only")


def _assert_close(errors: dict[str, float], tolerance: float, label: str) -> None:
    print(label, {name: f"{error:.1e}" for name, error in errors.items()})
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"{label}: {bad} (tolerance {tolerance})"


@pytest.mark.parametrize("dtype", SCALE.dtypes, ids=str)
@pytest.mark.parametrize("length", SCALE.lengths)
@pytest.mark.parametrize(("backend", "memory"), CASES)
def test_lavo_backend_equals_plain_path_causal(backend, memory, length, dtype):
    _runnable(backend, dtype)
    errors = lavo_backend_errors(backend, memory=memory, pattern="causal_self", combine="average",
                                 dtype=dtype, length=length, scale=SCALE)
    _assert_close(errors, TOLERANCE[dtype], f"{backend} {memory} causal L={length} {dtype}")


@pytest.mark.parametrize("combine", ["average", "joint"])
@pytest.mark.parametrize(("backend", "memory"), [c for c in CASES if c[0] != "chunked"])
def test_lavo_backend_equals_plain_path_noncausal_and_joint(backend, memory, combine):
    _runnable(backend, torch.float32, variant=True)
    length = SCALE.lengths[0]
    for pattern in ("noncausal_self", "causal_self"):
        errors = lavo_backend_errors(backend, memory=memory, pattern=pattern, combine=combine,
                                     dtype=torch.float32, length=length, scale=SCALE)
        _assert_close(errors, TOLERANCE[torch.float32], f"{backend} {memory} {pattern} {combine}")


@pytest.mark.parametrize("dtype", SCALE.fla_dtypes, ids=str)
@pytest.mark.parametrize("name", FLA_MECHANISMS)
def test_fla_backend_equals_pytorch_path(name, dtype):
    if importlib.util.find_spec("fla") is None:
        pytest.skip("flash-linear-attention is not installed (pip install fla-core)")
    if SCALE.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("fla's kernels run on the CPU under TRITON_INTERPRET=1 only")
    try:
        errors = fla_backend_errors(name, dtype=dtype, scale=SCALE)
    except ValueError as error:  # a documented refusal (fla's delta rule in float32)
        if "backend='fla' cannot run this call" not in str(error):
            raise
        pytest.skip(str(error))
    _assert_close(errors, FLA_TOLERANCE[dtype], f"fla {name} {dtype}")


@pytest.mark.parametrize("task", list_tasks())
def test_task_tiny_preset_in_bf16(task, tmp_path):
    missing = get_task(task).missing_requirements()
    if missing:
        pytest.skip(f"task {task} needs {', '.join(missing)}")
    result = run_task_smoke(task, device=SCALE.device, dtype=torch.bfloat16, workdir=tmp_path)
    metrics = result.metrics
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics


def test_lm_stream_keeps_lavos_state_constant(tmp_path):
    """At every bucket's end (a multiple of LAVO's window at the suite's sizes) the state is the
    running sums alone: one size, whatever the position."""
    check = stream_check(device=SCALE.device, tokens=SCALE.stream_tokens, workdir=tmp_path)
    assert check.tokens == SCALE.stream_tokens
    assert len(check.state_bytes) > 1 and len(set(check.state_bytes)) == 1, check.state_bytes
    print(f"stream of {check.tokens} tokens: {check.tokens_per_second:.0f} tokens/s, state "
          f"{check.state_bytes[0]} bytes, peak {check.peak_memory_mib} MiB")
