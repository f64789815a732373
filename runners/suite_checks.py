"""The checks of the GPU suite, written once for any device: on CUDA at the suite's sizes
(``tests/test_gpu.py`` under ``tox -e gpu``), on the CPU at tiny sizes (the rehearsal,
``python -m runners.gpu_suite --rehearse``).

- :func:`lavo_backend_errors`: a LAVO backend against the float64 plain path, forward and
  gradients, through a whole :class:`~attention_zoo.MultiHeadAttention` layer (so that
  ``memory="input"`` gets its layer input and its projections receive their gradients);
- :func:`fla_backend_errors`: a mechanism on fla's kernels (``backend="fla"``) against its
  PyTorch path, forward and gradients, in one layer;
- :func:`run_task_smoke`: a task's own ``presets/tiny.yaml`` through the one executor
  (:func:`runners.execute.execute`), optionally under autocast;
- :func:`stream_check`: LAVO's decoding state over a long token-by-token stream of the LM task.

:data:`SCALES` holds the two sets of sizes; :func:`suite_scale` picks one (the environment
variable ``ATTNBENCH_REHEARSAL=1`` selects the rehearsal's).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REHEARSAL_ENV = "ATTNBENCH_REHEARSAL"


@dataclass(frozen=True)
class SuiteScale:
    """The sizes of one run of the suite's checks.

    Attributes:
        device: where the checks run (``cuda`` or ``cpu``).
        lengths: sequence lengths of the backend checks (multiples of neither the window 16,
            the kernels' chunk 32 nor the chunked pass's 256).
        batch, heads, head_dim: the shape of the backend checks.
        fla_length: sequence length of the fla checks.
        stream_tokens: tokens of the LM streaming check (a multiple of the window and of the
            training context, so that every bucket ends on a window boundary).
        efficiency_lengths: lengths of the efficiency stage.
        dtypes: the precisions the LAVO backends are checked in.
        fla_dtypes: the precisions fla's kernels are checked in. Not bfloat16 on the CPU:
            Triton 3.9's interpreter computes ``tl.dot`` and elementwise arithmetic on bfloat16
            operands wrongly (errors of 1e10 and more, measured; float16 and conversions are
            exact), and fla's kernels compute on bfloat16 tiles (the zoo's LAVO kernels
            convert to float32 first).
    """

    device: str
    lengths: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    fla_length: int
    stream_tokens: int
    efficiency_lengths: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    fla_dtypes: tuple[torch.dtype, ...]


SCALES: dict[str, SuiteScale] = {
    "gpu": SuiteScale("cuda", (1000, 4099), 2, 4, 64, 1000, 131_072,
                      (4096, 16384, 32768, 65536, 131072),
                      (torch.float32, torch.bfloat16, torch.float16),
                      (torch.float32, torch.bfloat16, torch.float16)),
    "rehearsal": SuiteScale("cpu", (37,), 1, 2, 16, 40, 512, (64, 96),
                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16)),
}

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 5e-3}
"""Largest error of a backend relative to the float64 plain path's largest value."""


def rehearsing() -> bool:
    """Whether this process runs the suite's checks as the CPU rehearsal."""
    return os.environ.get(REHEARSAL_ENV) == "1"


def suite_scale() -> SuiteScale:
    """The rehearsal's sizes under ``ATTNBENCH_REHEARSAL=1``, else the GPU's."""
    return SCALES["rehearsal" if rehearsing() else "gpu"]


def _layer(backend: str, memory: str, pattern: str, combine: str, scale: SuiteScale,
           dtype: torch.dtype) -> torch.nn.Module:
    """A seeded LAVO layer on the scale's device, its position bias drawn (not zero)."""
    from attention_zoo import MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(scale.heads * scale.head_dim, scale.heads, attention="lavo",
                               pattern=pattern, attention_args={
                                   "memory": memory, "combine": combine, "backend": backend})
    with torch.no_grad():
        layer.attention.position_bias.normal_()
    return layer.to(device=scale.device, dtype=dtype)


