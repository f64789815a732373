"""Causal language modeling on PG-19 with fairseq's ``transformer_lm`` and any zoo attention.

One run: prepare the data (cached), train with ``fairseq-train`` in a child process, then
evaluate in process with ``fairseq-eval-lm`` at the training context L and at its multiples
(length extrapolation), and, for mechanisms that decode token by token, stream the test split
through fairseq's ``incremental_state`` (unbounded context: perplexity against position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attention_zoo import Pattern, attention_spec
from tasks.backends.fairseq_training import FairseqTask, training_metrics
from tasks.backends.fairseq_training import attention_shapes as fairseq_shapes
from tasks.base import Metric, RunContext
from tasks.registry import register_task


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
    steps: int = field(default=300, metadata={"help": "training updates", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "peak Adam learning rate", "min": 0})
    warmup_steps: int = field(default=30, metadata={"help": "inverse-sqrt warm-up", "min": 0})
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


@register_task
class LanguageModelingTask(FairseqTask):
    """Causal LM on PG-19: token perplexity, bits per byte, training speed and memory, length
    extrapolation (L..8L) and unbounded-context streaming.

    Besides the declared metrics, the metrics carry ``train_loss_first``, ``train_loss_last``
    and ``valid_loss``: fairseq's logged losses, in bits per token. ``extra`` holds the training
    curve, the extrapolation rows, the streaming buckets and both tables in Markdown (also
    written to the workdir).
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
    datasets = {"pg19": "tasks.lm.data:fetch_pg19"}

    @classmethod
    def attention_shapes(cls, config: LMConfig) -> dict[str, tuple[int, int]]:
        shapes = fairseq_shapes(config.arch, config.fairseq_args, ["decoder"], f"task {cls.name}")
        return {"self": shapes["decoder"]}

    def prepare(self, config: LMConfig, run: RunContext) -> Any:
        from tasks.lm import data as lm_data
        from tasks.lm.metrics import evaluation_length, extrapolation_multiples

        for multiple in extrapolation_multiples(config.extrapolation):
            evaluation_length(multiple, config.seq_len)  # a bad multiple fails now, not after training

        data_dir = Path(config.data).expanduser() if config.data else lm_data.SAMPLE_DIR
        prepared = lm_data.prepare(data_dir, tokenizer=config.tokenizer,
                                   vocab_size=config.vocab_size, cache=lm_data.cache_root())
        run.extra["data"] = {"folder": str(data_dir), "tokenizer": str(prepared.tokenizer),
                             "vocab_size": prepared.vocab_size, "tokens": prepared.tokens,
                             "bytes": prepared.bytes}
        return prepared

    def train_arguments(self, config: LMConfig, data: Any, run: RunContext) -> list[str]:
        from tasks.lm.model import train_arguments

        return train_arguments(config, data.data_bin, run.attention["self"])

    def load_trained(self, checkpoint: Path, config: LMConfig, data: Any, run: RunContext) -> nn.Module:
        from tasks.lm.model import load_model

        # Positions up to the stream's length are tabulated once (fairseq's sinusoidal table
        # would otherwise be rebuilt at every step past its size).
        return load_model(checkpoint, data.data_bin, run.device,
                          max_positions=max(config.seq_len, config.stream_tokens))

    def evaluate(self, model: nn.Module, config: LMConfig, data: Any, run: RunContext) -> dict[str, float]:
        from tasks.lm import metrics

        checkpoint = Path(run.extra["checkpoint"])
        extrapolation = [self._extrapolate(config, data, checkpoint, multiple, run.device)
                         for multiple in metrics.extrapolation_multiples(config.extrapolation)]
        streaming = self._stream(config, data, model, run)
        label = run.attention["self"].label()
        tables = {"extrapolation": metrics.extrapolation_table({label: extrapolation}, config.seq_len),
                  "streaming": metrics.streaming_table({label: streaming})}
        for name, table in tables.items():
            (run.workdir / f"{name}.md").write_text(table)
        run.extra.update(
            extrapolation=extrapolation, streaming=streaming, tables=tables,
            # the report's form (analysis POSITION_KEY)
            perplexity_by_position=[{"position": bucket["end"], "perplexity": bucket["perplexity"]}
                                    for bucket in streaming.get("buckets", [])])
        train_summary = run.extra["training_log"]["train"]
        return {"perplexity": extrapolation[0]["perplexity"],
                "bits_per_byte": extrapolation[0]["bits_per_byte"],
                "train_tokens_per_second": (train_summary[-1].get("train_wps", float("nan"))
                                            if train_summary else float("nan")),
                **training_metrics(run)}

    @staticmethod
    def _extrapolate(config: LMConfig, data: Any, checkpoint: Path, multiple: int | float,
                     device: str) -> dict[str, Any]:
        """fairseq-eval-lm at ``multiple`` x L: perplexity and bits per byte (or the OOM)."""
        from tasks.lm import metrics

        length = metrics.evaluation_length(multiple, config.seq_len)
        # "length" is the key the report reads (results/README.md, analysis EXTRAPOLATION_KEY).
        row: dict[str, Any] = {"multiple": multiple, "context": length, "length": length}
        try:
            scores = metrics.eval_lm(data.data_bin, checkpoint, tokens_per_sample=length, device=device,
                                     batch_size=max(1, int(config.eval_batch_size // multiple)),
                                     fp16=config.precision == "fp16")
        except (torch.OutOfMemoryError, MemoryError) as error:
            if multiple == 1:
                raise
            # A quadratic mechanism may not fit at 8L: the table says so and the run goes on.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {**row, "perplexity": float("nan"), "bits_per_byte": float("nan"),
                    "error": f"out of memory: {error}"[:200]}
        return {**row, "perplexity": scores["perplexity"],
                "bits_per_byte": metrics.bits_per_byte(scores["loss_base2"], data.tokens["test"],
                                                       data.bytes["test"])}

    @staticmethod
    def _stream(config: LMConfig, data: Any, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """Token-by-token evaluation of the test split's first ``stream_tokens`` tokens."""
        from tasks.lm import metrics

        name = run.attention["self"].name
        if not config.stream_tokens:
            return {"skipped": "stream_tokens=0"}
        if not attention_spec(name).decoding:
            return {"skipped": f"{name} does not declare incremental decoding"}
        tokens, eos = metrics.split_tokens(data.data_bin, "test")
        result = metrics.stream(model, tokens[: config.stream_tokens], bos=eos, context=config.seq_len)
        streaming: dict[str, Any] = {
            "skipped": None, "tokens": result.tokens, "buckets": result.buckets,
            "tokens_per_second": result.tokens_per_second, "peak_memory_mib": result.peak_memory_mib,
        }
        if len(tokens) < config.stream_tokens:
            streaming["note"] = (f"the test split has {len(tokens)} tokens, fewer than "
                                 f"stream_tokens={config.stream_tokens}")
        return streaming
