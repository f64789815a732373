"""Studies: matrices run in stages, some of them tuned, every cell counted in steps.

A study file (``runners/studies/<name>.yaml``, or any path) is a list of stages run in order.
Each stage is a matrix preset (the format of :mod:`runners.matrix`: blocks of task, settings,
attentions, seeds) with an optional ``tune`` entry, Zoology's protocol for a fair comparison::

    description: one line
    stages:
      - name: width64
        description: every causal mechanism at width 64
        tune: {over: lr, metric: validation_accuracy, seeds: [1, 2]}
        blocks:
          - {task: mqar, preset: smoke, seed: 0,
             settings: {d_model: 64, lr: [0.000464, 0.00215, 0.01]}}

A tuned stage first runs its blocks as written (the swept values of ``over``, on the blocks'
seed), then chooses for every other combination (task, mechanism, hyperparameters, settings)
the value of ``over`` whose record has the best ``metric`` (a validation metric, never the
test's), and runs ``seeds`` more at that value. The choice is made from the records alone, so
an interrupted study resumes with the same command and makes the same choice; a value whose
cell failed (diverged, timed out) is simply not chosen.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.checks import load_yaml
from runners.matrix import Block, Cell, MatrixConfigError, expand, known_keys, parse_preset, parse_seed
from runners.records import scan_records
from runners.sweep import KIND

STUDY_DIR = Path(__file__).resolve().parent / "studies"
STUDY_KEYS = ("description", "stages")
STAGE_KEYS = ("name", "description", "tune", "defaults", "blocks")
TUNE_KEYS = ("over", "metric", "lower_is_better", "seeds", "tie_break")


@dataclass(frozen=True)
class Tuning:
    """How a stage chooses one task setting per combination.

    Attributes:
        over: the task setting swept by the stage's blocks (``lr``).
        metric: the metric the choice maximises (or minimises), read from the records.
        lower_is_better: whether smaller values of ``metric`` are better.
        seeds: the seeds run at the chosen value, besides the blocks' own.
        tie_break: a second quantity, lower is better, that decides between candidates whose
            ``metric`` is equal (a saturated accuracy): a metric or a record's ``extra`` entry,
            such as ``final_train_loss``. Without it, or where it is missing too, the first
            candidate in the study file's order wins.
    """

    over: str
    metric: str
    lower_is_better: bool = False
    seeds: tuple[int, ...] = ()
    tie_break: str | None = None


@dataclass(frozen=True)
class Stage:
    """One stage: a matrix (its blocks) and, when tuned, how it chooses."""

    name: str
    description: str
    blocks: tuple[Block, ...]
    tuning: Tuning | None = None


@dataclass(frozen=True)
class Study:
    """A named list of stages."""

    name: str
    description: str
    stages: tuple[Stage, ...]


def study_names() -> list[str]:
    """The studies shipped in ``runners/studies``."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name: str | Path) -> Study:
    """A shipped study by name (``mqar``) or a study file by path."""
    path = Path(name)
    if not path.suffix:
        path = STUDY_DIR / f"{name}.yaml"
        if not path.exists():
            raise MatrixConfigError(f"unknown study {str(name)!r}; shipped: "
                                    f"{', '.join(study_names())} (or give the path of a YAML file)")
    elif not path.exists():
        raise MatrixConfigError(f"study file {str(path)!r} does not exist")
    return parse_study(load_yaml(path) or {}, name=path.stem)


def parse_study(data: Mapping[str, Any], *, name: str) -> Study:
    """A study from its data (see the module docstring); every block checked as a preset's."""
    known_keys(data, STUDY_KEYS, f"study {name}")
    stages = [_parse_stage(raw, f"study {name}: stage {i + 1}")
              for i, raw in enumerate(data.get("stages") or [])]
    if not stages:
        raise MatrixConfigError(f"study {name}: no stages")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise MatrixConfigError(f"study {name}: stage names repeat: {', '.join(names)}")
    return Study(name, str(data.get("description", "")), tuple(stages))


def _parse_stage(raw: Any, where: str) -> Stage:
    known_keys(raw, STAGE_KEYS, where)
    if not raw.get("name"):
        raise MatrixConfigError(f"{where}: a stage needs a name")
    preset = {k: raw[k] for k in ("defaults", "blocks") if k in raw}
    _, blocks = parse_preset(preset, source=f"{where} ({raw['name']})")
    tuning = None
    if raw.get("tune") is not None:
        tune = raw["tune"]
        known_keys(tune, TUNE_KEYS, f"{where}: tune")
        if not tune.get("over") or not tune.get("metric"):
            raise MatrixConfigError(f"{where}: tune needs 'over' (a task setting) and 'metric'")
        tuning = Tuning(str(tune["over"]), str(tune["metric"]), bool(tune.get("lower_is_better")),
                        tuple(parse_seed(s, f"{where}: tune") for s in tune.get("seeds") or ()),
                        str(tune["tie_break"]) if tune.get("tie_break") else None)
    return Stage(str(raw["name"]), str(raw.get("description", "")), tuple(blocks), tuning)