def lavo_backend_errors(backend: str, *, memory: str, pattern: str, combine: str,
                        dtype: torch.dtype, length: int, scale: SuiteScale) -> dict[str, float]:
    """Errors of LAVO's ``backend`` against the float64 plain path, in one layer.

    Input x [B, L, E] and a gradient of the output; the errors are the largest absolute
    differences of the output, of dx and of every parameter's gradient, each relative to the
    largest value of the reference.

    Returns:
        name ("out", "input", or a parameter's name) -> relative error.
    """
    generator = torch.Generator().manual_seed(length)
    width = scale.heads * scale.head_dim
    x = torch.randn(scale.batch, length, width, generator=generator).to(scale.device)
    grad_out = torch.randn(scale.batch, length, width, generator=generator).to(scale.device)
    results = {}
    for name, layer_backend, layer_dtype in (("plain", "torch", torch.float64),
                                             ("fast", backend, dtype)):
        layer = _layer(layer_backend, memory, pattern, combine, scale, layer_dtype)
        inputs = x.to(layer_dtype).clone().requires_grad_()
        out = layer(inputs)
        out.backward(grad_out.to(layer_dtype))
        results[name] = {"out": out.detach(), "input": inputs.grad,
                         **{n: p.grad for n, p in layer.named_parameters()}}
    return relative_errors(results["fast"], results["plain"])


def _relative(got: Tensor | None, want: Tensor | None, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor); 0 when both are absent."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    scale = max(want.abs().max().item(), floor) or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


def relative_errors(got: Mapping[str, Tensor | None], want: Mapping[str, Tensor]) -> dict[str, float]:
    """Each tensor's largest error relative to its reference's largest value, or to a tenth of
    the largest reference gradient if that is larger: a gradient that cancels to nearly zero in
    exact arithmetic (a key bias under a softmax that is invariant to it) is held to the
    rounding of the gradients around it, not to its own tiny size."""
    gradients = [t.abs().max().item() for name, t in want.items() if name != "out"]
    floor = 0.1 * max(gradients, default=0.0)
    return {name: _relative(got.get(name), reference, 0.0 if name == "out" else floor)
            for name, reference in want.items()}


FLA_MECHANISMS = ("gla", "hgrn2", "mamba2", "retnet", "deltanet", "gated_deltanet", "based")
"""The mechanisms with ``backend="fla"``: the gated recurrences run fla's chunk kernels
(``fla_recurrence``), Based its fused chunk kernel."""


@contextlib.contextmanager
def fla_on_this_device(device: str) -> Iterator[None]:
    """Let the mechanisms call fla's kernels on ``device`` for the block: on CUDA as they are;
    on the CPU only under Triton's interpreter with fla's shims (:mod:`runners.interpreter`),
    by telling the mechanisms' availability check that fla runs here."""
    if device != "cpu":
        yield
        return
    from attention_zoo.mechanisms import based, gated_recurrence
    from runners.interpreter import fla_runs_here, shim_fla_for_interpreter

    shim_fla_for_interpreter()
    if not fla_runs_here():
        raise RuntimeError("fla's kernels run on the CPU only under TRITON_INTERPRET=1")
    saved = gated_recurrence.fla_unavailable
    gated_recurrence.fla_unavailable = based.fla_unavailable = lambda device: None
    try:
        yield
    finally:
        gated_recurrence.fla_unavailable = based.fla_unavailable = saved


