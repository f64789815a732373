"""fairseq's ``MultiheadAttention`` interface around the zoo's :class:`MultiHeadAttention`.

fairseq's transformer layers call their attention as
``attn(query, key, value, key_padding_mask=, incremental_state=, need_weights=, attn_mask=)`` on
time-major tensors ``[T, B, C]`` and expect ``(output [T, B, C], weights or None)``. This adapter
is the only place where fairseq's time-major layout meets the zoo's batch-major one: it transposes
on the way in and out, and nowhere else is converted.

Incremental decoding (generation, streaming evaluation) goes through fairseq's own
``incremental_state`` dictionary: the zoo mechanism's decoding state (a KV cache for softmax, the
running memory and current window for LAVO) is stored there under this module's key, so
fairseq's ``SequenceGenerator`` and ``reorder_incremental_state`` (beam search) work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from attention_zoo import (
    AttentionConfigError,
    MultiHeadAttention,
    Pattern,
    attention_spec,
    list_attentions,
    parse_attention_args,
)

IncrementalState = dict[str, dict[str, Any]]
_STATE_KEY = "zoo_state"


def checked_attention(
    name: str, args_text: str | None, pattern: Pattern, *, role: str, dropout: float = 0.0
) -> tuple[str, dict[str, Any]]:
    """A mechanism's name and typed hyperparameters, checked by the zoo registry for ``pattern``.

    Args:
        name: registry name (``--attention``, ``--encoder-attention``...).
        args_text: its hyperparameters as ``key=value,...`` (empty or None: the defaults).
        pattern: the pattern of the slot it fills.
        role: what needs it, for the message (``"a language model"``, ``"the encoder"``).
        dropout: fairseq's ``--attention-dropout``, which must be 0.

    Raises:
        AttentionConfigError: unknown mechanism, bad hyperparameter, a mechanism without
            ``pattern``, or a nonzero attention dropout (zoo mechanisms expose no attention
            weights to drop).
    """
    spec = attention_spec(name)
    if pattern not in spec.patterns:
        raise AttentionConfigError(
            f"attention {name!r} does not support {pattern.value}, which {role} needs; "
            f"those that do: {', '.join(list_attentions(pattern))}"
        )
    hyperparameters = parse_attention_args(name, args_text or "")
    spec.make_config(hyperparameters)
    if dropout:
        raise AttentionConfigError(
            f"--attention-dropout {dropout} is not supported with zoo attention (no attention "
            "weights are materialised); use 0"
        )
    return name, hyperparameters


def index_batch(state: Any, order: Tensor) -> Any:
    """Select batch entries ``order`` from a decoding state (beam search reordering).

    Zoo decoding states keep the batch first in every tensor (``[B, ...]``); they are dataclasses,
    tensors, or containers of them. Ints (token counts) are shared by the whole batch.
    """
    if isinstance(state, Tensor):
        return state.index_select(0, order)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{
            f.name: index_batch(getattr(state, f.name), order) for f in dataclasses.fields(state)
        })
    if isinstance(state, tuple | list):
        return type(state)(index_batch(s, order) for s in state)
    if isinstance(state, Mapping):
        return {key: index_batch(value, order) for key, value in state.items()}
    return state


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a decoding state (to show that LAVO's stays constant)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return sum(state_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, tuple | list):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, Mapping):
        return sum(state_bytes(s) for s in state.values())
    return 0


@with_incremental_state
class ZooAttention(nn.Module):
    """Any zoo mechanism behind fairseq's ``MultiheadAttention`` call signature.

    Args:
        embed_dim: model width C.
        num_heads: heads H (C must be divisible by H).
        attention: registry name of the mechanism.
        attention_args: its typed hyperparameters (``parse_attention_args`` reads them).
        pattern: the attention pattern of this slot (``causal_self`` for a language model).
        kdim, vdim: key and value widths for cross attention (default ``embed_dim``).
        recompute_decoding: for a causal mechanism that does not declare incremental decoding,
            decode by keeping the inputs seen so far and running the full causal pass over them
            at each step (quadratic in the generated length) instead of refusing. Generation
            (summarization) uses it so that every causal mechanism can decode; the LM's
            unbounded-context streaming does not (it would not be a constant-state stream).

    Shapes (fairseq's time-major layout):
        query: [T, B, C]; key, value: [S, B, kdim/vdim] for cross attention (for self attention
        fairseq passes the query again); key_padding_mask: [B, S] bool, True at padding;
        output: [T, B, C]. Attention weights are never materialised, so the second return value
        is always None.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: str,
        attention_args: Mapping[str, Any] | None = None,
        *,
        pattern: str | Pattern = Pattern.CAUSAL_SELF,
        kdim: int | None = None,
        vdim: int | None = None,
        recompute_decoding: bool = False,
    ) -> None:
        super().__init__()
        self.recompute_decoding = recompute_decoding
        self.layer = MultiHeadAttention(
            embed_dim, num_heads, attention, pattern=pattern, attention_args=attention_args,
            kdim=kdim, vdim=vdim,
        )
        self.pattern = self.layer.pattern
        self.spec = attention_spec(attention)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's initialisation of its own ``MultiheadAttention``, for like-for-like runs."""
        for projection in (self.layer.q_proj, self.layer.k_proj, self.layer.v_proj):
            nn.init.xavier_uniform_(projection.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.layer.out_proj.weight)
        if self.layer.out_proj.bias is not None:
            nn.init.zeros_(self.layer.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        incremental_state: IncrementalState | None = None,
        need_weights: bool = False,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, None]:
        """Attend on time-major tensors; see the class docstring for shapes.

        ``attn_mask`` is the future mask fairseq builds for decoder self attention; a causal
        mechanism is causal by construction, so the mask is not needed (and any other mask is
        refused). ``need_weights`` and ``need_head_weights`` are accepted and ignored: there are no
        weights to return (fairseq's decoder asks its last layer's cross attention for them, for
        alignment, and copes with None).
        """
        if before_softmax:
            raise ValueError(f"{self.spec.name}: zoo attention has no attention scores to return")
        if attn_mask is not None and not self.pattern.triangular:
            raise ValueError(
                f"{self.spec.name}: an attn_mask was given to {self.pattern.value} attention; "
                "zoo mechanisms apply only their own pattern's mask"
            )
        x = query.transpose(0, 1)  # [B, T, C]
        if self.pattern.cross:
            if key is None:
                raise ValueError(f"{self.pattern.value} attention needs key and value inputs")
            source = key.transpose(0, 1)  # [B, S, kdim]
            # fairseq passes the encoder output as both key and value: keep it one tensor.
            source_values = source if value is None or value is key else value.transpose(0, 1)
            if incremental_state is not None and not self.pattern.causal:
                raise NotImplementedError(
                    f"{self.spec.name}: incremental decoding of cross attention feeds queries "
                    "one at a time, which needs the causal_cross pattern (a query's output then "
                    f"depends on it and the source alone), not {self.pattern.value}"
                )
            # causal_cross decodes by feeding the new queries alone against the whole source.
            out = self.layer(x, source, source_values, key_padding_mask)  # [B, T, C]
        elif incremental_state is not None:
            out = self._decode(x, incremental_state)
        else:
            out = self.layer(x, key_padding_mask=key_padding_mask)  # [B, T, C]
        return out.transpose(0, 1), None  # [T, B, C]

    def _decode(self, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """Continue decoding from the state in ``incremental_state``: x [B, T, C] -> [B, T, C]."""
        if not self.pattern.triangular:
            raise ValueError(
                f"{self.spec.name}: incremental decoding needs causal self attention, "
                f"not {self.pattern.value}"
            )
        if not self.spec.decoding:
            if self.recompute_decoding:
                return self._decode_by_recomputing(x, incremental_state)
            capable = ", ".join(n for n in list_attentions(Pattern.CAUSAL_SELF)
                                if attention_spec(n).decoding)
            raise NotImplementedError(
                f"attention {self.spec.name!r} does not declare incremental decoding, so it "
                f"cannot generate or stream token by token; mechanisms that do: {capable}"
            )
        buffer = self.get_incremental_state(incremental_state, _STATE_KEY)
        state = (buffer["state"] if buffer is not None
                 else self.layer.init_state(x.shape[0], device=x.device, dtype=x.dtype))
        outputs = []
        for t in range(x.shape[1]):
            out, state = self.layer.step(x[:, t : t + 1], state)  # [B, 1, C]
            outputs.append(out)
        self.set_incremental_state(incremental_state, _STATE_KEY, {"state": state})
        return torch.cat(outputs, dim=1)

    def _decode_by_recomputing(self, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """x [B, T, C] -> [B, T, C]: the full causal pass over every input so far (kept, as the
        decoding state, in ``incremental_state``), of which the last T rows are returned."""
        buffer = self.get_incremental_state(incremental_state, _STATE_KEY)
        inputs = x if buffer is None else torch.cat([buffer["state"], x], dim=1)  # [B, t + T, C]
        self.set_incremental_state(incremental_state, _STATE_KEY, {"state": inputs})
        return self.layer(inputs)[:, -x.shape[1] :]

    def decoding_state(self, incremental_state: IncrementalState | None) -> Any:
        """The zoo decoding state held in ``incremental_state`` (None before the first step)."""
        buffer = self.get_incremental_state(incremental_state, _STATE_KEY)
        return None if buffer is None else buffer["state"]

    def reorder_incremental_state(
        self, incremental_state: IncrementalState | None, new_order: Tensor
    ) -> None:
        """Follow beam search: keep batch entries ``new_order`` of the decoding state."""
        buffer = self.get_incremental_state(incremental_state, _STATE_KEY)
        if buffer is not None:
            self.set_incremental_state(
                incremental_state, _STATE_KEY, {"state": index_batch(buffer["state"], new_order)}
            )

    def _get_input_buffer(self, incremental_state: IncrementalState | None) -> dict[str, Any]:
        # fairseq's decoder layer inspects this buffer for its key/value cache ("prev_key"); the
        # zoo state lives under another name, so the layer's own cache logic stays out of the way.
        return self.get_incremental_state(incremental_state, _STATE_KEY) or {}

    def _set_input_buffer(
        self, incremental_state: IncrementalState | None, buffer: dict[str, Any]
    ) -> IncrementalState | None:
        return self.set_incremental_state(incremental_state, _STATE_KEY, buffer)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern.value}, attention={self.spec.name}"
