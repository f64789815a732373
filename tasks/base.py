"""The one interface through which a task (a backbone with its data and metrics) plugs into
attnbench: the runner, the sweeps and the analysis see tasks only through this.

A task is a :class:`Task` subclass named in the ``attnbench.tasks`` entry-point group of
``pyproject.toml`` (loaded lazily, so a task's heavy dependencies, fairseq or ESPnet, are only
imported when that task runs). Its datasets' download commands are callables in the
``attnbench.datasets`` group (``attnbench data fetch NAME``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import torch

from attention_zoo import AttentionConfigError, HyperParameter, Pattern, attention_spec

TASK_GROUP = "attnbench.tasks"
DATASET_GROUP = "attnbench.datasets"


class DatasetUnavailable(RuntimeError):
    """A dataset that cannot be fetched unattended; the message says how to get it by hand."""


class DataError(ValueError):
    """A malformed data file: the message names the file, the row or column where it applies,
    and what was expected. Raised while a task reads its data, before any training."""


@dataclass(frozen=True)
class AttentionChoice:
    """A mechanism with its hyperparameters, for one attention role of a backbone."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.name}({args})" if args else self.name


METRIC_KINDS = ("quality", "cost", "diagnostic")


@dataclass(frozen=True)
class Metric:
    """A metric a task reports, and which direction is better (for tables and CAB's index).

    ``kind`` says where it belongs: ``quality`` metrics rank mechanisms (leaderboards, CAB's
    index; the first declared is the task's primary metric); ``cost`` metrics (throughput, time,
    memory) go to the cost tables; a ``diagnostic`` (a generated-to-reference length ratio) is
    shown beside the quality metrics and never ranked.
    """

    name: str
    higher_is_better: bool
    description: str = ""
    kind: str = "quality"

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise ValueError(f"metric {self.name!r}: unknown kind {self.kind!r}; "
                             f"valid: {', '.join(METRIC_KINDS)}")


