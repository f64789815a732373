"""Metrics of a trained LM: fairseq-eval-lm perplexity, bits per byte, length extrapolation,
and unbounded-context streaming through fairseq's ``incremental_state``.

Perplexity is fairseq-eval-lm's own (its ``main``, in process): the test split is cut into
blocks of ``tokens_per_sample`` tokens, each block scored independently from its start, every
token a target exactly once; perplexity = 2^(mean base-2 NLL) = exp(mean NLL in nats).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tasks.backends.fairseq_plugin import USER_DIR, ZooAttention, state_bytes


def eval_lm(
    data_bin: Path,
    checkpoint: Path,
    *,
    tokens_per_sample: int,
    device: str,
    batch_size: int,
    split: str = "test",
    fp16: bool = False,
) -> dict[str, float]:
    """fairseq-eval-lm on ``split`` with blocks of ``tokens_per_sample`` tokens.

    The model's ``max_target_positions`` is raised to the block length so that a model trained
    at L can be evaluated at 2L, 4L, 8L (its sinusoidal positions extend; zoo attention has no
    length limit).

    Returns:
        ``{"loss_base2": mean NLL in bits per token, "perplexity": 2 ** loss_base2}``.
    """
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from tasks.backends.fairseq_plugin.compat import import_fairseq_cli

    fairseq_eval_lm = import_fairseq_cli("eval_lm")

    argv = [
        str(data_bin), "--path", str(checkpoint), "--user-dir", USER_DIR,
        "--task", "language_modeling", "--gen-subset", split,
        "--tokens-per-sample", str(tokens_per_sample), "--sample-break-mode", "none",
        "--batch-size", str(batch_size), "--max-tokens", str(batch_size * tokens_per_sample),
        "--model-overrides", repr({"max_target_positions": tokens_per_sample}),
        "--no-progress-bar", "--log-format", "simple", "--num-workers", "0",
    ]
    if not device.startswith("cuda"):
        argv.append("--cpu")
    elif device != "cuda":
        argv += ["--device-id", device.partition(":")[2]]
    if fp16:
        argv.append("--fp16")
    parser = options.get_eval_lm_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    results = fairseq_eval_lm.main(convert_namespace_to_omegaconf(args))
    loss = float(results["loss"])
    return {"loss_base2": loss, "perplexity": float(results["perplexity"])}


def bits_per_byte(loss_base2: float, tokens: int, text_bytes: int) -> float:
    """Tokeniser-independent cost: total bits of the split over its UTF-8 bytes."""
    return loss_base2 * tokens / text_bytes


def split_tokens(data_bin: Path, split: str = "test") -> tuple[Tensor, int]:
    """The binarised ``split`` as one stream [N] (books in order, end-of-line symbols kept),
    and the end-of-sentence index."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(Path(data_bin) / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(Path(data_bin) / split), dictionary)
    if dataset is None:
        raise FileNotFoundError(f"no binarised {split!r} split in {data_bin}")
    return torch.cat([dataset[i] for i in range(len(dataset))]).long(), dictionary.eos()


