"""The GPU suite rehearsed on the CPU (``python -m runners.gpu_suite --rehearse``).

- its quick part (marked ``rehearsal``: CI runs ``pytest -m rehearsal``, about a minute on 2
  cores): LAVO's Triton kernels of both memories and fla's kernels in float32 under Triton's
  interpreter against the PyTorch paths, the fastest task's tiny preset in bf16, the efficiency
  stage at one tiny length with ``--compare-fla``, and the figures file;
- the whole rehearsal (marked ``validation``): every stage, the compiled path in its own
  process, every task, the stream, half precisions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runners import gpu_suite

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _rehearse(tmp_path: Path, *extra: str, timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "figures.md"
    done = subprocess.run([sys.executable, "-m", "runners.gpu_suite", "--rehearse", *extra,
                           "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, out.read_text()


@pytest.mark.rehearsal
@pytest.mark.slow
def test_quick_rehearsal_passes_and_writes_the_figures(tmp_path):
    pytest.importorskip("fla")
    status, figures = _rehearse(tmp_path, "--quick", timeout=600)
    assert status == 0, figures[-5000:]
    assert "every stage passed" in figures
    for check in ("triton-input", "triton-kv", "fla_backend_equals_pytorch_path[gla",
                  "test_task_tiny_preset_in_bf16[mqar]", "lavo(backend=triton)", "fla_linear_attn"):
        assert check in figures, check
    assert "fla_abc" in figures and "known failure" in figures  # named, with its reason


@pytest.mark.validation
def test_whole_rehearsal_passes(tmp_path):
    status, figures = _rehearse(tmp_path, timeout=3600)
    assert status == 0, figures[-5000:]
    for stage in ("Triton's interpreter", "inductor", "efficiency"):
        assert stage in figures, stage
    assert "test_lm_stream_keeps_lavos_state_constant PASSED" in figures or \
        "PASSED tests/test_gpu.py::test_lm_stream_keeps_lavos_state_constant" in figures


def test_quick_goes_with_rehearse_and_the_cpu_arguments_parse(tmp_path, capsys):
    from runners.cli import build_parser

    with pytest.raises(SystemExit):
        gpu_suite.main(["--quick"])
    assert "--quick goes with --rehearse" in capsys.readouterr().err
    arguments = gpu_suite.efficiency_arguments(tmp_path, [64], device="cpu", dtype="float32")
    parsed = build_parser().parse_args(arguments)
    assert parsed.device == "cpu" and parsed.repeats == 1 and parsed.compare_fla
    assert "lavo:backend=triton" in parsed.attention_args