def stage_cells(stage: Stage) -> list[Cell]:
    """The cells a stage's blocks give (the tuning sweep, or the whole stage if not tuned)."""
    cells = expand(stage.blocks).cells
    if stage.tuning is not None:
        swept = [c for c in cells if stage.tuning.over not in c.settings]
        if swept:
            raise MatrixConfigError(f"stage {stage.name}: tunes {stage.tuning.over!r}, which is "
                                    f"not a setting of task {swept[0].task}")
    return cells


def _combination(cell: Cell, over: str) -> str:
    """What a tuned value is chosen for: the cell less the tuned setting."""
    settings = {k: v for k, v in cell.settings.items() if k != over}
    return json.dumps([cell.task, cell.attention, cell.attention_args, settings, cell.seed],
                      sort_keys=True, default=str)


@dataclass(frozen=True)
class Choice:
    """The value chosen for one combination, and what each candidate scored.

    Attributes:
        cell: the tuning cell at the chosen value.
        scores: candidate value -> its metric (None where the cell failed or lacks it).
        complete: whether every candidate has a record (a choice is only final then).
    """

    cell: Cell
    scores: dict[Any, float | None]
    complete: bool


def choose(cells: Sequence[Cell], records: Mapping[str, Mapping[str, Any]],
           tuning: Tuning) -> list[Choice]:
    """For every combination of ``cells`` (the tuning sweep), the best value of
    ``tuning.over`` by ``tuning.metric`` in ``records`` (cell key -> record). Combinations where
    no candidate has an ok record with the metric are left out."""
    groups: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[_combination(cell, tuning.over)].append(cell)
    choices = []
    for candidates in groups.values():
        scores = {c.settings[tuning.over]: _score(records.get(c.key), tuning.metric)
                  for c in candidates}
        scored = [c for c in candidates if scores[c.settings[tuning.over]] is not None]
        if not scored:
            continue
        best = min(scored, key=lambda c: _rank(c, candidates, scores[c.settings[tuning.over]],
                                               records, tuning))
        choices.append(Choice(best, scores, all(c.key in records for c in candidates)))
    return choices


def _rank(cell: Cell, candidates: Sequence[Cell], score: float,
          records: Mapping[str, Mapping[str, Any]], tuning: Tuning) -> tuple[float, float, int]:
    """Sort key of a candidate, smallest best: the metric, the tie-break, the file's order."""
    primary = score if tuning.lower_is_better else -score
    tie = _score(records.get(cell.key), tuning.tie_break) if tuning.tie_break else None
    return primary, tie if tie is not None else float("inf"), candidates.index(cell)


def _score(record: Mapping[str, Any] | None, metric: str) -> float | None:
    """The record's ``metric`` (or its ``extra`` entry of that name); None if failed or absent."""
    if record is None or record.get("status") != "ok":
        return None
    value = (record.get("metrics") or {}).get(metric, (record.get("extra") or {}).get(metric))
    return float(value) if isinstance(value, int | float) else None


def seed_cells(choices: Sequence[Choice], tuning: Tuning) -> list[Cell]:
    """The cells of the chosen values at the tuning's extra seeds (final choices only)."""
    return [dataclasses.replace(choice.cell, seed=seed)
            for choice in choices if choice.complete for seed in tuning.seeds]


def stage_records(results_dir: Path, cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """Cell key -> record, for the cells of ``cells`` that have one in ``results_dir/runs``."""
    wanted = {c.key for c in cells}
    return {r["key"]: r for r in scan_records(results_dir / "runs", kind=KIND)[0]
            if r["key"] in wanted}


Runner = Callable[[Sequence[Cell], str], None]
"""Runs cells (those without a finished record) under a preset label."""


def run_stage(stage: Stage, study: str, results_dir: Path, run: Runner) -> list[Cell]:
    """Run one stage to the end: its blocks, then (tuned) the extra seeds at the chosen values.
    Returns every cell of the stage."""
    label = f"study-{study}/{stage.name}"
    cells = stage_cells(stage)
    run(cells, label)
    if stage.tuning is None:
        return cells
    choices = choose(cells, stage_records(results_dir, cells), stage.tuning)
    extra = seed_cells(choices, stage.tuning)
    run(extra, label)
    return cells + extra


__all__ = ["Choice", "Stage", "Study", "Tuning", "choose", "load_study", "parse_study",
           "run_stage", "seed_cells", "stage_cells", "stage_records", "study_names"]
