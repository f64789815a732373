"""Long-document summarization on fairseq's encoder-decoder transformer with zoo attention in
its three slots: encoder self (``noncausal_self``), decoder self (``causal_self``) and decoder
cross attention (``causal_cross``, CAB's pattern for it), each any zoo member with that pattern.

One run: prepare the data (cached), train ``zoo_transformer`` with ``fairseq-train`` (the
``translation`` task, label-smoothed cross entropy) in a child process, then decode the test
split in process with fairseq's ``SequenceGenerator``, greedy and beam search with length limits,
and score both with ROUGE (Google's ``rouge-score``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from attention_zoo import Pattern
from tasks.backends.fairseq_training import FairseqTask, training_metrics
from tasks.backends.fairseq_training import attention_shapes as fairseq_shapes
from tasks.base import Metric, RunContext
from tasks.registry import register_task


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
    steps: int = field(default=120, metadata={"help": "training updates", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "peak Adam learning rate", "min": 0})
    warmup_steps: int = field(default=20, metadata={"help": "inverse-sqrt warm-up", "min": 0})
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
        "help": "CPU threads of training and decoding (0: the runner's share of the cores)",
        "min": 0})


@register_task
class SummarizationTask(FairseqTask):
    """Summarization (Multi-News, or Wikipedia-lead generation on the shipped sample):
    ROUGE-1/2/L of beam search, decode speed, source length and peak memory.

    The metrics also carry the greedy pass (``greedy_rouge1``...), both decode speeds, the mean
    source length and fairseq's training losses. ``extra`` holds the training curve, sample
    hypotheses and which ROUGE package produced the numbers.
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
    requires = (*FairseqTask.requires, "rouge_score")
    datasets = {"multi_news": "tasks.summarization.data:fetch_multi_news"}

    @classmethod
    def attention_shapes(cls, config: SummarizationConfig) -> dict[str, tuple[int, int]]:
        shapes = fairseq_shapes(config.arch, config.fairseq_args, ["encoder", "decoder"], f"task {cls.name}")
        return {"encoder_self": shapes["encoder"], "decoder_self": shapes["decoder"],
                "cross": shapes["decoder"]}

    def prepare(self, config: SummarizationConfig, run: RunContext) -> Any:
        from tasks.summarization import data as sum_data

        data_dir = Path(config.data).expanduser() if config.data else sum_data.SAMPLE_DIR
        prepared = sum_data.prepare(
            data_dir, vocab_size=config.vocab_size, max_source_tokens=config.max_source_tokens,
            max_target_tokens=config.max_target_tokens, cache=sum_data.cache_root())
        run.extra["data"] = {"folder": str(data_dir), "data_bin": str(prepared.data_bin),
                             "source_tokens": prepared.source_tokens}
        return prepared

    def train_arguments(self, config: SummarizationConfig, data: Any, run: RunContext) -> list[str]:
        from tasks.summarization.model import train_arguments

        return train_arguments(config, data.data_bin, run.attention)

    def load_trained(self, checkpoint: Path, config: SummarizationConfig, data: Any,
                     run: RunContext) -> nn.Module:
        from tasks.summarization import metrics

        self._loaded = metrics.load(checkpoint, data.data_bin, run.device)
        return self._loaded[0][0]

    def evaluate(self, model: nn.Module, config: SummarizationConfig, data: Any,
                 run: RunContext) -> dict[str, float]:
        """Greedy and beam-search decoding of the test split, each scored with ROUGE."""
        passes = {label: self._decode(config, data, run, beam) for label, beam in
                  (("greedy", 1), ("beam", config.beam))}
        references = data.references.read_text(encoding="utf-8").splitlines()
        run.extra["samples"] = [{"reference": r, "beam": b, "greedy": g} for r, b, g in zip(
            references, passes["beam"]["hypotheses"][:3], passes["greedy"]["hypotheses"][:3])]
        run.extra["decode"] = {label: {k: v for k, v in result.items() if k != "hypotheses"}
                               for label, result in passes.items()}
        beam, greedy = passes["beam"], passes["greedy"]
        return {"rouge1": beam["rouge1"], "rouge2": beam["rouge2"], "rougeL": beam["rougeL"],
                "decode_tokens_per_second": beam["tokens_per_second"],
                "greedy_rouge1": greedy["rouge1"], "greedy_rouge2": greedy["rouge2"],
                "greedy_rougeL": greedy["rougeL"],
                "greedy_decode_tokens_per_second": greedy["tokens_per_second"],
                "source_tokens": data.source_tokens["truncated"],
                "source_tokens_full": data.source_tokens["full"], **training_metrics(run)}

    def _decode(self, config: SummarizationConfig, data: Any, run: RunContext, beam: int) -> dict[str, Any]:
        """One decoding pass (beam 1: greedy), scored; its hypotheses written to the workdir."""
        from tasks.summarization import metrics

        models, cfg, fairseq_task = self._loaded
        decoded = metrics.generate(models, cfg, fairseq_task, beam=beam, min_len=config.min_len,
                                   max_len=config.max_len, batch_size=config.decode_batch_size,
                                   max_examples=config.eval_examples)
        references = data.references.read_text(encoding="utf-8").splitlines()
        scores = metrics.rouge(decoded.hypotheses, references[: len(decoded.hypotheses)])
        label = "greedy" if beam == 1 else "beam"
        (run.workdir / f"hypotheses.{label}.txt").write_text(
            "".join(h + "\n" for h in decoded.hypotheses), encoding="utf-8")
        run.extra["rouge_package"] = metrics.ROUGE_PACKAGE
        return {"beam": beam, **scores, "tokens_per_second": decoded.tokens_per_second,
                "seconds": decoded.seconds, "peak_memory_mib": decoded.peak_memory_mib,
                "hypotheses": decoded.hypotheses}
