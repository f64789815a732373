"""The task interface: typed configs and attention roles checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from attention_zoo import AttentionConfigError, Pattern
from tasks.base import AttentionChoice, Metric, Task, TaskResult, resolve_attention

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

    def run(self, config, attention, *, seed, device, workdir):
        return TaskResult(metrics={"loss": 0.0}, parameters=0)


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
