"""The registry: register a mechanism once, and every task, sweep and plot can build it by name.

Third-party packages add mechanisms through the ``attnbench.attentions`` entry-point group::

    [project.entry-points."attnbench.attentions"]
    my_attention = "my_package.attention:MyAttention"

The entry point may name an :class:`~attention_zoo.Attention` subclass (registered under the
entry point's name unless it registered itself) or a module whose import registers mechanisms.
Entry points are loaded lazily, the first time the registry is queried.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, TypeVar

from attention_zoo.base import (
    Attention,
    AttentionConfigError,
    AttentionSpec,
    Complexity,
    HyperParameter,
    Pattern,
)

ENTRY_POINT_GROUP = "attnbench.attentions"

_REGISTRY: dict[str, AttentionSpec] = {}
_entry_points_loaded = False
plugin_errors: dict[str, str] = {}
"""Entry points that failed to load: name -> error (they are skipped with a warning)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
A = TypeVar("A", bound=type[Attention])


def register_attention(name: str) -> Callable[[A], A]:
    """Class decorator that registers an :class:`Attention` subclass under ``name``.

    The class's declarations are checked here, so a malformed mechanism fails at import time
    rather than in the middle of a sweep.

    Example::

        @register_attention("my_attention")
        class MyAttention(Attention):
            ...
    """

    def decorator(cls: A) -> A:
        _register(name, cls)
        return cls

    return decorator


def _register(name: str, cls: type[Attention]) -> AttentionSpec:
    if not _NAME.match(name):
        raise ValueError(f"attention name {name!r} must be lower_snake_case")
    if not (inspect.isclass(cls) and issubclass(cls, Attention)):
        raise TypeError(f"register_attention({name!r}) needs an Attention subclass, got {cls!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.cls is not cls:
        if existing.cls.__qualname__ == cls.__qualname__ and existing.cls.__module__ == cls.__module__:
            pass  # the same class re-imported (e.g. a module reloaded): take the new one
        else:
            raise ValueError(
                f"attention {name!r} is already registered by "
                f"{existing.cls.__module__}.{existing.cls.__qualname__}"
            )
    spec = _make_spec(name, cls)
    cls.spec = spec
    _REGISTRY[name] = spec
    return spec


def _make_spec(name: str, cls: type[Attention]) -> AttentionSpec:
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{name}: Config must be a dataclass, got {cls.Config!r}")
    patterns = frozenset(Pattern.parse(p) for p in cls.patterns)
    if not patterns:
        raise TypeError(f"{name}: declares no supported pattern")
    if cls.decoding and Pattern.CAUSAL_SELF not in patterns:
        raise TypeError(f"{name}: declares decoding but not the causal_self pattern")
    if cls.decoding and (cls.step is Attention.step or cls.init_state is Attention.init_state):
        raise TypeError(f"{name}: declares decoding but does not implement init_state and step")
    if cls.attend is Attention.attend:
        raise TypeError(f"{name}: does not implement attend()")
    hints = typing.get_type_hints(cls.Config)
    hyperparameters = []
    for f in dataclasses.fields(cls.Config):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{name}: hyperparameter {f.name!r} needs a default")
        hp = HyperParameter(
            name=f.name,
            annotation=hints[f.name],
            default=f.default,
            help=f.metadata.get("help", ""),
            minimum=f.metadata.get("min"),
        )
        hp.check(f.default, name)
        hyperparameters.append(hp)
    doc = inspect.getdoc(cls) or ""
    return AttentionSpec(
        name=name,
        cls=cls,
        patterns=patterns,
        decoding=bool(cls.decoding),
        uses_layer_input=bool(cls.uses_layer_input),
        complexity=Complexity(cls.complexity),
        hyperparameters=tuple(hyperparameters),
        summary=doc.splitlines()[0] if doc else "",
        reference=cls.reference,
    )


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            registered_itself = getattr(obj, "spec", None) is not None and obj.spec.cls is obj
            if inspect.isclass(obj) and not registered_itself:
                _register(ep.name, obj)
        except Exception as error:  # a broken plug-in must not take the zoo down with it
            plugin_errors[ep.name] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"attnbench: attention plug-in {ep.name!r} ({ep.value}) failed to load: {error}",
                stacklevel=2,
            )


def reload_entry_points() -> None:
    """Look for entry-point plug-ins again (after installing a package into a live process)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _load_entry_points()


def list_attentions(pattern: str | Pattern | None = None) -> list[str]:
    """Sorted names of the registered mechanisms, optionally only those supporting ``pattern``."""
    _load_entry_points()
    if pattern is None:
        return sorted(_REGISTRY)
    wanted = Pattern.parse(pattern)
    return sorted(name for name, spec in _REGISTRY.items() if wanted in spec.patterns)


def attention_spec(name: str) -> AttentionSpec:
    """Capabilities and hyperparameters of mechanism ``name``, without building it."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise AttentionConfigError(f"unknown attention {name!r}; known: {known}") from None


def build_attention(
    name: str,
    *,
    pattern: str | Pattern,
    heads: int,
    head_dim: int,
    input_dim: int | None = None,
    source_dim: int | None = None,
    **hyperparameters: Any,
) -> Attention:
    """Build mechanism ``name`` for ``pattern`` with ``heads`` x ``head_dim`` and its hyperparameters.

    ``input_dim`` is the width of the layer's query-side input (None: heads * head_dim) and
    ``source_dim`` that of its key/value-side input (None: input_dim); mechanisms that declare
    ``uses_layer_input`` create their parameters over these widths.

    Raises:
        AttentionConfigError: unknown name, unknown or ill-typed hyperparameter, or a pattern the
            mechanism does not support; each message names the valid choices.
    """
    spec = attention_spec(name)
    wanted = Pattern.parse(pattern)
    if wanted not in spec.patterns:
        supported = ", ".join(sorted(p.value for p in spec.patterns))
        raise AttentionConfigError(
            f"attention {name!r} does not support the {wanted.value} pattern; "
            f"it supports: {supported}"
        )
    sizes = {"heads": heads, "head_dim": head_dim, "input_dim": input_dim, "source_dim": source_dim}
    for label, value in sizes.items():
        if value is None and label in ("input_dim", "source_dim"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AttentionConfigError(f"{name}: {label} must be a positive int, got {value!r}")
    config = spec.make_config(hyperparameters)
    return spec.cls(config, pattern=wanted, heads=heads, head_dim=head_dim, input_dim=input_dim,
                    source_dim=source_dim)


def parse_attention_args(name: str, text: str | Mapping[str, str]) -> dict[str, Any]:
    """Parse command-line hyperparameters (``"r=64,w=16"``) of mechanism ``name``."""
    return attention_spec(name).parse_args(text)


__all__ = [
    "ENTRY_POINT_GROUP",
    "AttentionConfigError",
    "attention_spec",
    "build_attention",
    "list_attentions",
    "parse_attention_args",
    "plugin_errors",
    "register_attention",
    "reload_entry_points",
]
