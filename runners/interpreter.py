"""Running Triton GPU kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``),
for the GPU suite's rehearsal: what it takes, and what still does not run.

The zoo's own LAVO kernels run under the interpreter as they are. flash-linear-attention's
(fla-core 0.6, Triton 3.9) need two shims, both measured (``runners/gpu_suite.py --rehearse``):

- fla wraps most kernels in ``triton.autotune`` with several configs; with more than one config
  the autotuner times them through the GPU driver's benchmarker ("0 active drivers"). The shim
  keeps the first config of each (timings under the interpreter mean nothing anyway).
- fla's chunk kernels call ``.to(tl.int64)`` on the induction variable of a ``for i in
  range(NT)`` loop; the interpreter runs the loop in Python, so the variable is an ``int`` and
  has no ``.to`` (``AttributeError: 'int' object has no attribute 'to'``). The shim gives fla's
  modules a ``range`` that yields int32 scalars of the interpreter, as the compiler does.

What still fails (:data:`FLA_INTERPRETER_FAILURES`) is named with the error it raises.
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

FLA_MODULES = ("fla.ops", "fla.ops.based", "fla.ops.linear_attn", "fla.ops.abc")
"""The fla modules whose kernels the zoo or the efficiency runner call."""

FLA_INTERPRETER_FAILURES = {
    "chunk_abc": ("its backward kernel chunk_abc_bwd_kernel_intra_V loads with a scalar mask "
                  "(fla/ops/abc/chunk.py:620), which the interpreter refuses: "
                  "ValueError('mask has unsupported dtype')"),
}
"""fla kernels that do not run under Triton's interpreter even with the shims, and why."""

_shimmed = False


def interpreting() -> bool:
    """Whether Triton's interpreter is on (it must be before any kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_range(*bounds: Any) -> Iterator[Any]:
    """``range`` for kernel code run by the interpreter: int32 scalars, as compiled code has."""
    import triton.language as tl

    for value in builtins.range(*(int(bound) for bound in bounds)):
        yield tl.full((), value, tl.int32)


def shim_fla_for_interpreter() -> None:
    """Apply both shims (once); a no-op unless :func:`interpreting`.

    Raises:
        ModuleNotFoundError: fla is not installed.
    """
    global _shimmed
    if _shimmed or not interpreting():
        return
    from triton.runtime import autotuner

    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]
    for module in FLA_MODULES:
        importlib.import_module(module)
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops") and module is not None:
            module.range = _interpreter_range  # type: ignore[attr-defined]
    _shimmed = True


def fla_runs_here() -> bool:
    """Whether fla's kernels can run on the CPU in this process (interpreter on, shims applied)."""
    return interpreting() and _shimmed
