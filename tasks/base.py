"""The one interface through which a task (a backbone with its data and metrics) plugs into
attnbench: the runner, the sweeps, the analysis and ``attnbench tasks`` see tasks only through this.

A task is a :class:`Task` subclass registered with :func:`tasks.registry.register_task` (the
built-in tasks: ``tasks/<name>/task.py``; third-party ones: the ``attnbench.tasks`` entry-point
group). Its class attributes are its spec (roles, metrics, typed settings, presets), readable
without importing its backbone: ``task.py`` imports fairseq, ESPnet and the like only inside its
stages. The runner (:func:`runners.execute.execute`) owns the run: seeding, CPU threads, roles,
timers, peak memory and parameter counts; a task implements only its stages (see
``docs/adding_a_task.md``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from attention_zoo import AttentionConfigError, HyperParameter, Pattern, attention_spec


class DatasetUnavailable(RuntimeError):
    """A dataset that cannot be fetched unattended; the message says how to get it by hand."""


class DataError(ValueError):
    """A malformed data file: the message names the file, the row or column where it applies,
    and what was expected. Raised while a task reads its data, before any training."""


def attention_label(name: str, args: Mapping[str, Any] | None = None) -> str:
    """``lavo(r=32,w=16)``: a mechanism with its hyperparameters, sorted (the one label format
    of tables, records and figures)."""
    text = ",".join(f"{k}={v}" for k, v in sorted((args or {}).items()))
    return f"{name}({text})" if text else name


def attention_key(name: str, args: Mapping[str, Any] | None = None) -> str:
    """``lavo-r32-w16``: a mechanism with its hyperparameters, sorted, as a file-name-safe part of
    a record's key (the one key format of run and efficiency records)."""
    text = name + "".join(f"-{k}{v}" for k, v in sorted((args or {}).items()))
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


@dataclass(frozen=True)
class AttentionChoice:
    """A mechanism with its hyperparameters, for one attention role of a backbone."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return attention_label(self.name, self.args)


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
class RunContext:
    """What the runner hands every stage of one run.

    Attributes:
        seed: the run's seed; the runner has seeded Python, NumPy and torch with it already.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        workdir: the run's private folder (created); a task writes nowhere else.
        threads: the intra-op CPU threads the runner set (pass it to child processes).
        attention: the checked choice of every role.
        extra: notes of the stages for the record: curves, artifact paths, anything
            JSON-serialisable.
    """

    seed: int
    device: str
    workdir: Path
    threads: int = 1
    attention: dict[str, AttentionChoice] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    child_peak_memory_mib: float | None = None
    child_peak_memory_kind: str = ""

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with the run's seed (data order, sampling)."""
        return torch.Generator().manual_seed(self.seed)

    def report_child_peak_memory(self, mib: float | None, kind: str) -> None:
        """For training that runs in a child process (fairseq-train): its peak memory, which
        the runner records instead of its own process's."""
        self.child_peak_memory_mib, self.child_peak_memory_kind = mib, kind


@dataclass
class TaskResult:
    """What one run returns (assembled by the runner); the sweep adds configuration and
    provenance to make it a record.

    Attributes:
        metrics: every declared metric by name (plus any extra scalars the task measures).
        parameters: trainable parameters of the whole model.
        attention_parameters: trainable parameters inside the zoo's mechanisms (projections
            excluded), for CAB's fairness rule (flag a mechanism adding more than 10%).
        train_seconds, eval_seconds: wall time of the train and evaluate stages.
        peak_memory_mib: peak memory of training (see ``peak_memory_kind``).
        peak_memory_kind: what was measured: the CUDA allocator's peak, or a process's peak
            resident set size.
        extra: the stages' notes (:attr:`RunContext.extra`).
    """

    metrics: dict[str, float]
    parameters: int
    attention_parameters: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    peak_memory_mib: float | None = None
    peak_memory_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PresetPart:
    """Settings variants (each swept on its own) run with the same seeds and timeout."""

    settings: tuple[Mapping[str, Any], ...]
    seeds: tuple[int, ...] | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class TaskPreset:
    """A named preset of a task (``tasks/<task>/presets/<name>.yaml``), which the runner's
    presets compose.

    The file is a mapping: ``settings`` (a mapping of ``Config`` fields, or a list of such
    mappings: variants, each swept on its own), optionally ``seed`` (one or a list) and
    ``timeout`` (seconds per cell), and a ``description``. Parts that need other seeds go in a
    list under ``parts`` instead, each with its own ``settings``, ``seed`` and ``timeout``.
    """

    name: str
    parts: tuple[PresetPart, ...]
    description: str = ""


PART_KEYS = ("settings", "seed", "timeout")
PRESET_KEYS = ("description", *PART_KEYS, "parts")