@dataclass
class StreamResult:
    """Token-by-token evaluation of one long stream.

    Attributes:
        tokens: tokens scored.
        buckets: one row per position range: ``start``, ``end``, ``perplexity``, and
            ``state_bytes`` (bytes of every layer's decoding state after the range's last token).
        tokens_per_second: scoring speed.
        peak_memory_mib: CUDA allocator peak during the stream (None on CPU).
    """

    tokens: int
    buckets: list[dict[str, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    peak_memory_mib: float | None = None


def bucket_edges(context: int, tokens: int) -> list[int]:
    """Position ranges [0, L), [L, 2L), [2L, 4L), ... cut at ``tokens``."""
    edges = [0, min(context, tokens)]
    while edges[-1] < tokens:
        edges.append(min(edges[-1] * 2, tokens))
    return edges


@torch.inference_mode()
def stream(model: Any, tokens: Tensor, *, bos: int, context: int) -> StreamResult:
    """Score ``tokens`` [N] one at a time with fairseq's incremental decoding, from one state.

    Memory is what the mechanism's decoding state needs (constant for LAVO, a growing key/value
    cache for softmax): the model sees one new token per call; the prefix it is given is a
    zero-copy view whose only use is to tell fairseq the position.

    Args:
        model: a fairseq language model whose attention declares decoding.
        tokens: [N] the stream; the first token is predicted from ``bos`` (as in eval-lm).
        bos: the symbol that starts the stream (fairseq's end-of-sentence).
        context: the training context L, for the position buckets.
    """
    device = next(model.parameters()).device
    attentions = [m for m in model.modules() if isinstance(m, ZooAttention)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    edges = bucket_edges(context, len(tokens))
    incremental_state: dict[str, dict[str, Any]] = {}
    nll = torch.zeros(len(tokens), dtype=torch.float64)
    targets = tokens.to(device)
    previous = torch.tensor([[bos]], device=device)  # [1, 1]
    result = StreamResult(tokens=len(tokens))
    started = time.perf_counter()
    bucket = 1
    for t in range(len(tokens)):
        prefix = previous.expand(1, t + 1)  # [1, t+1] view: the decoder reads the last id only
        logits, _ = model.decoder(prefix, incremental_state=incremental_state)  # [1, 1, V]
        log_probs = torch.log_softmax(logits[0, -1].float(), dim=-1)
        nll[t] = -log_probs[targets[t]].item()
        previous = targets[t].view(1, 1)
        if t + 1 == edges[bucket]:
            start, end = edges[bucket - 1], edges[bucket]
            result.buckets.append({
                "start": start, "end": end,
                "perplexity": math.exp(nll[start:end].mean().item()),
                "state_bytes": sum(state_bytes(a.decoding_state(incremental_state))
                                   for a in attentions),
            })
            bucket += 1
    elapsed = time.perf_counter() - started
    result.tokens_per_second = len(tokens) / elapsed if elapsed > 0 else 0.0
    if device.type == "cuda":
        result.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def extrapolation_multiples(text: str) -> list[int | float]:
    """``"1.5,2,4"`` -> [1, 1.5, 2, 4] (L itself is always evaluated); bad text raises.

    Whole multiples come back as ints (``2``, not ``2.0``)."""
    message = f"extrapolation must be positive numbers like '1,1.5,2,4,8', got {text!r}"
    try:
        values = {float(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(message) from None
    if any(not value > 0 or value == float("inf") for value in values):
        raise ValueError(message)
    return sorted({1} | {int(v) if v.is_integer() else v for v in values})


def evaluation_length(multiple: int | float, seq_len: int) -> int:
    """The evaluation context ``multiple`` x L in tokens; it must be a whole number."""
    length = multiple * seq_len
    if not float(length).is_integer():
        raise ValueError(f"extrapolation multiple {multiple} x seq_len {seq_len} = {length} is not "
                         "a whole number of tokens; choose another multiple or seq_len")
    return int(length)


def extrapolation_table(rows: Mapping[str, list[dict[str, float]]], context: int) -> str:
    """Markdown: one row per attention, test perplexity (bits per byte) at each eval context."""
    multiples = sorted({r["multiple"] for runs in rows.values() for r in runs})
    header = ["attention", *(f"{m}L = {evaluation_length(m, context)}" if m != 1 else f"L = {context}"
                             for m in multiples)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, runs in rows.items():
        by_multiple = {r["multiple"]: r for r in runs}
        cells = ["-" if m not in by_multiple else "OOM" if "error" in by_multiple[m] else
                 f"{by_multiple[m]['perplexity']:.2f} ({by_multiple[m]['bits_per_byte']:.3f})"
                 for m in multiples]
        lines.append("| " + " | ".join([f"`{label}`", *cells]) + " |")
    return "Test perplexity (bits per byte), trained at L:\n\n" + "\n".join(lines) + "\n"


def streaming_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per attention, streaming perplexity per position range, and the
    decoding state's size at the end of the stream."""
    ranges = []
    for run in rows.values():
        for bucket in run.get("buckets", []):
            if (bucket["start"], bucket["end"]) not in ranges:
                ranges.append((bucket["start"], bucket["end"]))
    ranges.sort()
    header = ["attention", *(f"{a}-{b}" for a, b in ranges), "state KiB (first / last)",
              "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, run in rows.items():
        if run.get("skipped"):
            lines.append("| " + " | ".join([f"`{label}`", *(["-"] * len(ranges)),
                                            run["skipped"], "-"]) + " |")
            continue
        buckets = {(b["start"], b["end"]): b for b in run["buckets"]}
        cells = [f"{buckets[r]['perplexity']:.2f}" if r in buckets else "-" for r in ranges]
        states = [b["state_bytes"] / 1024 for b in run["buckets"]]
        lines.append("| " + " | ".join([
            f"`{label}`", *cells, f"{states[0]:.1f} / {states[-1]:.1f}",
            f"{run['tokens_per_second']:.0f}"]) + " |")
    return ("Streaming (token by token through incremental_state): test perplexity by "
            "position range\n\n" + "\n".join(lines) + "\n")
