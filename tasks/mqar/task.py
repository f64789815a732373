"""Multi-query associative recall (Zoology's MQAR): the quality probe that ranks attentions on
a CPU in minutes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from attention_zoo import AttentionConfigError, weight_decay_groups
from tasks.base import AttentionChoice, Metric, RunContext, Task, split_heads
from tasks.mqar.data import IGNORE, RecallExamples, RecallSlice, generate, parse_slices
from tasks.mqar.metrics import recall_accuracy
from tasks.mqar.model import ROLE, ROLES, RecallModel, RecallModelShape
from tasks.registry import register_task


@dataclass(frozen=True)
class MQARConfig:
    """Settings of one MQAR run. The defaults are the smoke size (``presets/smoke.yaml`` says
    which are Zoology's); ``presets/paper.yaml`` holds Zoology's sizes."""

    vocab_size: int = field(default=128, metadata={
        "help": "V: keys from [1, V/2), values from [V/2, V) (Zoology: 8192)", "min": 4})
    seq_len: int = field(default=64, metadata={"help": "training sequence length L", "min": 4})
    kv_pairs: int = field(default=8, metadata={"help": "key-value pairs per training example",
                                               "min": 1})
    heldout: str = field(default="128:16", metadata={
        "help": "held-out test slices 'seq_len:kv_pairs,...' beyond training (empty: none)"})
    power_a: float = field(default=0.01, metadata={
        "help": "Zoology's power_a: query slot i drawn with p ∝ i^(a-1) (1: uniform)", "min": 1e-6})
    random_filler: bool = field(default=False, metadata={
        "help": "non-query positions hold random tokens (Zoology's random_non_queries), else 0 "
                "(its Figure 2)"})
    train_examples: int = field(default=20000, metadata={"help": "training examples", "min": 1})
    test_examples: int = field(default=1000, metadata={"help": "test examples per slice", "min": 1})
    validation_examples: int = field(default=500, metadata={
        "help": "examples of the training slice for choosing hyperparameters (never the test's)",
        "min": 1})
    d_model: int = field(default=64, metadata={"help": "model width", "min": 1})
    layers: int = field(default=2, metadata={"help": "blocks (Zoology: 2)", "min": 1})
    heads: int = field(default=1, metadata={"help": "attention heads (Zoology: 1)", "min": 1})
    mlp_ratio: int = field(default=0, metadata={
        "help": "MLP width / d_model (0: no MLP, as Zoology's MQAR models)", "min": 0})
    conv_kernel: int = field(default=3, metadata={
        "help": "short gated convolution before each attention (Zoology's BaseConv; 0: none)",
        "min": 0})
    positions: Literal["none", "learned"] = field(default="none", metadata={
        "help": "position embeddings: none (Zoology's reference configs) or learned"})
    dropout: float = field(default=0.0, metadata={"help": "embedding dropout", "min": 0.0})
    steps: int = field(default=1200, metadata={"help": "optimiser steps", "min": 1})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: the runner's)", "min": 0})
    batch_size: int = field(default=32, metadata={"help": "training batch size", "min": 1})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate, cosine to 0",
                                             "min": 0.0})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW weight decay on matrices (Zoology: 0.1); none on vectors",
                                                       "min": 0.0})
    eval_batch_size: int = field(default=250, metadata={"help": "evaluation batch size", "min": 1})
    reinit_attention: bool = field(default=False, metadata={
        "help": "diagnostic: the backbone's GPT-2 initialisation also resets the mechanisms' own "
                "parameters (zeroes Mamba-2's step-size bias), as before the fix"})

    def training_slice(self) -> RecallSlice:
        return RecallSlice(self.seq_len, self.kv_pairs)

    def heldout_slices(self) -> tuple[RecallSlice, ...]:
        return parse_slices(self.heldout, owner="task mqar: heldout")

    def check(self) -> None:
        """Refuse settings that cannot be generated (each message names the limit)."""
        for recall_slice in (self.training_slice(), *self.heldout_slices()):
            recall_slice.check(self.vocab_size, owner=f"task mqar ({recall_slice.label()})")
        if self.d_model % self.heads:
            raise AttentionConfigError(
                f"task mqar: d_model={self.d_model} is not divisible by heads={self.heads}")


@dataclass(frozen=True)
class RecallData:
    """The generated splits: training examples, validation and test examples of the training
    slice, and test examples of every held-out slice."""

    train: RecallExamples
    test: RecallExamples
    heldout: tuple[RecallExamples, ...]
    validation: RecallExamples

    @classmethod
    def generate(cls, config: MQARConfig, seed: int) -> RecallData:
        """Every split from its own stream of ``seed`` (no example is shared between splits
        except by chance). The validation stream is spawned last, so the other splits are the
        same as without it."""
        heldout = config.heldout_slices()
        train_seed, test_seed, *heldout_seeds, validation_seed = np.random.SeedSequence(
            seed).spawn(3 + len(heldout))
        common = {"vocab_size": config.vocab_size, "power_a": config.power_a,
                  "random_filler": config.random_filler}

        def draw(recall_slice: RecallSlice, examples: int, stream: np.random.SeedSequence):
            return generate(recall_slice, examples=examples,
                            seed=int(stream.generate_state(1)[0]), **common)

        return cls(
            train=draw(config.training_slice(), config.train_examples, train_seed),
            test=draw(config.training_slice(), config.test_examples, test_seed),
            heldout=tuple(draw(s, config.test_examples, stream)
                          for s, stream in zip(heldout, heldout_seeds)),
            validation=draw(config.training_slice(), config.validation_examples, validation_seed),
        )


def heldout_metric(recall_slice: RecallSlice) -> str:
    """Name of a held-out slice's accuracy in the metrics: ``accuracy_L128-kv16``."""
    return f"accuracy_{recall_slice.label()}"


@register_task
class MQARTask(Task):
    """Multi-query associative recall with a small causal LM whose every layer's self attention
    is the mechanism under test (Zoology's setup). Trains with AdamW and a cosine schedule on
    the cross-entropy of the queried positions, and reports the recall accuracy on fresh test
    examples of the training slice (``accuracy``) and of every held-out slice
    (``accuracy_L<len>-kv<pairs>``)."""

    name = "mqar"
    roles = ROLES
    metrics = (
        Metric("accuracy", higher_is_better=True,
               description="recall accuracy on the queried positions, training length and pairs"),
    )
    smoke_ranks = True  # softmax 0.9999 ± 0.0001 vs linear 0.46 ± 0.31 over 3 seeds (README.md)
    Config = MQARConfig

    @classmethod
    def check_settings(cls, config: MQARConfig) -> None:
        config.check()

    @classmethod
    def attention_shapes(cls, config: MQARConfig) -> dict[str, tuple[int, int]]:
        shape = split_heads(config.d_model, config.heads, f"task {cls.name}: d_model / heads")
        return dict.fromkeys(cls.roles, shape)

    def prepare(self, config: MQARConfig, run: RunContext) -> RecallData:
        config.check()
        return RecallData.generate(config, run.seed)

    def build(self, config: MQARConfig, attention: Mapping[str, AttentionChoice],
              data: RecallData, run: RunContext) -> RecallModel:
        longest = max(s.slice.seq_len for s in (data.test, *data.heldout))
        shape = RecallModelShape(vocab_size=config.vocab_size, max_len=longest,
                                 d_model=config.d_model, layers=config.layers, heads=config.heads,
                                 mlp_ratio=config.mlp_ratio, dropout=config.dropout,
                                 conv_kernel=config.conv_kernel, positions=config.positions,
                                 reinit_attention=config.reinit_attention)
        return RecallModel(shape, attention[ROLE]).to(run.device)

    def train(self, model: RecallModel, config: MQARConfig, data: RecallData,
              run: RunContext) -> None:
        losses = train(model, data.train, config, generator=run.generator(), device=run.device)
        run.extra["train_loss"] = losses[:: max(1, len(losses) // 100)]
        run.extra["final_train_loss"] = losses[-1]

    def evaluate(self, model: RecallModel, config: MQARConfig, data: RecallData,
                 run: RunContext) -> dict[str, float]:
        scores = {"accuracy": recall_accuracy(model, data.test, batch_size=config.eval_batch_size,
                                              device=run.device).accuracy,
                  "validation_accuracy": recall_accuracy(
                      model, data.validation, batch_size=config.eval_batch_size,
                      device=run.device).accuracy}
        for examples in data.heldout:
            scores[heldout_metric(examples.slice)] = recall_accuracy(
                model, examples, batch_size=config.eval_batch_size, device=run.device).accuracy
        return scores


def train(model: RecallModel, examples: RecallExamples, config: MQARConfig, *,
          generator: torch.Generator, device: str) -> list[float]:
    """``config.steps`` AdamW steps on shuffled batches of ``examples`` (reshuffled every
    epoch), cross-entropy on the queried positions only; returns the loss of every step."""
    optimizer = torch.optim.AdamW(weight_decay_groups(model, config.weight_decay), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    batches = _batches(len(examples), config.batch_size, config.steps, generator)
    losses = []
    model.train()
    for indices in batches:
        inputs = examples.inputs[indices].to(device)  # [B, L]
        targets = examples.targets[indices].to(device)  # [B, L]
        queried = targets != IGNORE
        loss = F.cross_entropy(model.logits(model(inputs)[queried]), targets[queried])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)} at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


def _batches(examples: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches walking through random permutations of the examples."""
    batch_size = min(batch_size, examples)
    per_epoch = examples // batch_size
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        permutation = torch.randperm(examples, generator=generator)
        batches.extend(permutation[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return batches[:steps]


__all__ = ["MQARConfig", "MQARTask", "RecallData", "heldout_metric", "train"]
