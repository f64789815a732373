"""Long-document summarization on fairseq's encoder-decoder transformer with zoo attention in
its three slots: encoder self (``noncausal_self``), decoder self (``causal_self``) and decoder
cross attention (``causal_cross``, CAB's pattern for it), each any zoo member with that pattern.

One run: prepare the data (cached), train ``zoo_transformer`` with ``fairseq-train`` (the
``translation`` task, label-smoothed cross entropy) in a child process, then decode the test
split in process with fairseq's ``SequenceGenerator``, greedy and beam search with length limits,
and score both with ROUGE (Google's ``rouge-score``).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from attention_zoo import Pattern
from tasks.base import AttentionChoice, Metric, Task, TaskResult, resolve_attention, torch_threads
from tasks.fairseq_plugin.training import attention_args_text, run_fairseq_train
from tasks.fairseq_plugin.training import attention_shapes as fairseq_shapes
from tasks.summarization import data as sum_data

ROLE_OPTIONS = {"encoder_self": "encoder", "decoder_self": "decoder", "cross": "cross"}
"""Task role -> the ``zoo_transformer`` option prefix (``--{prefix}-attention``)."""


@dataclass(frozen=True)
class SummarizationConfig:
    """Settings of the summarization task; the defaults are the CPU smoke size on the shipped
    Wikipedia-lead sample. The paper preset (``tasks/summarization/presets/paper.yaml``) is
    CAB's Multi-News setting (beam search, 200 to 400 target tokens)."""

    data: str = field(default="", metadata={
        "help": "folder with {train,valid,test}.src/.tgt or .jsonl (empty: the shipped sample; "
                "`attnbench data fetch multi_news`)"})
    vocab_size: int = field(default=6000, metadata={
        "help": "joined source/target word dictionary (most frequent training words)", "min": 8})
    max_source_tokens: int = field(default=256, metadata={
        "help": "source truncation (tokens)", "min": 1})
    max_target_tokens: int = field(default=64, metadata={
        "help": "training target truncation (tokens; references are scored in full)", "min": 1})
    arch: str = field(default="zoo_transformer_tiny", metadata={
        "help": "fairseq architecture: zoo_transformer[_tiny]"})
    batch_size: int = field(default=8, metadata={"help": "pairs per batch", "min": 1})
    update_freq: int = field(default=1, metadata={"help": "batches per update", "min": 1})
    max_update: int = field(default=120, metadata={"help": "training updates", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "peak Adam learning rate", "min": 0})
    warmup_updates: int = field(default=20, metadata={"help": "inverse-sqrt warm-up", "min": 0})
    clip_norm: float = field(default=1.0, metadata={"help": "gradient clipping", "min": 0})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing", "min": 0})
    dropout: float = field(default=0.0, metadata={"help": "dropout", "min": 0})
    precision: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={
        "help": "training precision (fp16/bf16 are fairseq's, on GPU)"})
    beam: int = field(default=4, metadata={"help": "beam size of the beam-search pass", "min": 1})
    min_len: int = field(default=10, metadata={"help": "fewest generated tokens", "min": 0})
    max_len: int = field(default=48, metadata={"help": "most generated tokens", "min": 1})
    decode_batch_size: int = field(default=8, metadata={"help": "examples per decoding batch", "min": 1})
    eval_examples: int = field(default=0, metadata={
        "help": "decode only the first N test examples (0: all)", "min": 0})
    fairseq_args: str = field(default="", metadata={
        "help": "extra fairseq-train flags, e.g. '--encoder-layers 4'"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads of training and decoding (0: torch's default)", "min": 0})


def train_arguments(
    config: SummarizationConfig, data_bin: Path, attention: Mapping[str, AttentionChoice], *,
    seed: int, device: str, save_dir: Path,
) -> list[str]:
    """The ``fairseq-train`` arguments of one run (the zoo comes by ``--user-dir``)."""
    from tasks.fairseq_plugin import USER_DIR

    arguments = [
        str(data_bin), "--user-dir", USER_DIR, "--task", "translation",
        "--source-lang", "src", "--target-lang", "tgt", "--arch", config.arch,
    ]
    for role, prefix in ROLE_OPTIONS.items():
        arguments += [f"--{prefix}-attention", attention[role].name,
                      f"--{prefix}-attention-args", attention_args_text(attention[role].args)]
    arguments += [
        "--share-all-embeddings",
        "--max-source-positions", str(config.max_source_tokens + 8),
        "--max-target-positions", str(max(config.max_target_tokens, config.max_len) + 8),
        "--batch-size", str(config.batch_size), "--update-freq", str(config.update_freq),
        "--max-update", str(config.max_update),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(config.label_smoothing),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(config.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(config.warmup_updates),
        "--warmup-init-lr", "1e-07", "--clip-norm", str(config.clip_norm),
        "--dropout", str(config.dropout), "--seed", str(seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", str(max(1, config.max_update // 20)),
        "--no-progress-bar", "--num-workers", "0", "--skip-invalid-size-inputs-valid-test",
    ]
    if not device.startswith("cuda"):
        arguments.append("--cpu")
    if config.precision == "fp16":
        arguments.append("--fp16")
    elif config.precision == "bf16":
        arguments.append("--bf16")
    return arguments + shlex.split(config.fairseq_args)


class SummarizationTask(Task):
    """Summarization (Multi-News, or Wikipedia-lead generation on the shipped sample):
    ROUGE-1/2/L of beam search, decode speed, source length and peak memory.

    ``TaskResult.metrics`` also carries the greedy pass (``greedy_rouge1``...), both decode
    speeds, the mean source length and fairseq's training losses. ``extra`` holds the training
    curve, sample hypotheses and which ROUGE package produced the numbers.
    """

    name = "summarization"
    roles = {
        "encoder_self": Pattern.NONCAUSAL_SELF,
        "decoder_self": Pattern.CAUSAL_SELF,
        "cross": Pattern.CAUSAL_CROSS,
    }
    metrics = (
        Metric("rouge1", higher_is_better=True, description="ROUGE-1 F1 x100 of beam search (rouge-score)"),
        Metric("rouge2", higher_is_better=True, description="ROUGE-2 F1 x100 of beam search (rouge-score)"),
        Metric("rougeL", higher_is_better=True, description="ROUGE-L F1 x100 of beam search (rouge-score)"),
        Metric("decode_tokens_per_second", higher_is_better=True, kind="cost",
               description="generated tokens per second of beam search"),
    )
    Config = SummarizationConfig

    @classmethod
    def attention_shapes(cls, config: SummarizationConfig) -> dict[str, tuple[int, int]]:
        shapes = fairseq_shapes(config.arch, config.fairseq_args, ["encoder", "decoder"], f"task {cls.name}")
        return {"encoder_self": shapes["encoder"], "decoder_self": shapes["decoder"],
                "cross": shapes["decoder"]}

    def run(
        self,
        config: SummarizationConfig,
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
        config: SummarizationConfig,
        attention: Mapping[str, AttentionChoice],
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        from tasks.fairseq_plugin import ZooAttention
        from tasks.summarization import evaluate

        attention = resolve_attention(type(self), attention)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        data_dir = Path(config.data).expanduser() if config.data else sum_data.SAMPLE_DIR
        prepared = sum_data.prepare(
            data_dir, vocab_size=config.vocab_size, max_source_tokens=config.max_source_tokens,
            max_target_tokens=config.max_target_tokens, cache=sum_data.cache_root())

        save_dir = workdir / "checkpoints"
        started = time.perf_counter()
        arguments = train_arguments(config, prepared.data_bin, attention, seed=seed, device=device,
                                    save_dir=save_dir)
        log, memory = run_fairseq_train(arguments, workdir=workdir, device=device,
                                        threads=config.threads)
        train_seconds = time.perf_counter() - started
        checkpoint = save_dir / "checkpoint_last.pt"

        started = time.perf_counter()
        models, cfg, fairseq_task = evaluate.load(checkpoint, prepared.data_bin, device)
        references = prepared.references.read_text(encoding="utf-8").splitlines()
        passes: dict[str, Any] = {}
        for label, beam in (("greedy", 1), ("beam", config.beam)):
            decoded = evaluate.generate(
                models, cfg, fairseq_task, beam=beam, min_len=config.min_len, max_len=config.max_len,
                batch_size=config.decode_batch_size, max_examples=config.eval_examples)
            scores = evaluate.rouge(decoded.hypotheses, references[: len(decoded.hypotheses)])
            passes[label] = {"beam": beam, **scores, "tokens_per_second": decoded.tokens_per_second,
                             "seconds": decoded.seconds, "peak_memory_mib": decoded.peak_memory_mib,
                             "hypotheses": decoded.hypotheses}
        eval_seconds = time.perf_counter() - started
        for label, result in passes.items():
            (workdir / f"hypotheses.{label}.txt").write_text(
                "".join(h + "\n" for h in result["hypotheses"]), encoding="utf-8")

        model = models[0]
        curve = [(r["num_updates"], r["loss"]) for r in log["train_inner"]]
        beam_pass, greedy = passes["beam"], passes["greedy"]
        return TaskResult(
            metrics={
                "rouge1": beam_pass["rouge1"], "rouge2": beam_pass["rouge2"],
                "rougeL": beam_pass["rougeL"],
                "decode_tokens_per_second": beam_pass["tokens_per_second"],
                "greedy_rouge1": greedy["rouge1"], "greedy_rouge2": greedy["rouge2"],
                "greedy_rougeL": greedy["rougeL"],
                "greedy_decode_tokens_per_second": greedy["tokens_per_second"],
                "source_tokens": prepared.source_tokens["truncated"],
                "source_tokens_full": prepared.source_tokens["full"],
                "train_loss_first": curve[0][1] if curve else float("nan"),
                "train_loss_last": curve[-1][1] if curve else float("nan"),
                "valid_loss": log["valid"][-1]["valid_loss"] if log["valid"] else float("nan"),
            },
            parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            attention_parameters=sum(
                p.numel() for module in model.modules() if isinstance(module, ZooAttention)
                for p in module.layer.attention.parameters()),
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            peak_memory_mib=memory.get("cuda_peak_mib") or memory.get("peak_rss_mib"),
            extra={
                "rouge_package": evaluate.ROUGE_PACKAGE,
                "peak_memory_kind": ("cuda allocator peak" if memory.get("cuda_peak_mib")
                                     else "peak resident set size of the training process"),
                "decode": {label: {k: v for k, v in result.items() if k != "hypotheses"}
                           for label, result in passes.items()},
                "samples": [{"reference": r, "beam": b, "greedy": g} for r, b, g in
                            zip(references, beam_pass["hypotheses"][:3], greedy["hypotheses"][:3])],
                "train_curve": curve,
                "data": {"folder": str(data_dir), "data_bin": str(prepared.data_bin),
                         "source_tokens": prepared.source_tokens},
                "checkpoint": str(checkpoint),
            },
        )
