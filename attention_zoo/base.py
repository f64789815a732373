"""The zoo contract: attention patterns, capabilities, typed hyperparameters, the base class.

Tensor layout at the zoo boundary, the one layout every mechanism takes and returns::

    q:                [B, Lq, H, D]   queries
    k, v:             [B, Lk, H, D]   keys and values (Lk == Lq for self attention)
    key_padding_mask: [B, Lk] bool    True where the key is padding and must be ignored
    out:              [B, Lq, H, D]

B batch, L length, H heads, D head dimension. Adapters for other layouts (fairseq's time-major
tensors, ESPnet's [B, H, L, D]) convert at their own boundary and nowhere else.

A mechanism that needs the layer's input itself (gates computed from it, a memory built before
the key and value projections) declares ``uses_layer_input = True`` and then also receives a
:class:`LayerInput`: the query-side input [B, Lq, E], the key/value-side input [B, Lk, E_s] and
the layer's three projections. :class:`~attention_zoo.MultiHeadAttention` always provides it.

The four attention patterns (CAB's taxonomy):

- ``noncausal_self``: every query sees every (valid) key of the same sequence.
- ``causal_self``: query t sees keys s <= t of the same sequence.
- ``noncausal_cross``: queries of one sequence see every (valid) key of another.
- ``causal_cross``: a decoder's cross attention: every query sees every (valid) position of
  another sequence (the source, of any length), and causality is over the queries: the output
  at query t does not change when queries after t change (CAB's definition and probe).
  Decoding feeds one query at a time against the whole source.

Padding: ``key_padding_mask`` may mark any key in cross attention. In self attention padding is
trailing (right padding); mechanisms whose result depends on absolute position (windows) are
only required to be invariant to right padding. Outputs at padded query positions are finite
but meaningless.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn


class Pattern(enum.StrEnum):
    """One of CAB's four attention patterns."""

    NONCAUSAL_SELF = "noncausal_self"
    CAUSAL_SELF = "causal_self"
    NONCAUSAL_CROSS = "noncausal_cross"
    CAUSAL_CROSS = "causal_cross"

    @property
    def causal(self) -> bool:
        return self in (Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS)

    @property
    def cross(self) -> bool:
        return self in (Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS)

    @property
    def triangular(self) -> bool:
        """Whether query t sees only keys s <= t: causal self attention (in causal cross
        attention every query sees the whole source)."""
        return self is Pattern.CAUSAL_SELF

    @classmethod
    def parse(cls, value: str | Pattern) -> Pattern:
        """Return the pattern named ``value``; unknown names raise naming the valid ones."""
        if isinstance(value, Pattern):
            return value
        try:
            return cls(str(value).replace("-", "_"))
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown attention pattern {value!r}; valid: {valid}") from None


class Complexity(enum.StrEnum):
    """Time complexity class in the sequence length n (per head, for fixed hyperparameters)."""

    QUADRATIC = "quadratic"
    LOGLINEAR = "n log n"
    LINEAR = "linear"


class AttentionConfigError(ValueError):
    """A mechanism was asked for with an unknown, ill-typed or out-of-range setting."""


