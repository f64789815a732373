"""The task contract over every registered task (built-in and installed third-party ones), as
tests/test_contract.py runs the zoo's contract over every mechanism: a new task is tested
without anyone writing a test for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from tasks.registry import get_task, list_tasks
from tasks.testing import check_task_contract


@pytest.mark.parametrize("name", list_tasks())
def test_task_contract(name, tmp_path):
    task = get_task(name)
    missing = task.missing_requirements()
    if missing:
        pytest.skip(f"task {name} needs {', '.join(missing)}")
    check_task_contract(task, tmp_path)


BUILT_IN = sorted(p.parent.name for p in Path(tasks.__file__).parent.glob("*/task.py"))
SHAPE = ("task.py", "data.py", "model.py", "metrics.py", "README.md", "presets/smoke.yaml",
         "presets/paper.yaml", "presets/tiny.yaml")


@pytest.mark.parametrize("folder", BUILT_IN)
def test_every_built_in_task_folder_has_the_same_shape(folder):
    root = Path(tasks.__file__).parent / folder
    assert [name for name in SHAPE if not (root / name).is_file()] == []
    assert not (root / "__main__.py").exists()  # a task runs through `attnbench run`


def test_listing_the_tasks_imports_no_backbone():
    """The specs are read without importing fairseq, ESPnet or a task's data libraries."""
    script = ("import sys\nfrom tasks.registry import list_tasks, task_spec\n"
              "[task_spec(name) for name in list_tasks()]\n"
              "heavy = {'fairseq', 'espnet', 'espnet2', 'librosa', 'soundfile', 'pandas', 'tokenizers'}\n"
              "loaded = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
              "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
