"""The GPU validation suite: one command on a CUDA machine, one file of figures to paste; and
its rehearsal on the CPU at tiny sizes.

``tox -e gpu`` (or ``python -m runners.gpu_suite --out gpu_figures.md``) runs, in order:

1. the tests marked ``gpu`` (``tests/test_gpu.py``, checks in :mod:`runners.suite_checks`):
   LAVO's chunked pass, compiled path and Triton kernels (both memories) against the float64
   plain path on CUDA, forward and gradients, fp32 / bf16 / fp16, lengths that are multiples
   of neither chunk nor window; fla's kernels behind ``backend="fla"`` against the PyTorch
   path; every task's own ``presets/tiny.yaml`` through the executor, in-process tasks under
   bf16 autocast; the decoding state of a LAVO language model over a token-by-token stream of
   131,072 tokens;
2. one ``attnbench efficiency`` run of LAVO (each backend), SDPA and flash-linear-attention's
   kernels side by side, causal, bf16, batch 1, 8 heads x 64, from 4K to 128K tokens;
3. writes the test summary, the efficiency table and the machine into one Markdown file.

``--rehearse`` runs every stage on the CPU at tiny sizes (``ATTNBENCH_REHEARSAL=1``, see
:data:`runners.suite_checks.SCALES`): the Triton kernels and fla's kernels under Triton's
interpreter, the compiled path in a process of its own (inductor's Triton import stops
interpreted kernels from launching), the tasks, the stream, the efficiency stage with
``--compare-fla``, and the figures file; ``--rehearse --quick`` its quick part (CI). Without
CUDA and without ``--rehearse`` it refuses to start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runners.suite_checks import REHEARSAL_ENV, SCALES

LAVO_VARIANTS = (
    # The default memory="input" and the memory="kv" ablation on every backend of each.
    *(f"backend={backend}" for backend in ("torch", "chunked", "compile", "triton")),
    *(f"memory=kv,backend={backend}" for backend in ("torch", "chunked", "compile", "triton")),
)
SUITE_LENGTHS = SCALES["gpu"].efficiency_lengths
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One stage's outcome: its name, command line, exit status, wall time and output tail."""

    name: str
    command: str
    status: int
    seconds: float
    output: str = ""
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        notes = "".join(f"- {note}\n" for note in self.notes)
        return (f"## {self.name}: {'passed' if self.status == 0 else f'FAILED ({self.status})'}, "
                f"{self.seconds:.0f} s\n\n`{self.command}`\n\n{notes}\n```\n{self.output[-20000:]}\n```\n")


