"""MQAR: the generator draws Zoology's distribution (disjoint vocabularies, every key queried
once at a power-law slot, targets only there), settings that cannot be generated are refused
naming the limit, the model is causal, and a tiny run trains and reports its metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attention_zoo import AttentionConfigError, backbone_modules, weight_decay_groups
from runners.execute import execute
from tasks.base import AttentionChoice
from tasks.mqar.data import (
    IGNORE,
    RecallSlice,
    generate,
    parse_slices,
    query_slot_weights,
)
from tasks.mqar.model import RecallModel, RecallModelShape
from tasks.mqar.task import MQARConfig, MQARTask, RecallData
from tasks.registry import get_task

V = 64


def _layout(recall_slice: RecallSlice, **kwargs):
    data = generate(recall_slice, examples=200, vocab_size=V, seed=3, **kwargs)
    n = recall_slice.kv_pairs
    inputs, targets = data.inputs.numpy(), data.targets.numpy()
    return inputs, targets, inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2]


def test_keys_and_values_come_from_disjoint_vocabularies_without_repeats():
    inputs, _, keys, values = _layout(RecallSlice(64, 8))
    assert inputs.shape == (200, 64) and inputs.dtype == np.int64
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    for row_keys, row_values in zip(keys, values):
        assert len(set(row_keys)) == 8 and len(set(row_values)) == 8


def test_every_key_is_queried_once_after_the_pairs_with_its_value_as_target():
    inputs, targets, keys, values = _layout(RecallSlice(64, 8), random_filler=False)
    for row in range(len(inputs)):
        queried = np.flatnonzero(targets[row] != IGNORE)
        assert len(queried) == 8
        assert queried.min() >= 16 and np.all((queried - 16) % 2 == 0)  # slot starts after the pairs
        bound = dict(zip(keys[row], values[row]))
        assert sorted(inputs[row, queried]) == sorted(keys[row])
        assert all(targets[row, q] == bound[inputs[row, q]] for q in queried)
        filler = np.ones(64, dtype=bool)
        filler[:16] = False
        filler[queried] = False
        assert np.all(inputs[row, filler] == 0)


def test_random_filler_draws_the_whole_vocabulary_but_targets_stay_on_queries():
    inputs, targets, _, _ = _layout(RecallSlice(64, 4), random_filler=True)
    filler = inputs[:, 8:][targets[:, 8:] == IGNORE]
    assert filler.min() >= 0 and filler.max() < V
    assert len(np.unique(filler)) > V // 2  # not a constant pad
    assert np.all((targets != IGNORE).sum(axis=1) == 4)


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_slots_follow_zoologys_power_law(power_a):
    """With one pair the slot of the query is one draw from p_i ∝ a i^(a-1)."""
    recall_slice = RecallSlice(24, 1)
    data = generate(recall_slice, examples=20000, vocab_size=V, seed=0, power_a=power_a)
    position = (data.targets != IGNORE).int().argmax(dim=1).numpy()
    slots = (position - 2) // 2
    expected = query_slot_weights(11, power_a)
    observed = np.bincount(slots, minlength=11) / len(slots)
    np.testing.assert_allclose(observed, expected, atol=0.012)
    assert np.allclose(query_slot_weights(5, 1.0), 0.2)  # a = 1: uniform


def test_several_queries_are_drawn_in_succession_as_numpys_weighted_choice():
    """The exponential-keys draw of ordered slot pairs matches ``choice(p=..., replace=False)``."""
    from tasks.mqar.data import _successive_sample

    weights = query_slot_weights(4, 0.3)
    ours = _successive_sample(np.random.default_rng(0), weights, 40000, 2)
    rng = np.random.default_rng(1)
    numpys = np.stack([rng.choice(4, size=2, replace=False, p=weights) for _ in range(40000)])
    count = lambda pairs: np.bincount(pairs[:, 0] * 4 + pairs[:, 1], minlength=16) / len(pairs)  # noqa: E731
    np.testing.assert_allclose(count(ours), count(numpys), atol=0.01)


def test_the_seed_alone_fixes_the_examples():
    draw = lambda seed: generate(RecallSlice(32, 4), examples=50, vocab_size=V, seed=seed)  # noqa: E731
    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)


def test_splits_use_separate_streams_of_the_run_seed():
    from tasks.mqar.task import RecallData

    config = MQARConfig(vocab_size=V, seq_len=32, kv_pairs=4, heldout="32:4", train_examples=50,
                        test_examples=50)
    data = RecallData.generate(config, seed=1)
    assert not torch.equal(data.test.inputs, data.train.inputs[:50])
    assert not torch.equal(data.test.inputs, data.heldout[0].inputs)
    assert torch.equal(RecallData.generate(config, seed=1).train.inputs, data.train.inputs)


# Refusals ---------------------------------------------------------------------------------------


def test_more_pairs_than_fit_are_refused_naming_the_limit():
    with pytest.raises(AttentionConfigError, match=r"17 key-value pairs do not fit in seq_len=64.*"
                                                   r"at most 16 pairs"):
        generate(RecallSlice(64, 17), examples=1, vocab_size=8192, seed=0)
    with pytest.raises(AttentionConfigError, match=r"L64-kv32.*at most 16 pairs"):
        MQARTask.make_config({"heldout": "64:32"}).check()


def test_a_vocabulary_too_small_for_disjoint_keys_and_values_is_refused():
    with pytest.raises(AttentionConfigError, match=r"vocab_size=16 is too small for 8 distinct keys.*"
                                                   r"7 key tokens \[1, 8\).*at least 18"):
        generate(RecallSlice(64, 8), examples=1, vocab_size=16, seed=0)
    MQARConfig(vocab_size=18, seq_len=32, kv_pairs=8, heldout="").check()  # the limit itself fits


def test_unreadable_slices_and_bad_widths_are_refused():
    with pytest.raises(AttentionConfigError, match=r"cannot read slice '128x8'.*seq_len:kv_pairs"):
        parse_slices("128x8")
    assert parse_slices(" 128:8, 256:16 ,") == (RecallSlice(128, 8), RecallSlice(256, 16))
    with pytest.raises(AttentionConfigError, match=r"d_model=10 is not divisible by heads=4"):
        MQARConfig(d_model=10, heads=4).check()


def test_the_presets_are_valid_settings():
    """smoke.yaml spells out the defaults; every combination of paper.yaml's sweeps is valid."""
    import itertools

    assert [MQARTask.make_config(v) for v in MQARTask.preset("smoke").parts[0].settings] == [MQARConfig()]
    variants = MQARTask.preset("paper").parts[0].settings
    assert [v["seq_len"] for v in variants] == [64, 128, 256, 512]
    for variant in variants:
        sweeps = {k: v if isinstance(v, list) else [v] for k, v in variant.items()}
        for values in itertools.product(*sweeps.values()):
            MQARTask.check_settings(MQARTask.make_config(dict(zip(sweeps, values))))


