"""The benchmark matrix: a preset plus command-line overrides expand into cells, each cell one
training-and-evaluation run of a task with one attention mechanism and one seed.

Everything is checked while expanding, before any cell runs: task names, task settings (typed by
the task's ``Config``), mechanism names, the patterns each task role needs, and mechanism
hyperparameters (typed by the zoo registry). Errors name the valid choices.

Preset (YAML, ``runners/presets/<name>.yaml``, or any file path)::

    description: one line shown before the run
    defaults:                  # optional: fields every block starts from
      attention: all           # every registered mechanism that supports all of a task's roles
      seed: [0, 1, 2]
      timeout: 900             # seconds a cell may run before it is stopped (status timeout)
    blocks:                    # one block per task
      - task: time_series
        preset: paper          # start from tasks/time_series/presets/paper.yaml (its settings,
                               # seeds and timeout; this block's own keys win)
      - task: lm
        settings: {seq_len: [1024, 4096]}       # the task's Config fields; a list sweeps
        # or a list of variants, each swept on its own: [{dataset: ETTh1, seq_len: 336}, ...]
        attention: [softmax, lavo]
        attention_args: {r: [32, 64], w: 16}    # for the mechanisms that declare them

A block whose task is not installed is skipped with a notice. Overrides, ``KEY=V1,V2,...``
(several values sweep), replace what the preset says; see :func:`parse_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attention_zoo import AttentionConfigError, attention_spec
from runners.checks import finite_seconds, load_yaml
from runners.validate import fit_attention, role_shapes
from tasks.base import AttentionChoice, PresetPart, attention_key, resolve_attention
from tasks.registry import fitting_attentions, get_task, list_tasks

PRESET_DIR = Path(__file__).resolve().parent / "presets"
ALL = "all"
BLOCK_KEYS = ("task", "preset", "settings", "attention", "attention_args", "seed", "timeout")
PRESET_KEYS = ("description", "defaults", "blocks")


class MatrixConfigError(AttentionConfigError):
    """A preset or an override names something unknown or gives a value of the wrong type."""


@dataclass(frozen=True)
class Override:
    """One command-line override ``KEY=V1,V2,...``: the values are swept.

    Keys:
        ``task``: which of the preset's tasks run (a task not in the preset runs with defaults).
        ``attention``: mechanism names, or ``all`` (every applicable one).
        ``attention.NAME``: a mechanism hyperparameter (``attention.r=16,32``), applied to the
            selected mechanisms that declare it.
        ``seed``: integer seeds.
        ``timeout``: seconds per cell (one value).
        ``FIELD``: a task setting (a field of the task's ``Config``), applied to every selected
            task that has it; ``TASK.FIELD`` applies to that task only.
    """

    key: str
    values: tuple[str, ...]


@dataclass
class Block:
    """A preset block: one task, its setting sweeps, the mechanisms and seeds to run."""

    task: str
    settings: list[dict[str, list[Any]]] = field(default_factory=lambda: [{}])
    """Variants (usually one); each maps a ``Config`` field to the values it sweeps."""
    attention: list[str] | str = ALL
    attention_args: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    timeout: float | None = None
    required_args: set[str] = field(default_factory=set)
    """Hyperparameters given on the command line: an error if no selected mechanism declares
    them (a preset's, like LAVO's r, simply do not apply when LAVO is not selected)."""
    notices: list[str] = field(default_factory=list)
    """What an override skipped in this block (shown before the run)."""


@dataclass(frozen=True)
class Cell:
    """One run: a task with resolved settings, one mechanism for every role, one seed.

    Attributes:
        task: the task's entry-point name.
        attention: mechanism name (it fills every attention role of the task's backbone).
        attention_args: its hyperparameters that differ from the mechanism's defaults.
        overrides: the task settings given by preset and overrides (what rebuilds the config).
        settings: the task's complete resolved ``Config`` as JSON-ready values.
        seed: the seed.
        timeout: seconds before the runner stops the cell (None: no limit); not part of the key.
    """

    task: str
    attention: str
    attention_args: dict[str, Any]
    overrides: dict[str, Any]
    settings: dict[str, Any]
    seed: int
    timeout: float | None = None

    def identity(self) -> dict[str, Any]:
        """What determines the result: the key is derived from this and nothing else."""
        return {"task": self.task, "attention": self.attention,
                "attention_args": self.attention_args, "settings": self.settings, "seed": self.seed}

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return AttentionChoice(self.attention, self.attention_args).label()

    @property
    def key(self) -> str:
        """``<task>/<attention>[-<hyperparameters>]-seed<seed>-<digest>``: readable, and unique
        because the digest hashes the whole resolved configuration."""
        name = attention_key(self.attention, self.attention_args)
        return f"{self.task}/{name}-seed{self.seed}-{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Cell:
        return cls(**data)


@dataclass
class Expansion:
    """The cells of a sweep, and what was skipped on the way (with the reason)."""

    cells: list[Cell]
    notices: list[str]
    description: str = ""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str | Path) -> tuple[str, list[Block]]:
    """Read a shipped preset by name (``smoke``, ``paper``) or a YAML file by path."""
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise MatrixConfigError(f"unknown preset {str(name)!r}; shipped: {', '.join(preset_names())} "
                                    "(or give the path of a YAML file)")
    elif not path.exists():
        raise MatrixConfigError(f"preset file {str(path)!r} does not exist")
    data = load_yaml(path) or {}
    return parse_preset(data, source=path.name)


def parse_preset(data: Mapping[str, Any], *, source: str = "preset") -> tuple[str, list[Block]]:
    """Blocks of a preset given as data (see the module docstring for the format)."""
    if not isinstance(data, Mapping):
        raise MatrixConfigError(f"{source}: a preset is a mapping with keys {', '.join(PRESET_KEYS)}")
    known_keys(data, PRESET_KEYS, source)
    defaults = data.get("defaults") or {}
    known_keys(defaults, BLOCK_KEYS[1:], f"{source}: defaults")
    blocks = [block for index, raw in enumerate(data.get("blocks") or [])
              for block in _parse_block(raw, defaults, f"{source}: block {index + 1}")]
    if not blocks:
        raise MatrixConfigError(f"{source}: no blocks")
    return str(data.get("description", "")), blocks


def _parse_block(raw: Any, defaults: Mapping[str, Any], where: str) -> list[Block]:
    """The blocks of one preset block: one per part of the task preset it names (else one)."""
    blocks = []
    if not isinstance(raw, Mapping) or "task" not in raw:
        raise MatrixConfigError(f"{where}: a block is a mapping with a 'task' and optionally "
                                f"{', '.join(BLOCK_KEYS[1:])}")
    known_keys(raw, BLOCK_KEYS, where)
    merged = {**defaults, **raw}
    base = defaults.get("settings") or {}
    if not isinstance(base, Mapping):
        raise MatrixConfigError(f"{where}: defaults: settings must be a mapping of task settings")
    variants = raw.get("settings") or {}
    variants = variants if isinstance(variants, list) else [variants]
    if not all(isinstance(v, Mapping) for v in variants):
        raise MatrixConfigError(f"{where}: settings must be a mapping of task settings, or a list "
                                "of such mappings (variants)")
    args = {**(defaults.get("attention_args") or {}), **(raw.get("attention_args") or {})}
    attention = merged.get("attention", ALL)
    for part in _task_preset_parts(str(raw["task"]), merged.get("preset"), where):
        # The task's preset, then the preset's defaults, then the block: the later wins.
        seeds = raw.get("seed", part.seeds if part.seeds is not None else defaults.get("seed", 0))
        timeout = raw.get("timeout", part.timeout if part.timeout is not None
                          else defaults.get("timeout"))
        blocks.append(Block(
            task=str(raw["task"]),
            settings=[{k: _as_list(v) for k, v in {**ours, **base, **variant}.items()}
                      for ours in part.settings for variant in variants or [{}]],
            attention=ALL if attention == ALL else [str(a) for a in _as_list(attention)],
            attention_args={k: _as_list(v) for k, v in args.items()},
            seeds=[parse_seed(s, where) for s in _as_list(seeds)],
            timeout=_timeout(timeout, where),
        ))
    return blocks


def _task_preset_parts(task: str, preset: Any, where: str) -> list[PresetPart]:
    """The parts of the task's preset ``preset`` (None: one empty part); a task that is not
    installed gets one empty part (its block is skipped with a notice when expanded)."""
    if preset is None or task not in list_tasks():
        return [PresetPart(settings=({},))]
    try:
        return list(get_task(task).preset(str(preset)).parts)
    except AttentionConfigError as error:
        raise MatrixConfigError(f"{where}: {error}") from None


def parse_overrides(items: Iterable[str]) -> list[Override]:
    """``["attention=lavo,softmax", "attention.r=16,32"]`` -> overrides (syntax only)."""
    overrides: list[Override] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not sep or not key or not values:
            raise MatrixConfigError(
                f"override {item!r} is not KEY=VALUE[,VALUE...]; keys: task, attention, "
                "attention.HYPERPARAMETER, seed, timeout, a task setting (FIELD or TASK.FIELD)"
            )
        earlier = [o for o in overrides if o.key == key]
        if earlier:
            raise MatrixConfigError(
                f"override {key} is given twice ({key}={','.join(earlier[0].values)} and {item}); "
                f"give it once, with every value: {key}={','.join((*earlier[0].values, *values))}")
        overrides.append(Override(key, values))
    return overrides


def apply_overrides(blocks: Sequence[Block], overrides: Sequence[Override]) -> list[Block]:
    """The preset's blocks with ``overrides`` applied (checked against installed tasks)."""
    blocks = [dataclasses.replace(b, settings=[dict(v) for v in b.settings],
                                  attention_args=dict(b.attention_args),
                                  required_args=set(b.required_args))
              for b in blocks]
    installed = list_tasks()
    for override in overrides:
        if override.key == "task":
            for name in override.values:
                if name not in installed:
                    raise MatrixConfigError(f"task={name}: not installed; installed: "
                                            f"{', '.join(installed) or '-'}")
            template = blocks[0] if blocks else Block(task="")
            kept = [b for b in blocks if b.task in override.values]  # a task may have several blocks
            blocks = kept + [Block(task=name, attention=template.attention, seeds=list(template.seeds),
                                   timeout=template.timeout)
                             for name in dict.fromkeys(override.values) if name not in {b.task for b in kept}]
    for override in overrides:
        key, values = override.key, list(override.values)
        if key == "task":
            continue
        if key == "attention":
            for block in blocks:
                block.attention = ALL if values == [ALL] else values
        elif key.startswith("attention."):
            for block in blocks:
                block.attention_args[key.removeprefix("attention.")] = values
                block.required_args.add(key.removeprefix("attention."))
        elif key == "seed":
            seeds = [parse_seed(v, f"override seed={v}") for v in values]
            for block in blocks:
                block.seeds = seeds
        elif key == "timeout":
            if len(values) != 1:
                raise MatrixConfigError(f"timeout takes one value, got {','.join(values)}")
            for block in blocks:
                block.timeout = _timeout(values[0], f"override timeout={values[0]}")
        else:
            _apply_setting(blocks, key, values, installed)
    return blocks


def _apply_setting(blocks: Sequence[Block], key: str, values: list[str], installed: list[str]) -> None:
    task_name, dot, name = key.rpartition(".")
    if dot and task_name not in installed:
        raise MatrixConfigError(f"override {key}: unknown task {task_name!r}; installed: "
                                f"{', '.join(installed) or '-'}")
    targets = [b for b in blocks if b.task in installed and (not dot or b.task == task_name)]
    valid = {block.task: [hp.name for hp in get_task(block.task).config_fields()] for block in targets}
    reached = [block for block in targets if name in valid[block.task]]
    if not reached:
        choices = "; ".join(f"{task}: {', '.join(fields)}" for task, fields in valid.items())
        raise MatrixConfigError(
            f"unknown override key {key!r}: not task, attention, attention.HYPERPARAMETER, seed, "
            f"timeout, nor a setting of the selected tasks ({choices or 'no installed task selected'})"
        )
    for block in targets:
        if block in reached:
            for variant in block.settings:
                variant[name] = values
        else:
            block.notices.append(f"override {key}={','.join(values)} skipped task {block.task!r}: "
                                 f"it has no setting {name!r}")


def _not_a_typo(name: str, installed: Sequence[str]) -> None:
    """A task that is not installed is skipped, unless its name is a misspelling of one that
    is (then the preset is wrong, and nothing of it should run)."""
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.8)
    if close:
        raise MatrixConfigError(f"unknown task {name!r}: not installed, and close to the installed "
                                f"{close[0]!r} (a misspelling?); installed: {', '.join(installed)}")


def expand(blocks: Sequence[Block], *, description: str = "") -> Expansion:
    """Every cell of ``blocks``, validated; uninstalled tasks and inapplicable mechanisms are
    skipped with a notice, anything unknown or ill-typed raises :class:`MatrixConfigError`."""
    installed = list_tasks()
    cells: dict[str, Cell] = {}
    notices: list[str] = []
    used_args: set[str] = set()
    offered_args: dict[str, set[str]] = {}
    requested: dict[str, bool] = {}
    for block in blocks:
        notices += [n for n in block.notices if n not in notices]
        if block.task not in installed:
            _not_a_typo(block.task, installed)
            notices.append(f"skipped task {block.task!r}: not installed "
                           f"(installed: {', '.join(installed) or '-'})")
            continue
        task = get_task(block.task)
        names = fitting_attentions(task) if block.attention == ALL else list(block.attention)
        for name in names:
            attention_spec(name)  # an unknown name raises here, naming the registered ones
        runnable = []
        for name in names:
            try:
                resolve_attention(task, AttentionChoice(name))
                runnable.append(name)
                requested[name] = True
            except AttentionConfigError as error:
                requested.setdefault(name, False)
                notices.append(f"skipped {name} for {block.task}: {error}")
        for setting_values in (combo for variant in block.settings for combo in _product(variant)):
            try:
                config = task.make_config(setting_values)
            except AttentionConfigError as error:
                raise MatrixConfigError(str(error)) from None
            settings = json.loads(json.dumps(dataclasses.asdict(config), default=str))
            overrides = {k: settings[k] for k in setting_values}  # typed, as the Config holds them
            where = f"task {block.task}" + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))
            try:
                task.check_settings(config)
                shapes = role_shapes(task, config, where)
            except AttentionConfigError as error:
                raise MatrixConfigError(str(error)) from None
            for name in runnable:
                spec = attention_spec(name)
                declared = {hp.name for hp in spec.hyperparameters}
                offered_args.setdefault(name, declared)
                mine = {k: v for k, v in block.attention_args.items() if k in declared}
                used_args.update(mine)
                for raw_args in _product(mine):
                    args = {k: spec.hyperparameter(k).parse(v, name) if isinstance(v, str)
                            else spec.hyperparameter(k).check(v, name) for k, v in raw_args.items()}
                    resolve_attention(task, AttentionChoice(name, args))
                    # Built at the task's shapes; a value the mechanism takes anyway (its default,
                    # or what an automatic default resolves to) is dropped: one model, one key.
                    try:
                        args = fit_attention(task, shapes, name, args, where)
                    except AttentionConfigError as error:
                        raise MatrixConfigError(str(error)) from None
                    for seed in block.seeds:
                        cell = Cell(task=block.task, attention=name, attention_args=args,
                                    overrides=overrides, settings=settings, seed=seed,
                                    timeout=block.timeout)
                        cells.setdefault(cell.key, cell)
    for name, ok in requested.items():
        if not ok:
            raise MatrixConfigError(f"attention {name!r} supports the roles of none of the selected "
                                    "tasks; " + "; ".join(n for n in notices if f" {name} " in n))
    unused = sorted({k for b in blocks if b.task in installed for k in b.required_args} - used_args)
    if unused:
        offered = sorted(set().union(*offered_args.values())) if offered_args else []
        raise MatrixConfigError(
            f"attention hyperparameter(s) {', '.join(unused)} declared by none of the selected "
            f"mechanisms ({', '.join(sorted(offered_args)) or '-'}); valid: {', '.join(offered) or '-'}"
        )
    return Expansion(cells=list(cells.values()), notices=notices, description=description)


