"""Registry behaviour: lookup, errors naming the valid choices, entry-point plug-ins, the docs."""

from __future__ import annotations

import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from attention_zoo import (
    AttentionConfigError,
    Pattern,
    attention_spec,
    build_attention,
    list_attentions,
    parse_attention_args,
    registry,
)
from attention_zoo.testing import check_contract
from runners.commands.zoo import capability_markdown

pytestmark = pytest.mark.zoo

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_unknown_name_lists_known():
    with pytest.raises(AttentionConfigError, match=r"unknown attention 'lavoo'; known: .*lavo.*softmax"):
        build_attention("lavoo", pattern="causal_self", heads=2, head_dim=8)


def test_unknown_pattern_lists_valid():
    with pytest.raises(ValueError, match=r"unknown attention pattern 'causal'; valid: noncausal_self"):
        build_attention("lavo", pattern="causal", heads=2, head_dim=8)


def test_unknown_hyperparameter_lists_valid():
    with pytest.raises(AttentionConfigError,
                       match=r"lavo: unknown hyperparameter 'rank'; valid: r, w, memory, bases, "
                             r"position, combine"):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, rank=4)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("r", "4", r"'r' expects int \| None, got str '4'"),
    ("w", True, r"'w' expects int, got bool True"),
    ("w", 2.5, r"'w' expects int, got float 2.5"),
    ("w", 0, r"'w' must be >= 1, got 0"),
    ("bases", "learnt", r"'bases' expects 'fixed' \| 'learned', got str 'learnt'"),
])
def test_ill_typed_hyperparameters(key, value, message):
    with pytest.raises(AttentionConfigError, match=message):
        build_attention("lavo", pattern="causal_self", heads=2, head_dim=8, **{key: value})


def test_parse_attention_args_types_values():
    assert parse_attention_args("lavo", "r=4, w=8,bases=learned,combine=JOINT") == {
        "r": 4, "w": 8, "bases": "learned", "combine": "joint"}
    assert parse_attention_args("lavo", "r=none") == {"r": None}
    with pytest.raises(AttentionConfigError, match=r"cannot read 'x' as 'w' \(int\)"):
        parse_attention_args("lavo", "w=x")
    with pytest.raises(AttentionConfigError, match=r"expected key=value .* valid keys: r, w"):
        parse_attention_args("lavo", "r")


def test_unsupported_pattern_names_supported_ones(scratch_registry):
    from attention_zoo.mechanisms.softmax import SoftmaxAttention

    @registry.register_attention("only_causal")
    class OnlyCausal(SoftmaxAttention):
        """Causal self attention only."""

        patterns = frozenset({Pattern.CAUSAL_SELF})

    assert list_attentions("noncausal_cross").count("only_causal") == 0
    assert "only_causal" in list_attentions(Pattern.CAUSAL_SELF)
    expected = "does not support the noncausal_cross pattern; it supports: causal_self"
    with pytest.raises(AttentionConfigError, match=expected):
        build_attention("only_causal", pattern="noncausal_cross", heads=2, head_dim=8)


def test_spec_is_queryable_without_building():
    spec = attention_spec("lavo")
    assert spec.complexity.value == "linear"
    assert spec.hyperparameter("w").default == 16
    assert spec.hyperparameter("bases").choices == ("fixed", "learned")


def test_malformed_mechanisms_fail_at_registration(scratch_registry):
    from attention_zoo import Attention

    class NoPatterns(Attention):
        def attend(self, q, k, v, key_padding_mask, layer_input=None):
            return q

    with pytest.raises(TypeError, match="declares no supported pattern"):
        registry.register_attention("no_patterns")(NoPatterns)

    class DecodesWithoutStep(NoPatterns):
        patterns = frozenset({Pattern.CAUSAL_SELF})
        decoding = True

    with pytest.raises(TypeError, match="does not implement init_state and step"):
        registry.register_attention("decodes_without_step")(DecodesWithoutStep)
    with pytest.raises(ValueError, match="lower_snake_case"):
        registry.register_attention("Bad-Name")(NoPatterns)


def _install_fake_distribution(root: Path, module_source: str, entry_points: str) -> None:
    """A minimal installed distribution (dist-info + module) that importlib.metadata finds."""
    (root / "my_zoo_plugin.py").write_text(textwrap.dedent(module_source))
    info = root / "my_zoo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-zoo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_plugin_is_discovered(scratch_registry, tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, """
        import torch
        from attention_zoo import Attention, Complexity, Pattern
        from attention_zoo.mechanisms.softmax import softmax_attention

        class Doubled(Attention):
            '''Softmax attention of doubled queries (a sharper softmax).'''
            patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
            complexity = Complexity.QUADRATIC

            def attend(self, q, k, v, key_padding_mask, layer_input=None):
                return softmax_attention(2 * q, k, v, causal=False,
                                         key_padding_mask=key_padding_mask)
        """, """
        [attnbench.attentions]
        doubled = my_zoo_plugin:Doubled
        broken = my_zoo_plugin_missing:Nothing
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plug-in 'broken'"):
        registry.reload_entry_points()
    try:
        assert "doubled" in list_attentions("noncausal_cross")
        assert "broken" in registry.plugin_errors
        check_contract("doubled")
    finally:
        sys.modules.pop("my_zoo_plugin", None)
        registry.plugin_errors.clear()


def test_the_documented_example_registers_and_passes_the_contract(scratch_registry):
    text = (DOCS / "adding_an_attention.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/adding_an_attention.md has no python example"
    module = types.ModuleType("documented_example")  # dataclasses need a real module
    sys.modules[module.__name__] = module
    try:
        exec(compile(blocks[0], "docs/adding_an_attention.md", "exec"), module.__dict__)
    finally:
        sys.modules.pop(module.__name__)
    check_contract("sigmoid")
    attention = build_attention("sigmoid", pattern="causal_self", heads=2, head_dim=8, bias=-1.0)
    assert attention(*(torch.randn(1, 5, 2, 8) for _ in range(3))).shape == (1, 5, 2, 8)


def test_the_documented_capability_table_is_generated_from_the_registry():
    text = (DOCS / "zoo.md").read_text()
    table = re.search(r"<!-- zoo-table:start -->\n(.*?)<!-- zoo-table:end -->", text, re.S)
    assert table, "docs/zoo.md lacks the generated capability table markers"
    assert table.group(1) == capability_markdown(), (
        "docs/zoo.md's capability table is stale: regenerate it with `attnbench zoo --format markdown`"
    )
