"""The task contract: what every registered task must satisfy, checked by one parametrised test
(``tests/test_task_contract.py``), as :mod:`attention_zoo.testing` does for mechanisms.

:func:`check_task_contract` runs every check on one task:

- its declarations: roles, metrics, settings named by the vocabulary (:mod:`tasks.settings`),
  the defaults build a ``Config``, softmax fits every role;
- its presets: ``smoke``, ``paper`` and ``tiny`` exist and every variant builds a ``Config``;
- a mechanism lacking a role's pattern is refused before any stage runs or anything is written;
- a tiny run (the ``tiny`` preset, through the runner's skeleton) with a different mechanism in
  each role reports every declared metric, finite, and parameter counts; the model holds the
  mechanism asked for in each role, with that role's pattern; and nothing is written outside
  the run's workdir (and the cache folder the contract gives it, ``$ATTNBENCH_CACHE``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path

from attention_zoo import Attention, AttentionConfigError, Pattern, registry
from attention_zoo.mechanisms.softmax import SoftmaxAttention
from tasks.base import AttentionChoice, RunContext, Task, TaskResult, resolve_attention
from tasks.registry import fitting_attentions, get_task
from tasks.settings import vocabulary_problems

REQUIRED_PRESETS = ("smoke", "paper", "tiny")
CONTRACT_MECHANISMS = ("linear", "softmax", "sdpa", "cosformer", "performer")
"""Cheap, robust mechanisms the tiny run spreads over the roles (one per role where possible)."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TaskContractError(AssertionError):
    """A task breaks the contract; the message names the task and the check."""


def _fail(task: type[Task], check: str, message: str) -> TaskContractError:
    return TaskContractError(f"task {task.name}: {check}: {message}")


def check_declarations(task: type[Task]) -> None:
    """Settings named by the vocabulary; the defaults build; softmax fits every role."""
    fields = {hp.name: hp.annotation for hp in task.config_fields()}
    problems = vocabulary_problems(fields)
    if problems:
        raise _fail(task, "settings vocabulary", "; ".join(problems))
    task.make_config({})
    resolve_attention(task, AttentionChoice("softmax"))


def check_presets(task: type[Task]) -> None:
    """The required presets exist, and every variant of every preset builds a ``Config``."""
    missing = [name for name in REQUIRED_PRESETS if name not in task.preset_names()]
    if missing:
        raise _fail(task, "presets", f"missing {', '.join(missing)} in {task.folder() / 'presets'}")
    for name in task.preset_names():
        for part in task.preset(name).parts:
            for variant in part.settings:
                sweeps = {k: v if isinstance(v, list) else [v] for k, v in variant.items()}
                for values in itertools.product(*sweeps.values()):
                    try:
                        task.make_config(dict(zip(sweeps, values)))
                    except AttentionConfigError as error:
                        raise _fail(task, f"preset {name}", str(error)) from None


@contextlib.contextmanager
def _scratch_mechanism(lacking: Pattern) -> Iterator[str]:
    """Softmax attention registered for a moment without ``lacking`` among its patterns."""
    name = f"contract_lacks_{lacking.value}"
    saved = dict(registry._REGISTRY)

    class Lacking(SoftmaxAttention):
        """Softmax attention without one pattern (the contract's refusal check)."""

        patterns = frozenset(SoftmaxAttention.patterns - {lacking})
        decoding = SoftmaxAttention.decoding and lacking != Pattern.CAUSAL_SELF

    try:
        registry.register_attention(name)(Lacking)
        yield name
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def check_refuses_missing_pattern(task: type[Task], root: Path) -> None:
    """For each role, a mechanism lacking its pattern is refused, naming the role, before any
    stage runs and before the workdir exists."""
    from runners.execute import execute

    called: list[str] = []

    class Spy(task):  # type: ignore[misc, valid-type]
        def prepare(self, config: object, run: RunContext) -> object:
            called.append("prepare")
            return super().prepare(config, run)

        def build(self, *args: object) -> object:
            called.append("build")
            return super().build(*args)

    Spy.__name__ = Spy.__qualname__ = task.__qualname__
    for role, pattern in task.roles.items():
        workdir = root / f"refused-{role}"
        with _scratch_mechanism(pattern) as lacking:
            try:
                choices = {r: AttentionChoice(lacking if r == role else "softmax") for r in task.roles}
                execute(Spy, task.make_config({}), choices, seed=0, device="cpu", workdir=workdir)
            except AttentionConfigError as error:
                if repr(role) not in str(error):
                    raise _fail(task, "role check", f"the refusal does not name role {role!r}: "
                                                    f"{error}") from None
            else:
                raise _fail(task, "role check", f"{lacking} (no {pattern.value}) was accepted for "
                                                f"role {role!r}")
        if called or workdir.exists():
            raise _fail(task, "role check", f"the refusal came after {called or 'the workdir'}")