def _environment(*, rehearse: bool, interpret: bool) -> dict[str, str]:
    """This process's environment, with the project on the path and the rehearsal's switches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    env.pop(REHEARSAL_ENV, None)
    if rehearse:
        env[REHEARSAL_ENV] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(name: str, command: list[str], env: dict[str, str]) -> Stage:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    shown = " ".join(command[1:] if command[0] == sys.executable else command)
    return Stage(name, f"python {shown}", done.returncode, time.perf_counter() - started,
                 done.stdout + ("\n" + done.stderr[-5000:] if done.returncode else ""))


def _pytest(selection: str | None = None) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py",
            *(["-k", selection] if selection else []), "-q", "-rA", "-p", "no:cacheprovider"]


QUICK_SELECTION = "(float32 and not compile) or (noncausal_and_joint and triton) or mqar"
"""The rehearsal's quick part (``--quick``, CI): the Triton and fla kernels in float32 under the
interpreter, and the fastest task; the compiled path, the other tasks, the stream and half
precision are left to the whole rehearsal (the ``validation`` tier)."""


def test_stages(*, rehearse: bool, quick: bool = False) -> Iterator[Stage]:
    """The tests marked gpu, each stage as it ends: one process on CUDA; on the CPU two, the
    Triton and fla kernels under the interpreter apart from the compiled path (one, ``quick``)."""
    if not rehearse:
        yield _run("tests marked gpu", _pytest(), _environment(rehearse=False, interpret=False))
        return
    yield _run("tests marked gpu, Triton's interpreter",
               _pytest(QUICK_SELECTION if quick else "not compile"),
               _environment(rehearse=True, interpret=True))
    if not quick:
        yield _run("tests marked gpu, inductor", _pytest("compile"),
                   _environment(rehearse=True, interpret=False))


def efficiency_arguments(results_dir: Path, lengths: Sequence[int], *, device: str = "cuda",
                         dtype: str = "bfloat16", variants: Sequence[str] = LAVO_VARIANTS,
                         compare_fla: bool = True) -> list[str]:
    """One ``attnbench efficiency`` run: LAVO's ``variants``, SDPA and (``compare_fla``)
    flash-linear-attention's kernels side by side (interleaved at each length). On the CPU (the
    rehearsal): 2 heads x 16, one timed call after none for warm-up (the timings of interpreted
    kernels mean nothing; the stage's code paths are what is rehearsed)."""
    arguments = [x for variant in variants for x in ("--attention-args", f"lavo:{variant}")]
    shape = (["--heads", "8", "--head-dim", "64"] if device == "cuda" else
             ["--heads", "2", "--head-dim", "16", "--repeats", "1", "--warmup", "0"])
    return ["efficiency", "--attention", "lavo,sdpa", *arguments,
            *(["--compare-fla"] if compare_fla else []),
            "--patterns", "causal_self", "--device", device, "--dtype", dtype, "--batch", "1",
            *shape, "--lengths", ",".join(map(str, lengths)), "--results-dir", str(results_dir)]


def _efficiency_stage(name: str, arguments: list[str], results: Path, *, rehearse: bool,
                      interpret: bool) -> Stage:
    """Run ``attnbench efficiency`` in its own process; note every cell that did not run."""
    command = [sys.executable, "-m", "runners.gpu_suite", "--efficiency-only", *arguments]
    stage = _run(name, command, _environment(rehearse=rehearse, interpret=interpret))
    stage.command = "attnbench " + " ".join(arguments[:-2])
    for path in sorted(results.glob("efficiency/*/*.json")):
        record = json.loads(path.read_text())
        if record["status"] != "ok":
            stage.notes.append(f"{record['cell']['attention']} {record['cell']['attention_args']} "
                               f"L={record['cell']['length']}: {record['status']}: "
                               f"{record.get('error', '')[:300]}")
    if rehearse and stage.status != 0 and stage.notes and not any(map(_unexpected, stage.notes)):
        # attnbench exits 1 when a cell fails; these are the interpreter's known failures.
        stage.status = 0
        stage.notes.append("every cell that did not run is a known failure of Triton's "
                           "interpreter (runners/interpreter.py, FLA_INTERPRETER_FAILURES)")
    return stage


def efficiency_stages(lengths: Sequence[int], *, rehearse: bool, quick: bool = False) -> list[Stage]:
    """The efficiency run; on the CPU, the interpreted cells apart from the compiled ones
    (only the interpreted ones, at the first length, ``quick``)."""
    stages = []
    with tempfile.TemporaryDirectory() as folder:
        if not rehearse:
            arguments = efficiency_arguments(Path(folder), lengths)
            return [_efficiency_stage("efficiency", arguments, Path(folder), rehearse=False,
                                      interpret=False)]
        compiled = [v for v in LAVO_VARIANTS if "compile" in v]
        parts = [("Triton's interpreter", [v for v in LAVO_VARIANTS if v not in compiled], True, True),
                 ("inductor", compiled, False, False)]
        lengths = lengths[:1] if quick else lengths
        for label, variants, fla, interpret in parts[:1] if quick else parts:
            results = Path(folder) / ("interpreter" if interpret else "inductor")
            arguments = efficiency_arguments(results, lengths, device="cpu", dtype="float32",
                                             variants=variants, compare_fla=fla)
            stages.append(_efficiency_stage(f"efficiency, {label}", arguments, results,
                                            rehearse=True, interpret=interpret))
    return stages


def efficiency_only(arguments: list[str]) -> int:
    """``attnbench efficiency`` with fla's interpreter shims applied first (when interpreting)."""
    from runners.cli import main as cli
    from runners.interpreter import interpreting, shim_fla_for_interpreter

    if interpreting():
        shim_fla_for_interpreter()
    return cli(arguments)


def _machine() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    return (f"{name}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
            f"python {sys.version.split()[0]}")


def run_suite(out: Path, lengths: Sequence[int], *, rehearse: bool, skip_tests: bool,
              quick: bool = False) -> int:
    """Every stage in order, the figures file rewritten after each (a run cut short keeps what
    it did); 0 when every stage passed."""
    started = time.perf_counter()
    stages: list[Stage] = []
    if not skip_tests:
        for stage in test_stages(rehearse=rehearse, quick=quick):
            stages.append(stage)
            _write_figures(out, stages, rehearse=rehearse, started=started, done=False)
    stages += efficiency_stages(lengths, rehearse=rehearse, quick=quick)
    summary = _write_figures(out, stages, rehearse=rehearse, started=started, done=True)
    print(f"gpu_suite: {summary}; figures in {out}")
    return 0 if summary == "every stage passed" else 1


def _write_figures(out: Path, stages: list[Stage], *, rehearse: bool, started: float,
                   done: bool) -> str:
    """Write the figures file of the stages so far; return its summary line."""
    title = "GPU suite rehearsal on the CPU" if rehearse else "GPU validation figures"
    failed = [s.name for s in stages if s.status != 0 or (s.notes and not rehearse)]
    summary = ("every stage passed" if not failed
               else f"FAILED: {', '.join(dict.fromkeys(failed))}")
    progress = "whole suite" if done else "still running, so far"
    out.write_text(f"# {title}\n\nMachine: {_machine()}\n\n{summary}; {progress} "
                   f"{time.perf_counter() - started:.0f} s.\n\n"
                   + "\n".join(s.markdown() for s in stages))
    return summary


def _unexpected(note: str) -> bool:
    """Whether a cell that did not run in the rehearsal is not a known interpreter failure."""
    from runners.interpreter import FLA_INTERPRETER_FAILURES

    return not any(note.startswith(f"fla_{kernel.removeprefix('chunk_')}")
                   for kernel in FLA_INTERPRETER_FAILURES)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--efficiency-only"]:
        return efficiency_only(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m runners.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="the figures file (gpu_figures.md; rehearsal_figures.md with --rehearse)")
    parser.add_argument("--lengths", default=None, help="efficiency lengths, comma-separated")
    parser.add_argument("--skip-tests", action="store_true", help="only the efficiency stage")
    parser.add_argument("--rehearse", action="store_true",
                        help="every stage on the CPU at tiny sizes (Triton's interpreter)")
    parser.add_argument("--quick", action="store_true",
                        help="with --rehearse: its quick part (CI), see QUICK_SELECTION")
    args = parser.parse_args(argv)
    if args.quick and not args.rehearse:
        parser.error("--quick goes with --rehearse")
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False); nothing ran "
              "(python -m runners.gpu_suite --rehearse runs the stages on the CPU)", file=sys.stderr)
        return 2
    scale = SCALES["rehearsal" if args.rehearse else "gpu"]
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
               else list(scale.efficiency_lengths))
    out = args.out or Path("rehearsal_figures.md" if args.rehearse else "gpu_figures.md")
    return run_suite(out, lengths, rehearse=args.rehearse, skip_tests=args.skip_tests,
                     quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