def fla_backend_errors(name: str, *, dtype: torch.dtype, scale: SuiteScale) -> dict[str, float]:
    """Mechanism ``name`` with ``backend="fla"`` in ``dtype`` against ``backend="torch"`` in
    float32, in one causal layer of the same seeded weights and input x [B, L, E].

    Returns:
        "out", "input" and each parameter's name -> error relative to the torch path's largest
        value.
    """
    from attention_zoo import MultiHeadAttention

    width = scale.heads * scale.head_dim
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(scale.batch, scale.fla_length, width, generator=generator)
    results = {}
    for backend, layer_dtype in (("torch", torch.float32), ("fla", dtype)):
        torch.manual_seed(0)
        layer = MultiHeadAttention(width, scale.heads, attention=name, pattern="causal_self",
                                   attention_args={"backend": backend})
        layer = layer.to(device=scale.device, dtype=layer_dtype)
        inputs = x.to(scale.device, layer_dtype).clone().requires_grad_()
        with fla_on_this_device(scale.device):
            out = layer(inputs)
        out.float().square().mean().backward()
        results[backend] = {"out": out.detach().float(), "input": inputs.grad.float(),
                            **{n: p.grad.float() for n, p in layer.named_parameters()
                               if p.grad is not None}}
    return relative_errors(results["fla"], results["torch"])


@contextlib.contextmanager
def autocast_to(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``'s type for the block (None: no autocast)."""
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def trains_in_a_child_process(task: type) -> bool:
    """Whether ``task`` trains in a child process (fairseq-train), which an autocast context of
    this process does not reach."""
    from tasks.backends.fairseq_training import FairseqTask

    return issubclass(task, FairseqTask)


def tiny_settings(task: type) -> Mapping[str, Any]:
    """The settings of ``task``'s own ``presets/tiny.yaml`` (its first variant)."""
    return task.preset("tiny").parts[0].settings[0]


def run_task_smoke(name: str, *, device: str, dtype: torch.dtype | None, workdir: Path,
                   attention: str = "lavo", overrides: Mapping[str, Any] | None = None) -> Any:
    """Task ``name``'s tiny preset through the executor, ``attention`` in every role, under
    autocast to ``dtype`` for the tasks that train in this process (None: their own precision).

    Args:
        overrides: settings on top of the preset (none in the suite; for a caller that must
            keep, say, a longer stream table).

    Returns:
        the :class:`~tasks.base.TaskResult`.
    """
    from runners.execute import execute
    from tasks.base import AttentionChoice
    from tasks.registry import get_task

    task = get_task(name)
    config = task.make_config({**tiny_settings(task), **(overrides or {})})
    in_process = not trains_in_a_child_process(task)
    with autocast_to(device, dtype if in_process else None):
        return execute(task, config, AttentionChoice(attention), seed=0, device=device,
                       workdir=workdir, threads=1 if device == "cpu" else 0)


@dataclass(frozen=True)
class StreamCheck:
    """What :func:`stream_check` measured."""

    tokens: int
    state_bytes: tuple[int, ...]
    tokens_per_second: float
    peak_memory_mib: float | None


def stream_check(*, device: str, tokens: int, workdir: Path) -> StreamCheck:
    """The LM task's tiny run with LAVO, then ``tokens`` tokens streamed one at a time through
    its checkpoint (the test split repeated); the decoding state's size per bucket."""
    from tasks.lm import data as lm_data
    from tasks.lm.metrics import split_tokens, stream
    from tasks.lm.model import load_model
    from tasks.lm.task import LanguageModelingTask

    result = run_task_smoke("lm", device=device, dtype=None, workdir=workdir)
    config = LanguageModelingTask.make_config(tiny_settings(LanguageModelingTask))
    prepared = lm_data.prepare(lm_data.SAMPLE_DIR, tokenizer=config.tokenizer,
                               vocab_size=config.vocab_size, cache=lm_data.cache_root())
    model = load_model(Path(result.extra["checkpoint"]), prepared.data_bin, device,
                       max_positions=tokens)
    test_tokens, eos = split_tokens(prepared.data_bin, "test")
    test_tokens = test_tokens.repeat(math.ceil(tokens / len(test_tokens)))[:tokens]
    streamed = stream(model, test_tokens, bos=eos, context=config.seq_len)
    return StreamCheck(streamed.tokens, tuple(b["state_bytes"] for b in streamed.buckets),
                       streamed.tokens_per_second, streamed.peak_memory_mib)
