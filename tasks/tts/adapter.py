"""ESPnet's attention contract on top of any zoo member.

ESPnet's transformer layers call ``attn(query, key, value, mask)`` with ``[B, T, E]`` inputs and
a mask that is True (or 1) where a query may see a key: ``[B, 1, T2]`` (key padding) or
``[B, T1, T2]`` (key padding and the causal triangle, ``subsequent_mask``). Inside, ESPnet's
``MultiHeadedAttention`` works in ``[B, H, T, D]``. This module is the one place where that
layout and mask convention are converted to the zoo's ``[B, L, H, D]`` with a
``key_padding_mask [B, Lk]`` (True = padding); the zoo member's pattern supplies causality.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention
from torch import Tensor, nn

from attention_zoo import Attention, LayerInput, Pattern, build_attention
from tasks.base import AttentionChoice


class EspnetAttentionAdapter(nn.Module):
    """A drop-in replacement for ESPnet's ``MultiHeadedAttention`` around a zoo mechanism.

    Same projections and parameter names as ESPnet's module (``linear_q``, ``linear_k``,
    ``linear_v``, ``linear_out``), so its weights load unchanged; the softmax between them is
    replaced by ``attention``. There is no dropout on attention weights: efficient mechanisms
    never form them.

    Args:
        n_head: heads H.
        n_feat: model width E = H * D.
        attention: the zoo member and its hyperparameters.
        pattern: the pattern this module serves (causality comes from here, not from the mask).
    """

    def __init__(self, n_head: int, n_feat: int, attention: AttentionChoice, pattern: Pattern) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"n_feat={n_feat} is not divisible by n_head={n_head}")
        self.h = n_head
        self.d_k = n_feat // n_head
        self.pattern = pattern
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.attention: Attention = build_attention(
            attention.name, pattern=pattern, heads=n_head, head_dim=self.d_k, input_dim=n_feat,
            source_dim=n_feat, **dict(attention.args)
        )

    @classmethod
    def replacing(cls, module: MultiHeadedAttention, attention: AttentionChoice,
                  pattern: Pattern) -> EspnetAttentionAdapter:
        """An adapter with ``module``'s projection weights (keeps ESPnet's initialisation)."""
        if not isinstance(module.q_norm, nn.Identity):
            raise ValueError("ESPnet attention with qk_norm=True has no zoo equivalent")
        adapter = cls(module.h, module.h * module.d_k, attention, pattern)
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            getattr(adapter, name).load_state_dict(getattr(module, name).state_dict())
        return adapter.to(module.linear_q.weight.device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                expand_kv: bool = False) -> Tensor:
        """ESPnet's contract.

        Args:
            query: [B, T1, E].
            key, value: [B, T2, E].
            mask: None, [B, 1, T2] or [B, T1, T2]; True/1 where a query may see a key.
            expand_kv: ESPnet's partially autoregressive decoding shortcut (unsupported).

        Returns:
            [B, T1, E].
        """
        if expand_kv:
            raise ValueError("expand_kv (ESPnet's partially autoregressive decoding) is not supported")
        if not self.pattern.cross and query.shape[1] != key.shape[1]:
            raise ValueError(
                f"{self.pattern.value} attention got {query.shape[1]} queries for {key.shape[1]} keys: "
                "ESPnet's cached one-step decoding is not supported; decode by re-running the "
                "decoder on the whole prefix (tasks.tts.model.generate_transformer)"
            )
        batch = query.shape[0]
        q = self.linear_q(query).view(batch, -1, self.h, self.d_k)  # [B, T1, H, D]
        k = self.linear_k(key).view(batch, -1, self.h, self.d_k)  # [B, T2, H, D]
        v = self.linear_v(value).view(batch, -1, self.h, self.d_k)  # [B, T2, H, D]
        padding = key_padding_mask(mask, query.shape[1], key.shape[1],
                                   causal=self.pattern.triangular)
        layer_input = None
        if self.attention.needs_layer_input:
            if value is not key:
                raise ValueError(f"{self.attention.name} reads the layer's key/value input, so "
                                 "keys and values must be one tensor")
            layer_input = LayerInput(query=query, source=key, q_proj=self.linear_q,
                                     k_proj=self.linear_k, v_proj=self.linear_v)
        out = self.attention(q, k, v, padding, layer_input=layer_input)  # [B, T1, H, D]
        return self.linear_out(out.reshape(batch, -1, self.h * self.d_k))


def key_padding_mask(mask: Tensor | None, query_length: int, key_length: int, *,
                     causal: bool) -> Tensor | None:
    """The zoo's ``key_padding_mask [B, T2]`` (True = padding) from an ESPnet mask.

    ESPnet's mask is True where a query may see a key. A ``[B, 1, T2]`` mask is key padding
    alone. A ``[B, T1, T2]`` mask must be key padding combined with the pattern's own
    causality (ESPnet's ``subsequent_mask`` for causal self attention, nothing for the others;
    ``causal`` is the pattern's triangle, ``Pattern.triangular``): any
    other shape of mask cannot be expressed to a zoo member, and is an error rather than being
    silently ignored. Returns None when no key is padding.
    """
    if mask is None:
        return None
    if mask.ndim != 3 or mask.shape[-1] != key_length or mask.shape[1] not in (1, query_length):
        raise ValueError(
            f"ESPnet mask must be [B, 1, {key_length}] or [B, {query_length}, {key_length}], "
            f"got {list(mask.shape)}"
        )
    mask = mask.bool()
    # In a causal [B, T1, T2] mask the last query row sees every valid key (ESPnet's own rule).
    valid = mask[:, -1, :]  # [B, T2]
    if mask.shape[1] > 1:
        expected = valid[:, None, :].expand(-1, query_length, -1)  # [B, T1, T2]
        if causal:
            triangle = torch.ones(query_length, key_length, dtype=torch.bool, device=mask.device).tril()
            expected = expected & triangle
        if not torch.equal(mask, expected):
            kind = "causal" if causal else "non-causal"
            raise ValueError(
                f"ESPnet mask is not key padding combined with {kind} attention: a zoo member "
                "only takes key padding and its own pattern"
            )
    padding = ~valid
    return padding if bool(padding.any()) else None


def swap_attention(model: nn.Module, role_of: Mapping[str, str],
                   attention: Mapping[str, AttentionChoice],
                   roles: Mapping[str, Pattern]) -> dict[str, list[str]]:
    """Replace every ESPnet attention module of ``model`` by an adapter, in place.

    Args:
        model: an ESPnet model.
        role_of: regular expressions over module paths (``r"encoder\\.encoders\\.\\d+\\.self_attn"``)
            mapped to role names; every attention module must match exactly one.
        attention: the mechanism of each role.
        roles: the pattern of each role.

    Returns:
        The replaced module paths, per role. Raises if a module matches no role or several, or
        if an attention module of another kind (ESPnet's relative-position variants) remains.
    """
    targets = []
    for path, module in model.named_modules():
        if isinstance(module, MultiHeadedAttention):
            if type(module) is not MultiHeadedAttention:
                raise TypeError(f"{path}: {type(module).__name__} has no zoo adapter "
                                "(use the transformer encoder and decoder types)")
            matches = [role for regex, role in role_of.items() if re.fullmatch(regex, path)]
            if len(matches) != 1:
                raise ValueError(f"attention module {path} matches roles {matches or 'none'}; "
                                 f"role patterns: {dict(role_of)}")
            targets.append((path, module, matches[0]))
    replaced: dict[str, list[str]] = {role: [] for role in roles}
    for path, module, role in targets:
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attribute, EspnetAttentionAdapter.replacing(module, attention[role], roles[role]))
        replaced[role].append(path)
    return replaced
