"""Shared fixtures: seeded, CPU-only, and a registry that each test may extend safely."""

from __future__ import annotations

import pytest
import torch

from attention_zoo import registry


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def scratch_registry():
    """Lets a test register mechanisms; the registry is restored afterwards."""
    saved = dict(registry._REGISTRY)
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def pytest_addoption(parser):
    parser.addoption("--run-validation", action="store_true",
                     help="also run the tests marked validation (minutes on 2 CPU cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("run_validation"):
        return
    skip = pytest.mark.skip(reason="validation: minutes on 2 CPU cores; run with --run-validation")
    for item in items:
        if item.get_closest_marker("validation") is not None:
            item.add_marker(skip)


@pytest.fixture
def scratch_tasks():
    """Lets a test register tasks; the task registry is restored afterwards."""
    from tasks import registry as task_registry

    task_registry.list_tasks()  # the built-in tasks are registered before the snapshot
    saved = dict(task_registry._REGISTRY)
    yield task_registry
    task_registry._REGISTRY.clear()
    task_registry._REGISTRY.update(saved)
