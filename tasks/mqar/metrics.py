"""Recall accuracy: the fraction of queried positions whose most likely next token is the value
bound to the queried key (Zoology's accuracy; positions whose target is ``IGNORE`` do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.mqar.data import IGNORE, RecallExamples
from tasks.mqar.model import RecallModel


@dataclass(frozen=True)
class RecallScore:
    """Correct and total queries of one evaluation; ``accuracy`` is their ratio."""

    correct: int
    queries: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries


def count_correct(logits: Tensor, targets: Tensor) -> RecallScore:
    """Queries answered right. logits [Q, V] at the queried positions, targets [Q] (no IGNORE)."""
    return RecallScore(int((logits.argmax(dim=-1) == targets).sum()), targets.numel())


@torch.no_grad()
def recall_accuracy(model: RecallModel, examples: RecallExamples, *, batch_size: int,
                    device: str | torch.device = "cpu") -> RecallScore:
    """Accuracy of ``model`` over every queried position of ``examples``, in batches."""
    model.eval()
    correct = queries = 0
    for start in range(0, len(examples), batch_size):
        inputs = examples.inputs[start:start + batch_size].to(device)  # [B, L]
        targets = examples.targets[start:start + batch_size].to(device)  # [B, L]
        queried = targets != IGNORE
        score = count_correct(model.logits(model(inputs)[queried]), targets[queried])
        correct, queries = correct + score.correct, queries + score.queries
    return RecallScore(correct, queries)