def plan(preset: str | Path, overrides: Sequence[str] = ()) -> Expansion:
    """Preset + overrides -> validated cells: the whole front half of ``attnbench run``."""
    description, blocks = load_preset(preset)
    return expand(apply_overrides(blocks, parse_overrides(overrides)), description=description)


def _product(sweeps: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(sweeps)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweeps[k] for k in keys))]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def known_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """Refuse a mapping with a key outside ``valid``, naming it and the valid ones (presets,
    studies)."""
    if not isinstance(data, Mapping):
        raise MatrixConfigError(f"{where}: expected a mapping with keys {', '.join(valid)}")
    for key in data:
        if key not in valid:
            raise MatrixConfigError(f"{where}: unknown key {key!r}; valid: {', '.join(valid)}")


SEED_LIMIT = 2**32
"""Seeds are what every generator accepts: numpy's take 0 <= seed < 2**32."""


def parse_seed(value: Any, where: str) -> int:
    """A seed as an int in [0, 2**32), or a :class:`MatrixConfigError` saying where."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        seed = int(value)
    except (TypeError, ValueError):
        raise MatrixConfigError(f"{where}: seed must be an integer, got {value!r}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise MatrixConfigError(f"{where}: seed must be in 0 .. 2**32 - 1 (numpy's range), got {seed}")
    return seed


def _timeout(value: Any, where: str) -> float | None:
    try:
        return finite_seconds(value, where)
    except ValueError as error:
        raise MatrixConfigError(str(error)) from None
