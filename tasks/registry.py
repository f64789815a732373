"""The task registry: register a task once, and the runner, the contract test, the analysis and
``attnbench tasks`` find it by name (as the zoo's registry does for mechanisms).

Built-in tasks are the folders ``tasks/<name>/`` with a ``task.py`` whose :class:`~tasks.base.Task`
subclass carries ``@register_task``. Third-party packages add tasks through the ``attnbench.tasks``
entry-point group (loaded lazily, when the task is asked for by name)::

    [project.entry-points."attnbench.tasks"]
    my_task = "my_package.task:MyTask"

Datasets (``attnbench data fetch``) come from the tasks' ``datasets`` declarations and the
``attnbench.datasets`` entry-point group; preparation tools (``attnbench data prepare``) from
the tasks' ``data_tools``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from attention_zoo import AttentionConfigError, HyperParameter, Pattern, attention_spec, list_attentions
from tasks.base import Metric, Task, load_object

ENTRY_POINT_GROUP = "attnbench.tasks"
DATASET_GROUP = "attnbench.datasets"
_TASKS_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_REGISTRY: dict[str, type[Task]] = {}
_builtins_loaded = False
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator that registers a :class:`Task` subclass under its ``name``, checking its
    declarations (so a malformed task fails at import, not in the middle of a sweep)."""
    _check_declarations(cls)
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise AttentionConfigError(f"task {cls.name!r} is registered twice ({existing.__module__}."
                                   f"{existing.__qualname__} and {cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _check_declarations(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task: {cls!r} is not a Task subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise AttentionConfigError(f"task {cls.__qualname__}: name must be lower_snake_case, got {name!r}")
    if not cls.roles or not all(isinstance(p, Pattern) for p in cls.roles.values()):
        raise AttentionConfigError(f"task {name}: roles must map each role to a Pattern")
    if not cls.metrics or not all(isinstance(m, Metric) for m in cls.metrics):
        raise AttentionConfigError(f"task {name}: metrics must be a non-empty tuple of Metric")
    cls.config_fields()  # a Config that is not a dataclass with type hints fails here


def _load_builtins() -> None:
    """Import every ``tasks/<name>/task.py`` (light modules: their backbones load in stages)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for path in sorted(_TASKS_DIR.glob("*/task.py")):
        importlib.import_module(f"tasks.{path.parent.name}.task")


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def list_tasks() -> list[str]:
    """Names of the built-in and installed third-party tasks (entry points are not imported)."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points(ENTRY_POINT_GROUP)))


def get_task(name: str) -> type[Task]:
    """The task class ``name``; unknown names list the known tasks."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_point = _entry_points(ENTRY_POINT_GROUP).get(name)
    if entry_point is None:
        raise AttentionConfigError(f"unknown task {name!r}; known: {', '.join(list_tasks()) or '-'}")
    task = entry_point.load()
    if not (isinstance(task, type) and issubclass(task, Task)):
        raise TypeError(f"entry point {name!r} ({entry_point.value}) is not a Task subclass")
    if task.name != name:
        raise AttentionConfigError(f"entry point {name!r} ({entry_point.value}) names a task "
                                   f"called {task.name!r}")
    _check_declarations(task)
    return task


def fitting_attentions(task: type[Task], role: str | None = None) -> list[str]:
    """Registered mechanisms that support the pattern of ``role`` (None: of every role)."""
    patterns = list(task.roles.values()) if role is None else [task.roles[role]]
    return [name for name in list_attentions()
            if all(attention_spec(name).supports(p) for p in patterns)]


@dataclass(frozen=True)
class TaskSpec:
    """What a task declares, read without building anything (``attnbench tasks``)."""

    name: str
    description: str
    roles: dict[str, Pattern]
    metrics: tuple[Metric, ...]
    settings: tuple[HyperParameter, ...]
    presets: list[str]
    missing_requirements: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "roles": {role: {"pattern": pattern.value,
                             "attentions": fitting_attentions(get_task(self.name), role)}
                      for role, pattern in self.roles.items()},
            "metrics": [{"name": m.name, "better": "higher" if m.higher_is_better else "lower",
                         "description": m.description} for m in self.metrics],
            "settings": [{"name": s.name, "type": s.type_name, "default": s.default, "help": s.help}
                         for s in self.settings],
            "presets": self.presets, "missing_requirements": self.missing_requirements,
        }


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``."""
    task = get_task(name)
    return TaskSpec(name=task.name, description=(task.__doc__ or "").strip().split("\n")[0],
                    roles=dict(task.roles), metrics=tuple(task.metrics),
                    settings=task.config_fields(), presets=task.preset_names(),
                    missing_requirements=task.missing_requirements())


def _declared(kind: str) -> dict[str, str]:
    """``datasets`` or ``data_tools`` of every built-in task: name -> ``"module:function"``."""
    _load_builtins()
    return {name: ref for task in _REGISTRY.values() for name, ref in getattr(task, kind).items()}


def list_datasets() -> list[str]:
    """Names of the datasets ``attnbench data fetch`` knows."""
    return sorted(set(_declared("datasets")) | set(_entry_points(DATASET_GROUP)))


def get_fetcher(name: str) -> Callable[[Path], Path]:
    """The download function of dataset ``name``: ``fetch(destination) -> data folder``."""
    declared = _declared("datasets")
    if name in declared:
        return load_object(declared[name])
    entry_point = _entry_points(DATASET_GROUP).get(name)
    if entry_point is None:
        raise AttentionConfigError(f"unknown dataset {name!r}; known: {', '.join(list_datasets()) or '-'}")
    return entry_point.load()


def list_data_tools() -> list[str]:
    """Names of the data-preparation tools ``attnbench data prepare`` runs."""
    return sorted(_declared("data_tools"))


def get_data_tool(name: str) -> Callable[[list[str]], Any]:
    """The ``main(argv)`` of data-preparation tool ``name``."""
    declared = _declared("data_tools")
    if name not in declared:
        raise AttentionConfigError(f"unknown data tool {name!r}; known: {', '.join(sorted(declared)) or '-'}")
    return load_object(declared[name])