@dataclass(frozen=True)
class HyperParameter:
    """One typed hyperparameter of a mechanism, derived from its ``Config`` dataclass field.

    Args:
        name: field name.
        annotation: the resolved type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
            or a union with ``None``).
        default: default value.
        help: one-line description (the field's ``metadata["help"]``).
        minimum: smallest allowed value for numbers (``metadata["min"]``), or None.
    """

    name: str
    annotation: Any
    default: Any
    help: str = ""
    minimum: float | None = None

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a ``Literal`` type (None for open types)."""
        literal = [a for a in _union_members(self.annotation) if typing.get_origin(a) is Literal]
        if not literal:
            return None
        return tuple(c for lit in literal for c in typing.get_args(lit))

    @property
    def type_name(self) -> str:
        """The type as a reader writes it: ``int``, ``int | None``, ``'fixed' | 'learned'``."""
        parts = []
        for member in _union_members(self.annotation):
            if member is type(None):
                parts.append("None")
            elif typing.get_origin(member) is Literal:
                parts.extend(repr(c) for c in typing.get_args(member))
            else:
                parts.append(getattr(member, "__name__", str(member)))
        return " | ".join(parts)

    def check(self, value: Any, mechanism: str) -> Any:
        """Return ``value`` if it fits this hyperparameter's type and range, else raise.

        An ``int`` is accepted where a ``float`` is expected (and converted); a ``bool`` is never
        accepted as a number; strings are not parsed here (see :meth:`parse`).
        """
        for member in _union_members(self.annotation):
            if member is type(None) and value is None:
                return None
            if typing.get_origin(member) is Literal and any(
                type(value) is type(choice) and value == choice  # True is not 1 here
                for choice in typing.get_args(member)
            ):
                return value
            if member is bool and isinstance(value, bool):
                return value
            if member is int and isinstance(value, int) and not isinstance(value, bool):
                return self._check_range(value, mechanism)
            if member is float and isinstance(value, int | float) and not isinstance(value, bool):
                return self._check_range(float(value), mechanism)
            if member is str and isinstance(value, str):
                return value
        raise AttentionConfigError(
            f"{mechanism}: hyperparameter {self.name!r} expects {self.type_name}, "
            f"got {type(value).__name__} {value!r}"
        )

    def parse(self, text: str, mechanism: str) -> Any:
        """Parse a command-line string (``"64"``, ``"none"``, ``"true"``) into a checked value."""
        members = _union_members(self.annotation)
        lowered = text.strip().lower()
        if type(None) in members and lowered in ("none", "null"):
            return None
        for member in members:
            if typing.get_origin(member) is Literal:
                for choice in typing.get_args(member):
                    if str(choice).lower() == lowered:
                        return choice
            elif member is bool and lowered in ("true", "false", "1", "0", "yes", "no"):
                return lowered in ("true", "1", "yes")
            elif member is int or member is float:
                try:
                    number = member(text)
                except ValueError:
                    continue
                # Outside the try: an out-of-range number must say so, not "cannot read".
                return self._check_range(number, mechanism)
            elif member is str:
                return text
        raise AttentionConfigError(
            f"{mechanism}: cannot read {text!r} as {self.name!r} ({self.type_name})"
        )

    def _check_range(self, value: int | float, mechanism: str) -> int | float:
        if self.minimum is not None and value < self.minimum:
            raise AttentionConfigError(
                f"{mechanism}: hyperparameter {self.name!r} must be >= {self.minimum:g}, "
                f"got {value!r}"
            )
        return value


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


@dataclass(frozen=True)
class NoConfig:
    """Config of a mechanism without hyperparameters."""


@dataclass(frozen=True)
class AttentionSpec:
    """What a mechanism is and can do, as data: queryable without building it.

    Attributes:
        name: registry name (``"lavo"``).
        cls: the :class:`Attention` subclass.
        patterns: the attention patterns it supports. Supporting ``causal_cross`` means that a
            query's cross-attention output depends on that query and the source alone (so a
            decoder can feed its queries one at a time); a mechanism that pools statistics over
            its queries (landmarks, top-u selection, position re-weighting) supports
            ``noncausal_cross`` only.
        decoding: whether it supports token-by-token decoding in ``causal_self``
            (:meth:`Attention.init_state` / :meth:`Attention.step`).
        uses_layer_input: whether it reads the layer's input and projections
            (:class:`LayerInput`) besides the per-head q, k, v.
        complexity: time complexity class in sequence length.
        hyperparameters: typed hyperparameters with defaults, in declaration order.
        summary: first line of the class docstring.
        reference: the paper it implements.
    """

    name: str
    cls: type[Attention]
    patterns: frozenset[Pattern]
    decoding: bool
    uses_layer_input: bool
    complexity: Complexity
    hyperparameters: tuple[HyperParameter, ...]
    summary: str
    reference: str

    def supports(self, pattern: str | Pattern) -> bool:
        return Pattern.parse(pattern) in self.patterns

    def hyperparameter(self, name: str) -> HyperParameter:
        for hp in self.hyperparameters:
            if hp.name == name:
                return hp
        raise AttentionConfigError(
            f"{self.name}: unknown hyperparameter {name!r}; valid: {self._valid_names()}"
        )

    def make_config(self, values: Mapping[str, Any]) -> Any:
        """Check ``values`` against the declared hyperparameters and build the config object."""
        checked = {name: self.hyperparameter(name).check(v, self.name) for name, v in values.items()}
        return self.cls.Config(**checked)

    def parse_args(self, text: str | Mapping[str, str]) -> dict[str, Any]:
        """Parse ``"r=64,w=16"`` (or a mapping of strings) into checked, typed values."""
        if isinstance(text, str):
            items: dict[str, str] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise AttentionConfigError(
                        f"{self.name}: expected key=value in {text!r}, got {part!r}; "
                        f"valid keys: {self._valid_names()}"
                    )
                items[key.strip()] = value.strip()
        else:
            items = dict(text)
        return {k: self.hyperparameter(k).parse(v, self.name) for k, v in items.items()}

    def _valid_names(self) -> str:
        return ", ".join(hp.name for hp in self.hyperparameters) or "(none)"


@dataclass(frozen=True)
class LayerInput:
    """The layer's own input and projections, for mechanisms that declare ``uses_layer_input``.

    In decoding (:meth:`Attention.step`), ``query`` and ``source`` hold the one new position.

    Attributes:
        query: [B, Lq, E] the query-side input, before the projections.
        source: [B, Lk, E_s] the key/value-side input: the encoder output in cross attention, the
            same tensor as ``query`` in self attention.
        q_proj, k_proj, v_proj: the layer's projections E -> H*D (E_s -> H*D for keys and values),
            whose weights and biases a mechanism may read (q = q_proj(query) split into heads).
    """

    query: Tensor
    source: Tensor
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear


class Attention(nn.Module):
    """Base class of every zoo mechanism: the attention core between projections.

    A subclass declares, as class attributes, ``Config`` (a frozen dataclass: the one typed
    source of its hyperparameters), ``patterns``, ``decoding``, ``uses_layer_input`` (see
    :class:`AttentionSpec`), ``complexity`` and ``reference``,
    implements :meth:`attend`, and, if ``decoding`` is true, :meth:`init_state` and :meth:`step`.
    It is registered with :func:`attention_zoo.register_attention`.

    Args:
        config: an instance of ``Config`` (already checked by the registry).
        pattern: the attention pattern this instance serves.
        heads: number of heads H.
        head_dim: head dimension D.
        input_dim: width E of the layer's query-side input (None: heads * head_dim); available
            as ``self.input_dim``, so a mechanism may create parameters over the input.
        source_dim: width E_s of the key/value-side input in cross attention (None: input_dim);
            available as ``self.source_dim``.
    """

    Config: ClassVar[type] = NoConfig
    patterns: ClassVar[frozenset[Pattern]] = frozenset()
    decoding: ClassVar[bool] = False
    uses_layer_input: ClassVar[bool] = False
    complexity: ClassVar[Complexity] = Complexity.QUADRATIC
    reference: ClassVar[str] = ""
    spec: ClassVar[AttentionSpec]

    def __init__(
        self,
        config: Any,
        *,
        pattern: Pattern,
        heads: int,
        head_dim: int,
        input_dim: int | None = None,
        source_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.pattern = pattern
        self.heads = heads
        self.head_dim = head_dim
        self.input_dim: int = heads * head_dim if input_dim is None else input_dim
        self.source_dim: int = self.input_dim if source_dim is None else source_dim

    @property
    def name(self) -> str:
        return self.spec.name

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        layer_input: LayerInput | None = None,
    ) -> Tensor:
        """Attend.

        Args:
            q: [B, Lq, H, D] queries.
            k: [B, Lk, H, D] keys.
            v: [B, Lk, H, D] values.
            key_padding_mask: [B, Lk] bool, True at padded keys, or None.
            layer_input: the layer's input and projections; required by mechanisms that declare
                ``uses_layer_input``, ignored by the others.

        Returns:
            [B, Lq, H, D], same dtype as ``q``.
        """
        self._check_inputs(q, k, v, key_padding_mask)
        if self.needs_layer_input:
            self.require_layer_input(layer_input, q, k)
        return self.attend(q, k, v, key_padding_mask, layer_input)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        layer_input: LayerInput | None,
    ) -> Tensor:
        """The mechanism itself, on checked inputs (see :meth:`forward` for shapes)."""
        raise NotImplementedError

    @property
    def needs_layer_input(self) -> bool:
        """Whether this instance reads :class:`LayerInput`: ``uses_layer_input``, unless its
        configuration does without (a subclass may override it, as LAVO's ``memory="kv"``)."""
        return self.uses_layer_input

    def require_layer_input(self, layer_input: LayerInput | None, q: Tensor, k: Tensor) -> LayerInput:
        """``layer_input``, checked against q [B, Lq, H, D] and k [B, Lk, H, D]; raises if absent.

        :meth:`forward` calls it when :attr:`needs_layer_input`; such a mechanism's :meth:`step`
        calls it too.
        """
        if layer_input is None:
            raise ValueError(
                f"{self.name}: declares uses_layer_input and needs layer_input=LayerInput(...) "
                "(the layer's input and projections; attention_zoo.MultiHeadAttention passes it)"
            )
        for label, x, length, width in (
            ("query", layer_input.query, q.shape[1], self.input_dim),
            ("source", layer_input.source, k.shape[1], self.source_dim),
        ):
            if x.ndim != 3 or tuple(x.shape) != (q.shape[0], length, width):
                raise ValueError(
                    f"{self.name}: layer_input.{label} must be [B, L, E] = "
                    f"{[q.shape[0], length, width]}, got {list(x.shape)}"
                )
        return layer_input

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype
    ) -> Any:
        """An empty decoding state for ``batch_size`` sequences (``decoding`` mechanisms only)."""
        raise NotImplementedError(f"{self.name} does not support incremental decoding")

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, state: Any, *, layer_input: LayerInput | None = None
    ) -> tuple[Tensor, Any]:
        """Decode one token in ``causal_self``.

        Args:
            q, k, v: [B, 1, H, D] for the new position t.
            state: from :meth:`init_state` or the previous call.
            layer_input: the layer's input at position t ([B, 1, E]) and its projections, for
                mechanisms that declare ``uses_layer_input``.

        Returns:
            ``(out, state)``: out [B, 1, H, D] equals row t of the parallel causal pass.
        """
        raise NotImplementedError(f"{self.name} does not support incremental decoding")

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}"
                           for f in dataclasses.fields(self.config))
        return f"pattern={self.pattern.value}, heads={self.heads}, head_dim={self.head_dim}" + (
            f", {fields}" if fields else ""
        )

    def _check_inputs(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> None:
        expected = f"[B, L, {self.heads}, {self.head_dim}]"
        for label, t in (("q", q), ("k", k), ("v", v)):
            if t.ndim != 4 or t.shape[2] != self.heads or t.shape[3] != self.head_dim:
                raise ValueError(f"{self.name}: {label} must be {expected}, got {list(t.shape)}")
        if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
            raise ValueError(
                f"{self.name}: batch or key length mismatch: q {list(q.shape)}, "
                f"k {list(k.shape)}, v {list(v.shape)}"
            )
        if not self.pattern.cross and q.shape[1] != k.shape[1]:
            raise ValueError(
                f"{self.name}: {self.pattern.value} needs as many queries as keys, "
                f"got {q.shape[1]} and {k.shape[1]}"
            )
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(k.shape[:2])
        ):
            raise ValueError(
                f"{self.name}: key_padding_mask must be bool [B, Lk] = {list(k.shape[:2])}, "
                f"got {key_padding_mask.dtype} {list(key_padding_mask.shape)}"
            )


