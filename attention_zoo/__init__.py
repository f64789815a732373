"""attention_zoo: every attention mechanism behind one contract.

Layout at the boundary: ``[batch, length, heads, head_dim]`` (see :mod:`attention_zoo.base`).

    >>> from attention_zoo import build_attention, list_attentions
    >>> attn = build_attention("lavo", pattern="causal_self", heads=8, head_dim=64, r=32, w=16)
"""

from attention_zoo import mechanisms  # noqa: F401  (registers the built-in members)
from attention_zoo.base import (
    Attention,
    AttentionConfigError,
    AttentionSpec,
    Complexity,
    HyperParameter,
    LayerInput,
    Pattern,
    allowed_keys,
    masked_softmax,
)
from attention_zoo.layer import MultiHeadAttention, backbone_modules, weight_decay_groups
from attention_zoo.registry import (
    ENTRY_POINT_GROUP,
    attention_spec,
    build_attention,
    list_attentions,
    parse_attention_args,
    register_attention,
    reload_entry_points,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Attention",
    "AttentionConfigError",
    "AttentionSpec",
    "Complexity",
    "HyperParameter",
    "LayerInput",
    "MultiHeadAttention",
    "Pattern",
    "allowed_keys",
    "attention_spec",
    "backbone_modules",
    "build_attention",
    "list_attentions",
    "masked_softmax",
    "parse_attention_args",
    "register_attention",
    "reload_entry_points",
    "weight_decay_groups",
]
