"""Decoding a trained ``zoo_transformer`` with fairseq's ``SequenceGenerator``, and ROUGE.

ROUGE-1, ROUGE-2 and ROUGE-L are F1 x 100 from Google's ``rouge-score`` package (its default
tokeniser: lower-cased alphanumeric tokens; Porter stemming on), averaged over the examples. CAB
reported ROUGE from the ``rouge`` package (pltrdy); the two differ slightly, so figures from this
task are comparable with each other, not digit for digit with CAB's table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_PACKAGE = "rouge-score (Google)"


def _rouge_scorer_module() -> Any:
    """``rouge_score.rouge_scorer``, with absl's log handler (rouge-score imports absl) holding the
    process's standard error.

    absl's handler keeps the stream that was ``sys.stderr`` when absl was imported, and closes it
    when logging's handlers are reset (``logging.config.dictConfig``, which submitit and hydra
    call) unless it is the standard error of that moment. Under pytest that stream is the output
    capture of the test that imported it: closing it broke the output capture of every later test.
    """
    import sys

    from absl import logging as absl_logging
    from rouge_score import rouge_scorer

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return rouge_scorer


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 of ``hypotheses`` against ``references`` (rouge-score)."""
    rouge_scorer = _rouge_scorer_module()
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (>0), got {len(hypotheses)} "
                         f"and {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / len(references) for name, total in totals.items()}


@dataclass
class Decoded:
    """Hypotheses of one decoding pass (in test-set order) and its speed.

    Attributes:
        hypotheses: the best hypothesis of each example, as text.
        tokens: generated target tokens in all (end-of-sentence included).
        seconds: wall time of generation.
        peak_memory_mib: CUDA allocator peak during decoding (None on CPU).
    """

    hypotheses: list[str]
    tokens: int
    seconds: float
    peak_memory_mib: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def load(checkpoint: Path, data_bin: Path, device: str) -> tuple[list[Any], Any, Any]:
    """The trained models, their config and fairseq task (eval mode, on ``device``)."""
    from fairseq import checkpoint_utils

    import tasks.backends.fairseq_plugin  # noqa: F401  (registers zoo_transformer, applies compat)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin)})
    for model in models:
        model.to(device).eval()
    return models, cfg, task


def generate(
    models: list[Any], cfg: Any, task: Any, *, split: str = "test", beam: int, min_len: int,
    max_len: int, batch_size: int, max_examples: int = 0,
) -> Decoded:
    """Decode ``split`` with fairseq's ``SequenceGenerator``: ``beam`` 1 is greedy search;
    every hypothesis has between ``min_len`` and ``max_len`` tokens (end-of-sentence excluded:
    fairseq's ``--min-len`` / ``--max-len-a 0 --max-len-b``). ``max_examples`` > 0 keeps the
    first examples of the split."""
    from fairseq import utils

    device = next(models[0].parameters()).device
    cfg.generation.beam = beam
    cfg.generation.min_len = min_len
    cfg.generation.max_len_a = 0
    cfg.generation.max_len_b = max_len
    generator = task.build_generator(models, cfg.generation)
    task.load_dataset(split)
    dataset = task.dataset(split)
    indices = list(range(len(dataset)))[: max_examples or None]
    hypotheses: dict[int, str] = {}
    tokens = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            sample = dataset.collater([dataset[i] for i in indices[start : start + batch_size]])
            sample = utils.apply_to_sample(lambda tensor: tensor.to(device), sample)
            outputs = task.inference_step(generator, models, sample)
            for example_id, hypotheses_of_example in zip(sample["id"].tolist(), outputs):
                best = hypotheses_of_example[0]["tokens"]  # [T] ids, ending with </s>
                tokens += best.numel()
                hypotheses[example_id] = task.target_dictionary.string(best.cpu())
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Decoded([hypotheses[i] for i in indices], tokens, seconds, peak)