class Task(abc.ABC):
    """A benchmark task. Subclasses declare, as class attributes (the spec):

    - ``name``: the registered name (``"lm"``, ``"time_series"``...).
    - ``roles``: the backbone's attention slots and the pattern each needs, e.g.
      ``{"encoder_self": Pattern.NONCAUSAL_SELF, "decoder_self": Pattern.CAUSAL_SELF}``.
    - ``metrics``: the metrics it reports (quality first: the first is the primary metric).
    - ``smoke_ranks``: True when the smoke size (the ``Config`` defaults, the smoke preset) ranks
      mechanisms; by default its numbers are a pipeline check and the tables say so.
    - ``Config``: a frozen dataclass of its settings (names from :mod:`tasks.settings` where
      they mean the same thing); defaults are the smoke size that runs on CPU with the shipped
      sample, and presets override fields.
    - ``requires``: import names of optional packages its stages need (``("fairseq",)``).
    - ``datasets``: ``attnbench data fetch`` names -> ``"module:function"`` downloaders.
    - ``data_tools``: ``attnbench data prepare`` names -> ``"module:main"`` preparation tools.

    and implements the stages the runner calls in order: :meth:`prepare` (optional),
    :meth:`build`, :meth:`train`, :meth:`evaluate`.
    """

    name: ClassVar[str]
    roles: ClassVar[Mapping[str, Pattern]]
    metrics: ClassVar[tuple[Metric, ...]]
    Config: ClassVar[type]
    smoke_ranks: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    datasets: ClassVar[Mapping[str, str]] = {}
    data_tools: ClassVar[Mapping[str, str]] = {}

    def prepare(self, config: Any, run: RunContext) -> Any:
        """Read or generate the data (cached where it is costly); what it returns reaches the
        other stages as ``data``. Not timed as training."""
        return None

    @abc.abstractmethod
    def build(self, config: Any, attention: Mapping[str, AttentionChoice], data: Any,
              run: RunContext) -> nn.Module | None:
        """The model on ``run.device``, one zoo mechanism per role (``attention`` is checked
        already). None when training builds it (a child process, as fairseq-train does)."""

    @abc.abstractmethod
    def train(self, model: nn.Module | None, config: Any, data: Any,
              run: RunContext) -> nn.Module | None:
        """Train ``model``; return the trained model when it is another object (loaded from a
        checkpoint), else None. Curves go to ``run.extra``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, config: Any, data: Any, run: RunContext) -> dict[str, float]:
        """Every declared metric (and any extra scalars) of the trained ``model``."""

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

    @classmethod
    def folder(cls) -> Path:
        """The task's folder (``task.py``, ``presets/``, ``samples/``, ``README.md``): that of
        the module of the class that declares its ``name``."""
        owner = next((c for c in cls.__mro__ if "name" in vars(c)), cls)
        return Path(importlib.import_module(owner.__module__).__file__).resolve().parent

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(p.stem for p in (cls.folder() / "presets").glob("*.yaml"))

    @classmethod
    def preset(cls, name: str) -> TaskPreset:
        """The task's preset ``name``; unknown names list the task's presets."""
        path = cls.folder() / "presets" / f"{name}.yaml"
        if not path.is_file():
            raise AttentionConfigError(f"task {cls.name}: unknown preset {name!r}; "
                                       f"presets: {', '.join(cls.preset_names()) or '-'}")
        return parse_task_preset(yaml.safe_load(path.read_text()) or {},
                                 name=name, where=f"{path.parent.parent.name}/presets/{path.name}")

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """The packages of :attr:`requires` that are not installed."""
        return [module for module in cls.requires if importlib.util.find_spec(module) is None]


def parse_task_preset(data: Any, *, name: str, where: str) -> TaskPreset:
    """A task preset from its YAML data (see :class:`TaskPreset`); bad keys name the valid ones."""
    if not isinstance(data, Mapping) or ("settings" in data) == ("parts" in data):
        raise AttentionConfigError(f"{where}: a task preset is a mapping with 'settings' (or a list "
                                   f"of 'parts'); keys: {', '.join(PRESET_KEYS)}")
    _known(data, PRESET_KEYS, where)
    parts = data["parts"] if "parts" in data else [{k: data[k] for k in PART_KEYS if k in data}]
    if not isinstance(parts, list) or not parts:
        raise AttentionConfigError(f"{where}: parts must be a non-empty list")
    return TaskPreset(name=name, description=str(data.get("description", "")),
                      parts=tuple(_preset_part(part, f"{where}: part {i + 1}")
                                  for i, part in enumerate(parts)))


def _preset_part(data: Any, where: str) -> PresetPart:
    _known(data, PART_KEYS, where)
    settings = data.get("settings") or {}
    variants = settings if isinstance(settings, list) else [settings]
    if not all(isinstance(v, Mapping) for v in variants):
        raise AttentionConfigError(f"{where}: settings must be a mapping of task settings or a "
                                   "list of such mappings")
    seed = data.get("seed")
    return PresetPart(settings=tuple(dict(v) for v in variants),
                      seeds=None if seed is None else tuple(seed if isinstance(seed, list) else [seed]),
                      timeout=data.get("timeout"))


def _known(data: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise AttentionConfigError(f"{where}: expected a mapping with keys {', '.join(valid)}")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise AttentionConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                                   f"valid: {', '.join(valid)}")


def resolve_attention(
    task: type[Task], attention: AttentionChoice | Mapping[str, AttentionChoice]
) -> dict[str, AttentionChoice]:
    """One choice per role, checked before anything is built.

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


def load_object(reference: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (imported now)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
