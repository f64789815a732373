"""The task interface: typed configs and attention roles checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from attention_zoo import AttentionConfigError, Pattern
from tasks.base import AttentionChoice, Metric, Task, resolve_attention

pytestmark = pytest.mark.runner


@dataclass(frozen=True)
class ToyConfig:
    steps: int = field(default=10, metadata={"min": 1})
    lr: float = 1e-3


class Seq2Seq(Task):
    name = "toy"
    roles = {"encoder": Pattern.NONCAUSAL_SELF, "decoder": Pattern.CAUSAL_SELF,
             "cross": Pattern.NONCAUSAL_CROSS}
    metrics = (Metric("loss", higher_is_better=False),)
    Config = ToyConfig

    def build(self, config, attention, data, run):
        raise NotImplementedError("only the spec is used here")

    def train(self, model, config, data, run):
        raise NotImplementedError("only the spec is used here")

    def evaluate(self, model, config, data, run):
        raise NotImplementedError("only the spec is used here")


def test_config_overrides_are_typed_and_checked():
    assert Seq2Seq.make_config({"steps": "20", "lr": 0.1}) == ToyConfig(steps=20, lr=0.1)
    with pytest.raises(AttentionConfigError, match="unknown setting 'step'; valid: steps, lr"):
        Seq2Seq.make_config({"step": 3})
    with pytest.raises(AttentionConfigError, match="'steps' must be >= 1"):
        Seq2Seq.make_config({"steps": 0})
    with pytest.raises(AttentionConfigError, match="'steps' expects int"):
        Seq2Seq.make_config({"steps": 2.5})


def test_one_choice_fills_every_role():
    roles = resolve_attention(Seq2Seq, AttentionChoice("lavo", {"r": 4}))
    assert set(roles) == {"encoder", "decoder", "cross"}


def test_a_mechanism_lacking_a_pattern_is_refused(scratch_registry):
    from attention_zoo.mechanisms.softmax import SoftmaxAttention

    @scratch_registry.register_attention("self_only")
    class SelfOnly(SoftmaxAttention):
        """Self attention only."""

        patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})

    with pytest.raises(AttentionConfigError, match=r"role 'cross' needs noncausal_cross"):
        resolve_attention(Seq2Seq, AttentionChoice("self_only"))


def test_roles_must_match():
    with pytest.raises(AttentionConfigError, match=r"missing: \['cross'\]"):
        resolve_attention(Seq2Seq, {"encoder": AttentionChoice("lavo"),
                                    "decoder": AttentionChoice("lavo")})
    with pytest.raises(AttentionConfigError, match="unknown hyperparameter 'q'"):
        resolve_attention(Seq2Seq, AttentionChoice("lavo", {"q": 1}))


def test_a_task_declaring_bad_roles_or_names_is_refused_at_registration(scratch_tasks):
    class NoRoles(Seq2Seq):
        name = "no_roles"
        roles = {}

    with pytest.raises(AttentionConfigError, match="roles must map each role to a Pattern"):
        scratch_tasks.register_task(NoRoles)

    class BadName(Seq2Seq):
        name = "Bad-Name"

    with pytest.raises(AttentionConfigError, match="name must be lower_snake_case"):
        scratch_tasks.register_task(BadName)
    scratch_tasks.register_task(Seq2Seq)
    assert scratch_tasks.get_task("toy") is Seq2Seq and "toy" in scratch_tasks.list_tasks()

    class Impostor(Seq2Seq):
        name = "toy"

    with pytest.raises(AttentionConfigError, match="task 'toy' is registered twice"):
        scratch_tasks.register_task(Impostor)


def test_unknown_task_names_the_known_ones():
    from tasks.registry import get_task

    with pytest.raises(AttentionConfigError, match=r"unknown task 'lmm'; known: .*lm, mqar, point_cloud"):
        get_task("lmm")


def test_an_override_reaching_only_some_tasks_names_those_it_skipped():
    from runners.matrix import plan

    expansion = plan("smoke", ["task=time_series,point_cloud", "label_len=12", "attention=softmax"])
    assert {c.task for c in expansion.cells} == {"time_series", "point_cloud"}
    assert all(c.settings["label_len"] == 12 for c in expansion.cells if c.task == "time_series")
    assert "override label_len=12 skipped task 'point_cloud': it has no setting 'label_len'" in (
        expansion.notices)


def test_one_vocabulary_across_the_tasks():
    from tasks.registry import get_task, list_tasks
    from tasks.settings import SYNONYMS, VOCABULARY

    names = {name: {hp.name for hp in get_task(name).config_fields()} for name in list_tasks()
             if get_task(name).__module__.startswith("tasks.")}  # the built-in ones
    assert len(names) >= 6
    assert all(not (fields & set(SYNONYMS)) for fields in names.values()), names
    for shared in ("lr", "steps", "threads", "batch_size"):
        assert all(shared in fields for fields in names.values()), shared
    # Every task that reads a dataset names its path `data` (MQAR generates its own).
    assert all("data" in fields for name, fields in names.items() if get_task(name).datasets), names
    assert set(VOCABULARY) >= {"lr", "steps", "warmup_steps", "clip_norm", "data", "threads", "d_model",
                               "heads"}


def test_the_runners_presets_compose_the_tasks_presets(tmp_path):
    """A block naming a task preset starts from its settings, seeds and parts; the block's own
    keys win."""
    import yaml

    from runners.matrix import plan
    from tasks.registry import get_task

    cells = plan("paper", ["task=time_series", "attention=softmax"]).cells
    seeds = {}
    for cell in cells:
        seeds.setdefault(cell.settings["dataset"], set()).add(cell.seed)
    assert seeds == {"ETTh1": set(range(5)), "ETTh2": set(range(5)), "ETTm1": set(range(5)),
                     "ECL": {0, 1, 2}, "WTH": {0, 1, 2}}  # CAB's seeds, from the task's parts
    assert {c.settings["d_model"] for c in cells} == {512} and len(cells) == 6 * 5 + 4 * 3
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"defaults": {"preset": "smoke", "attention": "softmax"},
                                      "blocks": [{"task": "point_cloud", "settings": {"d_model": 16}},
                                                 {"task": "lm", "seed": [3, 4]}]}))
    cells = plan(preset).cells
    point_cloud = [c for c in cells if c.task == "point_cloud"]
    smoke = get_task("point_cloud").preset("smoke").parts[0].settings[0]
    assert [(c.settings["steps"], c.settings["d_model"]) for c in point_cloud] == [(smoke["steps"], 16)]
    lm = [c for c in cells if c.task == "lm"]
    assert sorted(c.seed for c in lm) == [3, 4] and all(c.settings["steps"] == 100 for c in lm)
    preset.write_text(yaml.safe_dump({"blocks": [{"task": "lm", "preset": "smok"}]}))
    with pytest.raises(AttentionConfigError, match=r"unknown preset 'smok'; presets: paper, smoke, tiny"):
        plan(preset)