def allowed_keys(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Which keys each query may see, as a bool mask [B or 1, 1, Lq, Lk] (True = visible).

    ``causal`` is causal self attention's triangle (query t sees keys s <= t; pass
    ``pattern.triangular``): in causal cross attention every query sees the whole source, so
    the triangle with Lq != Lk is refused. Returns None when every query sees every key.
    """
    if causal and query_length != key_length:
        raise ValueError(
            f"a causal mask needs as many queries as keys (causal self attention), got "
            f"{query_length} and {key_length}; causal cross attention sees the whole source "
            "(pass causal=pattern.triangular)"
        )
    mask = None
    if causal:
        t = torch.arange(query_length, device=device)[:, None]
        s = torch.arange(key_length, device=device)[None, :]
        mask = (s <= t)[None, None]
    if key_padding_mask is not None:
        valid = ~key_padding_mask[:, None, None, :]
        mask = valid if mask is None else mask & valid
    return mask


def masked_softmax(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over the last dim that gives all-zero rows (not NaN) where nothing is allowed.

    Args:
        scores: [..., Lk] float scores.
        allowed: bool mask broadcastable to ``scores`` (True = visible), or None.
    """
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    any_allowed = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_allowed, 0.0)
    return torch.softmax(scores, dim=-1) * any_allowed