# Model and run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["none", "learned"])
def test_the_model_is_causal(positions):
    shape = RecallModelShape(vocab_size=V, max_len=16, d_model=16, heads=2, mlp_ratio=2,
                             positions=positions)
    model = RecallModel(shape, AttentionChoice("softmax")).eval()
    tokens = torch.randint(V, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_a_tiny_run_trains_and_reports_every_slice(tmp_path):
    assert get_task("mqar") is MQARTask
    config = MQARTask.make_config({
        "vocab_size": "32", "seq_len": "16", "kv_pairs": "2", "heldout": "32:4",
        "train_examples": "64", "test_examples": "20", "d_model": "16", "steps": "30",
        "batch_size": "16", "lr": "0.01"})
    result = execute(MQARTask, config, AttentionChoice("softmax"), seed=0, device="cpu",
                     workdir=tmp_path)
    assert set(result.metrics) == {"accuracy", "validation_accuracy", "accuracy_L32-kv4"}
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    losses = result.extra["train_loss"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.parameters > result.attention_parameters == 0
    assert result.train_seconds > 0 and result.eval_seconds > 0
    assert not any(tmp_path.iterdir())  # nothing written but what a run keeps


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet", "gla", "lavo"])
def test_the_backbone_keeps_each_mechanisms_own_initialisation(name):
    """GPT-2's init of the backbone must not reset a mechanism's parameters: with it, Mamba-2's
    step-size bias was zeroed (every decay started near exp(-0.69 a)) and the gated recurrences
    sat at chance on MQAR. The diagnostic switch still reproduces the old behaviour."""
    shape = RecallModelShape(vocab_size=32, max_len=16, d_model=16, heads=2, mlp_ratio=0)
    torch.manual_seed(0)
    model = RecallModel(shape, AttentionChoice(name))
    layer = model.blocks[0].attention
    before = {k: v.clone() for k, v in layer.attention.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        for module in backbone_modules(model):
            RecallModel._init_weights(module)
    for key, value in layer.attention.state_dict().items():
        torch.testing.assert_close(value, before[key] + (1.0 if value.is_floating_point()
                                   and key in dict(layer.attention.named_parameters()) else 0.0),
                                   rtol=0, atol=1e-6, msg=key)
    assert float(layer.q_proj.weight.abs().max()) < 0.2  # the projections are the backbone's
    torch.manual_seed(0)
    reset = RecallModel(dataclasses.replace(shape, reinit_attention=True), AttentionChoice(name))
    biases = [p for n, p in reset.blocks[0].attention.attention.named_parameters()
              if n.endswith("step_size.bias")]
    assert all(float(b.abs().max()) == 0.0 for b in biases)


def test_mamba2_starts_from_its_step_size_range():
    """dt = softplus(bias) lies in Mamba's [dt_min, dt_max] = [0.001, 0.1] at initialisation."""
    torch.manual_seed(0)
    model = RecallModel(RecallModelShape(vocab_size=32, max_len=16, d_model=16, heads=2,
                                         mlp_ratio=0), AttentionChoice("mamba2"))
    dt = torch.nn.functional.softplus(model.blocks[0].attention.attention.step_size.bias)
    assert float(dt.min()) >= 0.001 - 1e-7 and float(dt.max()) <= 0.1 + 1e-7


def test_weight_decay_spares_vectors():
    """Matrices decay; biases, norm gains and per-head scalars (Mamba-2's log a, D) do not."""
    model = RecallModel(RecallModelShape(vocab_size=32, max_len=16, d_model=16, heads=2,
                                         mlp_ratio=0), AttentionChoice("mamba2"))
    decayed, spared = weight_decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    core = model.blocks[0].attention.attention
    spared_ids = {id(p) for p in spared["params"]}
    assert {id(core.log_a), id(core.skip), id(core.step_size.bias)} <= spared_ids
    assert id(core.step_size.weight) in {id(p) for p in decayed["params"]}
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_validation_is_its_own_stream_and_leaves_the_other_splits_alone():
    config = MQARTask.make_config({"vocab_size": "32", "seq_len": "16", "kv_pairs": "2",
                                   "heldout": "32:4", "train_examples": "64",
                                   "test_examples": "20", "validation_examples": "20"})
    data = RecallData.generate(config, seed=3)
    assert not torch.equal(data.validation.inputs, data.test.inputs)
    again = RecallData.generate(dataclasses.replace(config, validation_examples=10), seed=3)
    assert torch.equal(again.test.inputs, data.test.inputs)
    assert torch.equal(again.heldout[0].inputs, data.heldout[0].inputs)