@dataclass
class TaskResult:
    """What one run of a task returns; the runner adds configuration and provenance.

    Attributes:
        metrics: every declared metric by name (plus any extra scalars the task measures).
        parameters: trainable parameters of the whole model.
        attention_parameters: parameters inside the attention mechanisms (projections excluded),
            for CAB's fairness rule (flag a mechanism adding more than 10% parameters).
        train_seconds, eval_seconds: wall time of training and evaluation.
        peak_memory_mib: peak memory of training (CUDA allocator, or CPU profiler estimate).
        extra: curves, per-category breakdowns, artifact paths: anything JSON-serialisable.
    """

    metrics: dict[str, float]
    parameters: int
    attention_parameters: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    peak_memory_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """A benchmark task. Subclasses declare, as class attributes:

    - ``name``: the entry-point name (``"lm"``, ``"time_series"``...).
    - ``roles``: the backbone's attention slots and the pattern each needs, e.g.
      ``{"encoder_self": Pattern.NONCAUSAL_SELF, "decoder_self": Pattern.CAUSAL_SELF,
      "cross": Pattern.NONCAUSAL_CROSS}``.
    - ``metrics``: the metrics it reports (quality first: the first is the primary metric).
    - ``smoke_ranks``: True when the smoke size (the ``Config`` defaults) ranks mechanisms; by
      default its numbers are a pipeline check and the tables say so.
    - ``Config``: a dataclass of its settings; defaults are the smoke size that runs on CPU
      with the shipped sample, and presets override fields.

    and implement :meth:`run`.
    """

    name: ClassVar[str]
    roles: ClassVar[Mapping[str, Pattern]]
    metrics: ClassVar[tuple[Metric, ...]]
    Config: ClassVar[type]
    smoke_ranks: ClassVar[bool] = False

    @abc.abstractmethod
    def run(
        self,
        config: Any,
        attention: Mapping[str, AttentionChoice],
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        """Train and evaluate once.

        Args:
            config: an instance of ``Config``.
            attention: one :class:`AttentionChoice` per role (see :func:`resolve_attention`).
            seed: seeds every random number generator the run uses.
            device: ``"cpu"`` or ``"cuda[:N]"``.
            workdir: a private folder for checkpoints and artifacts.
        """

    @classmethod
    def attention_shapes(cls, config: Any) -> Mapping[str, tuple[int, int]]:
        """``{role: (heads, head_dim)}``: the shape each attention role gets when the model is
        built with ``config``, so that a sweep checks every mechanism's hyperparameters against
        it before any cell runs. The default, ``{}``, declares nothing (hyperparameters are
        then checked by type only); settings that give no valid shape raise
        :class:`AttentionConfigError`."""
        return {}

    @classmethod
    def check_settings(cls, config: Any) -> None:
        """Check ``config`` against what is known before a run (the size of the data, where it
        is at hand) and raise :class:`AttentionConfigError` naming what does not fit. The
        default checks nothing beyond the types of the fields."""
        return None

    @classmethod
    def config_fields(cls) -> tuple[HyperParameter, ...]:
        """The typed fields of ``Config`` (for validating overrides before anything runs)."""
        hints = typing.get_type_hints(cls.Config)
        return tuple(
            HyperParameter(name=f.name, annotation=hints[f.name], default=f.default,
                           help=f.metadata.get("help", ""), minimum=f.metadata.get("min"))
            for f in dataclasses.fields(cls.Config)
        )

    @classmethod
    def make_config(cls, overrides: Mapping[str, Any] | None = None) -> Any:
        """``Config`` with ``overrides`` checked by type; unknown keys name the valid ones."""
        fields = {hp.name: hp for hp in cls.config_fields()}
        checked = {}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise AttentionConfigError(
                    f"task {cls.name}: unknown setting {key!r}; valid: {', '.join(fields)}"
                )
            hp, owner = fields[key], f"task {cls.name}"
            # Strings come from the command line or YAML and are parsed by the field's type.
            checked[key] = hp.parse(value, owner) if isinstance(value, str) else hp.check(value, owner)
        return cls.Config(**checked)


def resolve_attention(
    task: type[Task], attention: AttentionChoice | Mapping[str, AttentionChoice]
) -> dict[str, AttentionChoice]:
    """One choice per role, checked before any training starts.

    ``attention`` is either one choice for every role, or a mapping from role to choice that
    names every role. Each mechanism must support its role's pattern and accept its
    hyperparameters; otherwise an :class:`AttentionConfigError` names what is wrong.
    """
    if isinstance(attention, AttentionChoice):
        per_role = dict.fromkeys(task.roles, attention)
    else:
        per_role = dict(attention)
        unknown = sorted(set(per_role) - set(task.roles))
        missing = sorted(set(task.roles) - set(per_role))
        if unknown or missing:
            raise AttentionConfigError(
                f"task {task.name}: attention roles are {', '.join(task.roles)}; "
                f"unknown: {unknown or '-'}, missing: {missing or '-'}"
            )
    for role, choice in per_role.items():
        spec = attention_spec(choice.name)
        pattern = task.roles[role]
        if pattern not in spec.patterns:
            supported = ", ".join(sorted(p.value for p in spec.patterns))
            raise AttentionConfigError(
                f"task {task.name}: role {role!r} needs {pattern.value} attention, which "
                f"{choice.name!r} does not support (it supports: {supported})"
            )
        spec.make_config(choice.args)
    return per_role


def split_heads(width: int, heads: int, owner: str) -> tuple[int, int]:
    """``(heads, width // heads)`` for a model of ``width`` split into ``heads`` heads; an
    :class:`AttentionConfigError` naming ``owner`` if the heads do not divide the width."""
    if heads < 1 or width < 1 or width % heads:
        raise AttentionConfigError(f"{owner}: a width of {width} does not split into {heads} heads "
                                   "of equal dimension; choose a width divisible by the heads")
    return heads, width // heads


def list_tasks() -> list[str]:
    """Names of the installed tasks (without importing them)."""
    return sorted({ep.name for ep in metadata.entry_points(group=TASK_GROUP)})


def get_task(name: str) -> type[Task]:
    """Import and return the task class ``name``; unknown names list the installed tasks."""
    for ep in metadata.entry_points(group=TASK_GROUP):
        if ep.name == name:
            task = ep.load()
            if not (isinstance(task, type) and issubclass(task, Task)):
                raise TypeError(f"entry point {name!r} ({ep.value}) is not a Task subclass")
            return task
    raise AttentionConfigError(f"unknown task {name!r}; installed: {', '.join(list_tasks()) or '-'}")


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (0: leave the setting alone), and
    restore the caller's setting afterwards, whatever the block did."""
    previous = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)


def data_root() -> Path:
    """Where full datasets are fetched to: ``$ATTNBENCH_DATA`` or ``~/.cache/attnbench/data``."""
    return Path(os.environ.get("ATTNBENCH_DATA", Path.home() / ".cache" / "attnbench" / "data"))


def list_datasets() -> list[str]:
    """Names of the datasets ``attnbench data fetch`` knows."""
    return sorted({ep.name for ep in metadata.entry_points(group=DATASET_GROUP)})


def get_fetcher(name: str) -> Callable[[Path], Path]:
    """The download function of dataset ``name``: ``fetch(destination) -> data folder``."""
    for ep in metadata.entry_points(group=DATASET_GROUP):
        if ep.name == name:
            return ep.load()
    raise AttentionConfigError(f"unknown dataset {name!r}; known: {', '.join(list_datasets()) or '-'}")
