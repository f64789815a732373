"""``zoo_transformer_lm``: fairseq's ``transformer_lm`` whose self-attention is any zoo member.

Everything but the attention core is fairseq's own model: embeddings, positions, layers, norms,
output projection, and so training, checkpointing, fp16/bf16 and distributed training. Two
options choose the attention::

    fairseq-train DATA --user-dir tasks/backends/fairseq_plugin --task language_modeling \\
        --arch zoo_transformer_lm_gpt --attention lavo --attention-args r=64,w=16 ...

The name and the hyperparameters are checked by the zoo's registry before the model is built, so
a typo fails at once with the valid choices (``unknown attention 'lavoo'; known: ...``).

Architectures: ``zoo_transformer_lm`` (fairseq's ``transformer_lm`` defaults, registered with
the model),
``zoo_transformer_lm_gpt`` (GPT-style, 12 x 768, 12 heads, GELU: fairseq's ``transformer_lm_gpt``,
which CAB's causal LM experiments use) and ``zoo_transformer_lm_tiny`` (the CPU smoke size).
"""

# No ``from __future__ import annotations`` here: fairseq builds its argument parser from the
# config dataclass's field types and needs them as real types, not strings.
from dataclasses import dataclass, field
from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_gpt,
)
from fairseq.utils import safe_getattr

from attention_zoo import Pattern
from tasks.backends.fairseq_plugin.attention import ZooAttention, checked_attention


@dataclass
class ZooTransformerLanguageModelConfig(TransformerLanguageModelConfig):
    attention: str = field(
        default="softmax",
        metadata={"help": "zoo attention for the decoder self-attention (see `attnbench zoo`)"},
    )
    attention_args: str = field(
        default="",
        metadata={"help": "its hyperparameters as key=value,... (e.g. r=64,w=16)"},
    )


def attention_choice(args: Any) -> tuple[str, dict[str, Any]]:
    """The checked (name, typed hyperparameters) of ``--attention`` / ``--attention-args``.

    Raises:
        AttentionConfigError: see :func:`~tasks.backends.fairseq_plugin.attention.checked_attention`.
    """
    return checked_attention(
        safe_getattr(args, "attention", "softmax"), safe_getattr(args, "attention_args", ""),
        Pattern.CAUSAL_SELF, role="a language model", dropout=safe_getattr(args, "attention_dropout", 0.0),
    )


@register_model("zoo_transformer_lm", dataclass=ZooTransformerLanguageModelConfig)
class ZooTransformerLanguageModel(TransformerLanguageModel):
    """fairseq's transformer LM with every decoder self-attention replaced by a zoo mechanism."""

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "ZooTransformerLanguageModel":
        name, hyperparameters = attention_choice(args)
        model = super().build_model(args, task)
        for layer in model.decoder.layers:
            # fairseq builds its own MultiheadAttention in each layer; swap in the zoo's, with
            # the same width and heads and fairseq's initialisation.
            layer.self_attn = ZooAttention(
                args.decoder_embed_dim, args.decoder_attention_heads, name, hyperparameters,
                pattern=Pattern.CAUSAL_SELF,
            )
        return model


@register_model_architecture("zoo_transformer_lm", "zoo_transformer_lm_gpt")
def zoo_transformer_lm_gpt(args: Any) -> None:
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    transformer_lm_gpt(args)


@register_model_architecture("zoo_transformer_lm", "zoo_transformer_lm_tiny")
def zoo_transformer_lm_tiny(args: Any) -> None:
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 128)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.dropout = safe_getattr(args, "dropout", 0.0)
    args.activation_fn = safe_getattr(args, "activation_fn", "gelu")
    args.share_decoder_input_output_embed = safe_getattr(
        args, "share_decoder_input_output_embed", True
    )
    base_lm_architecture(args)
