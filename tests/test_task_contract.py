"""The task contract over every registered task (built-in and installed third-party ones), as
tests/test_contract.py runs the zoo's contract over every mechanism: a new task is tested
without anyone writing a test for it."""

from __future__ import annotations

import pytest

from tasks.registry import get_task, list_tasks
from tasks.testing import check_task_contract


@pytest.mark.parametrize("name", list_tasks())
def test_task_contract(name, tmp_path):
    task = get_task(name)
    missing = task.missing_requirements()
    if missing:
        pytest.skip(f"task {name} needs {', '.join(missing)}")
    check_task_contract(task, tmp_path)