def contract_choices(task: type[Task]) -> dict[str, AttentionChoice]:
    """A different cheap mechanism in each role (repeating only when the roles outnumber them)."""
    choices: dict[str, AttentionChoice] = {}
    for role in task.roles:
        fitting = [m for m in CONTRACT_MECHANISMS if m in fitting_attentions(task, role)]
        fresh = [m for m in fitting if m not in {c.name for c in choices.values()}]
        choices[role] = AttentionChoice((fresh or fitting or ["softmax"])[0])
    return choices


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file below ``roots`` (bytecode and git internals aside): path -> (size, mtime)."""
    files = {}
    for root in roots:
        for folder, names, filenames in os.walk(root):
            names[:] = [n for n in names if n not in (".git", "__pycache__", ".ruff_cache", ".tox")]
            for filename in filenames:
                path = Path(folder) / filename
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


@contextlib.contextmanager
def _isolated(root: Path) -> Iterator[Path]:
    """A fresh working directory and cache folder under ``root`` for the block."""
    cwd, cache = root / "cwd", root / "cache"
    cwd.mkdir(parents=True)
    previous_cwd, previous_cache = Path.cwd(), os.environ.get("ATTNBENCH_CACHE")
    os.chdir(cwd)
    os.environ["ATTNBENCH_CACHE"] = str(cache)
    try:
        yield cwd
    finally:
        os.chdir(previous_cwd)
        if previous_cache is None:
            os.environ.pop("ATTNBENCH_CACHE", None)
        else:
            os.environ["ATTNBENCH_CACHE"] = previous_cache


def tiny_run(task: type[Task], root: Path, *, seed: int = 0) -> tuple[TaskResult, object]:
    """The ``tiny`` preset through the runner's skeleton, a different mechanism in each role.
    Returns the result and the trained model (kept by a subclass of the task)."""
    from runners.execute import execute

    kept: dict[str, object] = {}

    class Keeper(task):  # type: ignore[misc, valid-type]
        def evaluate(self, model: object, *args: object) -> dict[str, float]:
            kept["model"] = model
            return super().evaluate(model, *args)

    Keeper.__name__ = Keeper.__qualname__ = task.__qualname__
    config = task.make_config(task.preset("tiny").parts[0].settings[0])
    workdir = root / "run"
    with _isolated(root) as cwd:
        before = _snapshot([PROJECT_ROOT, task.folder(), cwd])
        result = execute(Keeper, config, contract_choices(task), seed=seed, device="cpu",
                         workdir=workdir, threads=1)
        after = _snapshot([PROJECT_ROOT, task.folder(), cwd])
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    if written:
        raise _fail(task, "workdir", f"the run wrote outside its workdir: {', '.join(written[:5])}")
    return result, kept.get("model")


def check_result(task: type[Task], result: TaskResult) -> None:
    """Every declared metric, finite; parameter counts."""
    for metric in task.metrics:
        value = result.metrics.get(metric.name)
        if value is None or not math.isfinite(value):
            raise _fail(task, "metrics", f"{metric.name} is {value!r} (every declared metric must "
                                         f"be reported, finite); reported: {result.metrics}")
    if not result.parameters > 0 or not 0 <= result.attention_parameters <= result.parameters:
        raise _fail(task, "parameters", f"{result.parameters} parameters, "
                                        f"{result.attention_parameters} in attention")


def check_roles_honoured(task: type[Task], model: object) -> None:
    """The model holds each role's mechanism, and with that role's pattern."""
    choices = contract_choices(task)
    found = {(m.name, m.pattern) for m in model.modules() if isinstance(m, Attention)}
    for role, choice in choices.items():
        if (choice.name, task.roles[role]) not in found:
            raise _fail(task, "roles", f"role {role!r} asked for {choice.name} with "
                                       f"{task.roles[role].value}; the model's mechanisms: "
                                       f"{sorted((n, p.value) for n, p in found)}")


def check_task_contract(name: str | type[Task], root: Path) -> None:
    """Every check of the contract on task ``name`` (``root``: an empty scratch folder)."""
    task = get_task(name) if isinstance(name, str) else name
    check_declarations(task)
    check_presets(task)
    check_refuses_missing_pattern(task, root)
    result, model = tiny_run(task, root)
    check_result(task, result)
    check_roles_honoured(task, model)
