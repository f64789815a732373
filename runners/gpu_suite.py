"""The GPU validation suite: one command on a CUDA machine, one file of figures to paste.

``tox -e gpu`` (or ``python -m runners.gpu_suite --out gpu_figures.md``) runs, in order:

1. the tests marked ``gpu`` (``tests/test_gpu.py``): LAVO's Triton kernels, its compiled path
   and its chunked pass against the plain PyTorch path on CUDA (forward and gradients, fp32,
   bf16, fp16, lengths that are multiples of neither chunk nor window); every task's smoke
   settings on CUDA for a few steps (:func:`run_task_smoke`); the decoding state of a LAVO layer
   over a token-by-token stream of 131,072 tokens;
2. one ``attnbench efficiency`` run of LAVO (each backend), SDPA and flash-linear-attention's
   kernels side by side, causal, bf16, batch 1, 8 heads x 64, from 4K to 128K tokens;
3. writes the test summary, the efficiency table and the machine into one Markdown file.

Without CUDA it refuses to start (the tests themselves skip cleanly, so CI collects them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SUITE_LENGTHS = (4096, 16384, 32768, 65536, 131072)
LAVO_VARIANTS = (
    # The default memory="input" on the backends that implement it, and memory="kv" on all.
    "backend=torch", "backend=compile",
    *(f"memory=kv,backend={backend}" for backend in ("torch", "chunked", "compile", "triton")),
)

TASK_SMOKE: dict[str, dict[str, Any]] = {
    # A few optimiser steps of each task's smoke model on its shipped sample.
    "time_series": {"max_train_steps": 3, "max_eval_windows": 16},
    "point_cloud": {"steps": 3},
    "tts_fastspeech2": {"steps": 3, "aligner_steps": 20},
    "tts_transformer": {"steps": 3},
    "lm": {"max_update": 3, "stream_tokens": 64, "threads": 1},
    "summarization": {"max_update": 3},
}
"""Per task, the settings of its few-step smoke run (on top of the task's smoke defaults)."""

CHILD_PROCESS_TASKS = frozenset({"lm", "summarization"})
"""Tasks that train in a fairseq child process: an autocast context of this process does not
reach them, so they run in their own precision (float32)."""


@contextlib.contextmanager
def _autocast(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def run_task_smoke(name: str, *, device: str, dtype: torch.dtype | None, workdir: Path,
                   attention: str = "lavo") -> Mapping[str, float]:
    """Run task ``name`` for a few steps (:data:`TASK_SMOKE`) with ``attention`` in every role,
    under autocast to ``dtype`` (None: the task's own precision); return its metrics."""
    from tasks.base import AttentionChoice, get_task, resolve_attention

    task_class = get_task(name)
    config = task_class.make_config(TASK_SMOKE.get(name, {}))
    choice = resolve_attention(task_class, AttentionChoice(attention))
    with _autocast(device, None if name in CHILD_PROCESS_TASKS else dtype):
        result = task_class().run(config, choice, seed=0, device=device, workdir=workdir)
    return result.metrics


def _efficiency_arguments(results_dir: Path, lengths: Sequence[int]) -> list[str]:
    """One efficiency run: every LAVO backend, SDPA and flash-linear-attention's kernels side by
    side (interleaved at each length)."""
    variants = [x for arguments in LAVO_VARIANTS for x in ("--attention-args", f"lavo:{arguments}")]
    return ["efficiency", "--attention", "lavo,sdpa", *variants, "--compare-fla",
            "--patterns", "causal_self", "--device", "cuda", "--dtype", "bfloat16",
            "--batch", "1", "--heads", "8", "--head-dim", "64",
            "--lengths", ",".join(map(str, lengths)), "--results-dir", str(results_dir)]


def _run_cli(arguments: list[str]) -> str:
    from runners.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(arguments)
    return buffer.getvalue()


def _machine() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return f"{name}; torch {torch.__version__}; CUDA {torch.version.cuda}; python {sys.version.split()[0]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_figures.md"))
    parser.add_argument("--lengths", default=",".join(map(str, SUITE_LENGTHS)))
    parser.add_argument("--skip-tests", action="store_true", help="only the efficiency runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False); nothing ran",
              file=sys.stderr)
        return 2
    sections = [f"# GPU validation figures\n\nMachine: {_machine()}\n"]
    started = time.perf_counter()
    status = 0
    if not args.skip_tests:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA",
             "-p", "no:cacheprovider"], capture_output=True, text=True, check=False)
        status = tests.returncode
        sections.append("## Tests marked gpu\n\n```\n" + tests.stdout[-20000:] + "\n```\n")
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as results:
        arguments = _efficiency_arguments(Path(results), lengths)
        command = "attnbench " + " ".join(arguments[:-2])
        sections.append(f"## `{command}`\n\n```\n{_run_cli(arguments)}\n```\n")
    sections.append(f"Whole suite: {time.perf_counter() - started:.0f} s.\n")
    args.out.write_text("\n".join(sections))
    print(f"gpu_suite: figures in {args.out} (tests exit status {status})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
