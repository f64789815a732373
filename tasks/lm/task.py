"""Causal language modeling on PG-19 with fairseq's ``transformer_lm`` and any zoo attention.

One run: prepare the data (cached), train with ``fairseq-train`` in a child process, then
evaluate in process with ``fairseq-eval-lm`` at the training context L and at its multiples
(length extrapolation), and, for mechanisms that decode token by token, stream the test split
through fairseq's ``incremental_state`` (unbounded context: perplexity against position).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from attention_zoo import Pattern, attention_spec
from tasks.base import AttentionChoice, Metric, Task, TaskResult, torch_threads
from tasks.fairseq_plugin.training import attention_args_text, run_fairseq_train
from tasks.fairseq_plugin.training import attention_shapes as fairseq_shapes
from tasks.lm import data as lm_data


@dataclass(frozen=True)
class LMConfig:
    """Settings of the LM task; the defaults are the CPU smoke size on the shipped sample.

    The paper preset (``tasks/lm/presets/paper.yaml``) mirrors CAB's causal LM: PG-19, GPT-2
    BPE, a GPT-style ``transformer_lm`` (12 x 768, 12 heads) at context 8192.
    """

    data: str = field(default="", metadata={
        "help": "PG-19 layout folder (empty: the shipped sample; `attnbench data fetch pg19`)"})
    tokenizer: Literal["bytelevel", "gpt2"] = field(default="bytelevel", metadata={
        "help": "bytelevel: BPE trained on the training split (cached); gpt2: GPT-2's BPE"})
    vocab_size: int = field(default=2048, metadata={
        "help": "size of the trained byte-level BPE", "min": 260})
    arch: str = field(default="zoo_transformer_lm_tiny", metadata={
        "help": "fairseq architecture: zoo_transformer_lm[_tiny|_gpt]"})
    positions: Literal["sinusoidal", "none"] = field(default="sinusoidal", metadata={
        "help": "absolute positions of transformer_lm (sinusoidal extends to any length)"})
    seq_len: int = field(default=128, metadata={"help": "training context L", "min": 2})
    batch_size: int = field(default=8, metadata={"help": "sequences per batch", "min": 1})
    update_freq: int = field(default=1, metadata={"help": "batches per update", "min": 1})
    max_update: int = field(default=300, metadata={"help": "training updates", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "peak Adam learning rate", "min": 0})
    warmup_updates: int = field(default=30, metadata={"help": "inverse-sqrt warm-up", "min": 0})
    clip_norm: float = field(default=1.0, metadata={"help": "gradient clipping", "min": 0})
    dropout: float = field(default=0.0, metadata={"help": "dropout", "min": 0})
    precision: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={
        "help": "training precision (fp16/bf16 are fairseq's, on GPU)"})
    extrapolation: str = field(default="1,1.5,2,4,8", metadata={
        "help": "evaluation contexts as multiples of L (1.5 and 2 are CAB's; 4 and 8 ours)"})
    eval_batch_size: int = field(default=8, metadata={"help": "eval-lm batch", "min": 1})
    stream_tokens: int = field(default=2048, metadata={
        "help": "tokens of the test split streamed token by token (0: skip)", "min": 0})
    fairseq_args: str = field(default="", metadata={
        "help": "extra fairseq-train flags, e.g. '--decoder-layers 4 --checkpoint-activations'"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads of training and evaluation (0: torch's default); the smoke model's "
                "operations are too small to gain from more, and lose much on a shared CPU",
        "min": 0})


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


def train_command(
    config: LMConfig, prepared: lm_data.PreparedData, choice: AttentionChoice, *,
    seed: int, device: str, save_dir: Path,
) -> list[str]:
    """The ``fairseq-train`` arguments of one run (its own CLI; the zoo comes by --user-dir)."""
    from tasks.fairseq_plugin import USER_DIR

    command = [
        str(prepared.data_bin),
        "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", config.arch, "--attention", choice.name,
        "--attention-args", attention_args_text(choice.args),
        "--tokens-per-sample", str(config.seq_len), "--sample-break-mode", "none",
        "--batch-size", str(config.batch_size), "--update-freq", str(config.update_freq),
        "--max-update", str(config.max_update), "--criterion", "cross_entropy",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(config.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(config.warmup_updates),
        "--warmup-init-lr", "1e-07", "--clip-norm", str(config.clip_norm),
        "--dropout", str(config.dropout), "--seed", str(seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", str(max(1, config.max_update // 20)),
        "--no-progress-bar", "--num-workers", "0", "--max-valid-steps", "20",
    ]
    if config.positions == "none":
        command.append("--no-token-positional-embeddings")
    if not device.startswith("cuda"):
        command.append("--cpu")
    if config.precision == "fp16":
        command.append("--fp16")
    elif config.precision == "bf16":
        command.append("--bf16")
    return command + shlex.split(config.fairseq_args)


class LanguageModelingTask(Task):
    """Causal LM on PG-19: token perplexity, bits per byte, training speed and memory, length
    extrapolation (L..8L) and unbounded-context streaming.

    Besides the declared metrics, ``TaskResult.metrics`` carries ``train_loss_first``,
    ``train_loss_last`` and ``valid_loss``: fairseq's logged losses, in bits per token.
    ``extra`` holds the training curve, the extrapolation rows, the streaming buckets and both
    tables in Markdown (also written to ``workdir``).
    """

    name = "lm"
    roles = {"self": Pattern.CAUSAL_SELF}
    metrics = (
        Metric("perplexity", higher_is_better=False,
               description="test token perplexity at the training context (fairseq-eval-lm)"),
        Metric("bits_per_byte", higher_is_better=False,
               description="test bits per UTF-8 byte at the training context"),
        Metric("train_tokens_per_second", higher_is_better=True, kind="cost",
               description="fairseq's training words (tokens) per second"),
    )
    Config = LMConfig

    @classmethod
    def attention_shapes(cls, config: LMConfig) -> dict[str, tuple[int, int]]:
        shapes = fairseq_shapes(config.arch, config.fairseq_args, ["decoder"], f"task {cls.name}")
        return {"self": shapes["decoder"]}

    def run(
        self,
        config: LMConfig,
        attention: Mapping[str, AttentionChoice],
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        with torch_threads(config.threads):
            return self._run(config, attention, seed=seed, device=device, workdir=workdir)

    def _run(
        self,
        config: LMConfig,
        attention: Mapping[str, AttentionChoice],
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        from tasks.fairseq_plugin import ZooAttention
        from tasks.lm import evaluate

        choice = attention["self"]
        multiples = extrapolation_multiples(config.extrapolation)
        for multiple in multiples:  # before training: a bad multiple fails now, not after it
            evaluation_length(multiple, config.seq_len)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        data_dir = Path(config.data).expanduser() if config.data else lm_data.SAMPLE_DIR
        prepared = lm_data.prepare(data_dir, tokenizer=config.tokenizer,
                                   vocab_size=config.vocab_size, cache=lm_data.cache_root())

        save_dir = workdir / "checkpoints"
        started = time.perf_counter()
        log, memory = self._train(config, prepared, choice, seed=seed, device=device,
                                  save_dir=save_dir, workdir=workdir)
        train_seconds = time.perf_counter() - started
        checkpoint = save_dir / "checkpoint_last.pt"

        started = time.perf_counter()
        extrapolation = [self._evaluate(config, prepared, checkpoint, multiple, device)
                         for multiple in multiples]
        # Positions up to the stream's length are tabulated once (fairseq's sinusoidal table
        # would otherwise be rebuilt at every step past its size).
        model = evaluate.load_model(checkpoint, prepared.data_bin, device,
                                    max_positions=max(config.seq_len, config.stream_tokens))
        streaming = self._stream(config, prepared, model, choice)
        eval_seconds = time.perf_counter() - started

        at_context = extrapolation[0]
        train_summary = log["train"][-1] if log["train"] else {}
        curve = [(r["num_updates"], r["loss"]) for r in log["train_inner"]]
        label = choice.label()
        tables = {
            "extrapolation": extrapolation_table({label: extrapolation}, config.seq_len),
            "streaming": streaming_table({label: streaming}),
        }
        for name, table in tables.items():
            (workdir / f"{name}.md").write_text(table)
        attention_parameters = sum(
            p.numel() for module in model.modules() if isinstance(module, ZooAttention)
            for p in module.layer.attention.parameters()
        )
        return TaskResult(
            metrics={
                "perplexity": at_context["perplexity"],
                "bits_per_byte": at_context["bits_per_byte"],
                "train_tokens_per_second": train_summary.get("train_wps", float("nan")),
                "train_loss_first": curve[0][1] if curve else float("nan"),
                "train_loss_last": curve[-1][1] if curve else float("nan"),
                "valid_loss": log["valid"][-1]["valid_loss"] if log["valid"] else float("nan"),
            },
            parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            attention_parameters=attention_parameters,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            peak_memory_mib=memory.get("cuda_peak_mib") or memory.get("peak_rss_mib"),
            extra={
                "train_curve": curve,
                "peak_memory_kind": ("cuda allocator peak" if memory.get("cuda_peak_mib")
                                     else "peak resident set size of the training process"),
                "extrapolation": extrapolation,
                "streaming": streaming,
                "perplexity_by_position": [  # the report's form (analysis POSITION_KEY)
                    {"position": bucket["end"], "perplexity": bucket["perplexity"]}
                    for bucket in streaming.get("buckets", [])
                ],
                "tables": tables,
                "data": {"folder": str(data_dir), "tokenizer": str(prepared.tokenizer),
                         "vocab_size": prepared.vocab_size, "tokens": prepared.tokens,
                         "bytes": prepared.bytes},
                "checkpoint": str(checkpoint),
            },
        )

    @staticmethod
    def _evaluate(
        config: LMConfig, prepared: lm_data.PreparedData, checkpoint: Path, multiple: int | float,
        device: str,
    ) -> dict[str, Any]:
        """fairseq-eval-lm at ``multiple`` x L: perplexity and bits per byte (or the OOM)."""
        from tasks.lm import evaluate

        length = evaluation_length(multiple, config.seq_len)
        # "length" is the key the report reads (results/README.md, analysis EXTRAPOLATION_KEY).
        row: dict[str, Any] = {"multiple": multiple, "context": length, "length": length}
        try:
            scores = evaluate.eval_lm(
                prepared.data_bin, checkpoint, tokens_per_sample=length, device=device,
                batch_size=max(1, int(config.eval_batch_size // multiple)),
                fp16=config.precision == "fp16",
            )
        except (torch.OutOfMemoryError, MemoryError) as error:
            if multiple == 1:
                raise
            # A quadratic mechanism may not fit at 8L: the table says so and the run goes on.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {**row, "perplexity": float("nan"), "bits_per_byte": float("nan"),
                    "error": f"out of memory: {error}"[:200]}
        return {**row, "perplexity": scores["perplexity"],
                "bits_per_byte": evaluate.bits_per_byte(
                    scores["loss_base2"], prepared.tokens["test"], prepared.bytes["test"])}

    @staticmethod
    def _stream(
        config: LMConfig, prepared: lm_data.PreparedData, model: Any, choice: AttentionChoice
    ) -> dict[str, Any]:
        """Token-by-token evaluation of the test split's first ``stream_tokens`` tokens."""
        from tasks.lm import evaluate

        if not config.stream_tokens:
            return {"skipped": "stream_tokens=0"}
        if not attention_spec(choice.name).decoding:
            return {"skipped": f"{choice.name} does not declare incremental decoding"}
        tokens, eos = evaluate.split_tokens(prepared.data_bin, "test")
        result = evaluate.stream(model, tokens[: config.stream_tokens], bos=eos,
                                 context=config.seq_len)
        streaming: dict[str, Any] = {
            "skipped": None, "tokens": result.tokens, "buckets": result.buckets,
            "tokens_per_second": result.tokens_per_second,
            "peak_memory_mib": result.peak_memory_mib,
        }
        if len(tokens) < config.stream_tokens:
            streaming["note"] = (f"the test split has {len(tokens)} tokens, fewer than "
                                 f"stream_tokens={config.stream_tokens}")
        return streaming

    def _train(
        self, config: LMConfig, prepared: lm_data.PreparedData, choice: AttentionChoice, *,
        seed: int, device: str, save_dir: Path, workdir: Path,
    ) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
        """Run fairseq-train in a child process; its parsed log and peak memory."""
        arguments = train_command(config, prepared, choice, seed=seed, device=device,
                                  save_dir=save_dir)
        return run_fairseq_train(arguments, workdir=workdir, device=device, threads=config.threads)


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
