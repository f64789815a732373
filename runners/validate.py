"""Checks of a cell against the shapes its task gives the attention, before any cell runs.

A mechanism's hyperparameters are typed by the zoo registry, but some only fail against the
shapes of a model (LAVO's ``r`` above the head dimension, a width that the heads do not divide).
The task says which shapes each role gets (:meth:`tasks.base.Task.attention_shapes`); here each
mechanism is built at those shapes with the cell's hyperparameters, exactly as the run will build
it, and the hyperparameters are made canonical so that equal models get equal keys however they
were spelled.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from attention_zoo import AttentionConfigError, Pattern, attention_spec, build_attention
from tasks.base import Task


class ShapeError(AttentionConfigError):
    """A mechanism that cannot be built at the shapes a task gives it; the message says which."""


def role_shapes(task: type[Task], config: Any, where: str) -> dict[str, tuple[int, int]]:
    """``{role: (heads, head_dim)}`` as ``task`` builds its model with ``config`` ({} when the
    task does not declare its shapes); a :class:`ShapeError` naming ``where`` if the settings
    themselves give no valid shape."""
    try:
        shapes = dict(task.attention_shapes(config))
    except AttentionConfigError as error:
        raise ShapeError(f"{where}: {error}") from None
    for role, (heads, head_dim) in shapes.items():
        if heads < 1 or head_dim < 1:
            raise ShapeError(f"{where}: role {role!r} gets {heads} heads of dimension {head_dim}")
    return shapes


@functools.lru_cache(maxsize=4096)
def _build(name: str, args: tuple[tuple[str, Any], ...], pattern: Pattern, heads: int,
           head_dim: int) -> Any:
    return build_attention(name, pattern=pattern, heads=heads, head_dim=head_dim, **dict(args))


def _automatic(name: str, pattern: Pattern, heads: int, head_dim: int) -> dict[str, Any]:
    """The values that hyperparameters with an automatic default (None) resolve to at this
    shape, as the built mechanism exposes them (an attribute of the same name)."""
    built = _build(name, (), pattern, heads, head_dim)
    return {hp.name: getattr(built, hp.name) for hp in attention_spec(name).hyperparameters
            if hp.default is None and getattr(built, hp.name, None) is not None}


def fit_attention(task: type[Task], shapes: Mapping[str, tuple[int, int]], name: str,
                  args: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Build mechanism ``name`` with ``args`` at each role's shape (a :class:`ShapeError` that
    names the task, its settings (``where``), the role and the shape if it cannot be built);
    returns ``args`` without the values the mechanism would take anyway: a declared default,
    or what an automatic default resolves to at every role's shape (``r=8`` where r defaults
    to the head dimension 8)."""
    spec = attention_spec(name)
    automatic: dict[str, set[Any]] = {}
    for role, (heads, head_dim) in shapes.items():
        pattern = task.roles[role]
        try:
            _build(name, tuple(sorted(args.items())), pattern, heads, head_dim)
        except AttentionConfigError as error:
            raise ShapeError(f"{where}: {name} cannot run in role {role!r} ({heads} heads of "
                             f"dimension {head_dim}): {error}") from None
        for key, value in _automatic(name, pattern, heads, head_dim).items():
            automatic.setdefault(key, set()).add(value)
    canonical = {}
    for key, value in args.items():
        if value == spec.hyperparameter(key).default:
            continue
        if shapes and automatic.get(key) == {value}:
            continue
        canonical[key] = value
    return canonical
