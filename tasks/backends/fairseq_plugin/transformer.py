"""``zoo_transformer``: fairseq's encoder-decoder ``transformer`` whose three attentions are zoo
members, each chosen independently.

Everything but the attention cores is fairseq's own model (embeddings, positions, layers, norms,
output projection), so the ``translation`` task's training, checkpointing and generation
(``SequenceGenerator``: greedy and beam search with length limits) work unchanged. Six options
choose the attention::

    fairseq-train DATA --user-dir tasks/backends/fairseq_plugin --task translation \\
        --arch zoo_transformer_tiny \\
        --encoder-attention lavo --encoder-attention-args r=64,w=16 \\
        --decoder-attention lavo --decoder-attention-args r=64,w=16 \\
        --cross-attention lavo --cross-attention-args r=64 ...

Slots and their patterns: encoder self-attention ``noncausal_self``, decoder self-attention
``causal_self`` (decoded token by token through ``incremental_state``; a mechanism without
incremental decoding recomputes its causal pass over the tokens so far at each step), decoder
encoder-attention ``causal_cross`` (CAB's pattern for a decoder's cross attention: every query
sees the whole source, and the query decoded at each step is fed alone against it).
Each name and its hyperparameters are checked by the zoo's registry before the model is built,
and a mechanism without the slot's pattern is refused with the list of those that have it.

Architectures: ``zoo_transformer`` (fairseq's ``transformer`` defaults: 6 + 6 layers x 512)
and ``zoo_transformer_tiny`` (the CPU smoke size: 2 + 2 layers x 64, 4 heads).
"""

from typing import Any

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.utils import safe_getattr

from attention_zoo import Pattern
from tasks.backends.fairseq_plugin.attention import ZooAttention, checked_attention

SLOTS = {
    "encoder": (Pattern.NONCAUSAL_SELF, "the encoder's self-attention"),
    "decoder": (Pattern.CAUSAL_SELF, "the decoder's self-attention"),
    "cross": (Pattern.CAUSAL_CROSS, "the decoder's cross attention"),
}
"""Option prefix -> (pattern, what it is): ``--{prefix}-attention`` and ``--{prefix}-attention-args``."""


def attention_choices(args: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """The checked (name, typed hyperparameters) of each slot, keyed ``encoder``/``decoder``/``cross``.

    Raises:
        AttentionConfigError: an unknown mechanism, a bad hyperparameter, a mechanism lacking
            its slot's pattern, or a nonzero ``--attention-dropout``.
    """
    dropout = safe_getattr(args, "attention_dropout", 0.0)
    return {
        slot: checked_attention(
            safe_getattr(args, f"{slot}_attention", "softmax") or "softmax",
            safe_getattr(args, f"{slot}_attention_args", ""),
            pattern, role=role, dropout=dropout,
        )
        for slot, (pattern, role) in SLOTS.items()
    }


@register_model("zoo_transformer")
class ZooTransformerModel(TransformerModel):
    """fairseq's transformer with its encoder self-, decoder self- and cross attention replaced
    by zoo mechanisms (fairseq's widths, heads and initialisation)."""

    @classmethod
    def add_args(cls, parser: Any) -> None:
        super().add_args(parser)
        for slot, (pattern, role) in SLOTS.items():
            parser.add_argument(
                f"--{slot}-attention", type=str, metavar="NAME",
                help=f"zoo attention for {role} ({pattern.value}; see `attnbench zoo`)",
            )
            parser.add_argument(
                f"--{slot}-attention-args", type=str, metavar="K=V,...",
                help="its hyperparameters as key=value,... (e.g. r=64,w=16)",
            )

    @classmethod
    def build_model(cls, args: Any, task: Any) -> "ZooTransformerModel":
        choices = attention_choices(args)  # before anything is built: a bad choice fails at once
        model = super().build_model(args, task)
        encoder_dim, decoder_dim = args.encoder_embed_dim, args.decoder_embed_dim
        for layer in model.encoder.layers:
            layer.self_attn = ZooAttention(
                encoder_dim, args.encoder_attention_heads, *choices["encoder"],
                pattern=Pattern.NONCAUSAL_SELF,
            )
        for layer in model.decoder.layers:
            layer.self_attn = ZooAttention(
                decoder_dim, args.decoder_attention_heads, *choices["decoder"],
                pattern=Pattern.CAUSAL_SELF, recompute_decoding=True,
            )
            if layer.encoder_attn is not None:
                layer.encoder_attn = ZooAttention(
                    decoder_dim, args.decoder_attention_heads, *choices["cross"],
                    pattern=Pattern.CAUSAL_CROSS, kdim=encoder_dim, vdim=encoder_dim,
                )
        return model


def _zoo_defaults(args: Any) -> None:
    for slot in SLOTS:
        setattr(args, f"{slot}_attention", safe_getattr(args, f"{slot}_attention", None) or "softmax")
        setattr(args, f"{slot}_attention_args", safe_getattr(args, f"{slot}_attention_args", None) or "")
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)


@register_model_architecture("zoo_transformer", "zoo_transformer")
def zoo_transformer(args: Any) -> None:
    _zoo_defaults(args)
    base_architecture(args)


@register_model_architecture("zoo_transformer", "zoo_transformer_tiny")
def zoo_transformer_tiny(args: Any) -> None:
    _zoo_defaults(args)
    for side in ("encoder", "decoder"):
        setattr(args, f"{side}_embed_dim", safe_getattr(args, f"{side}_embed_dim", 64))
        setattr(args, f"{side}_ffn_embed_dim", safe_getattr(args, f"{side}_ffn_embed_dim", 128))
        setattr(args, f"{side}_layers", safe_getattr(args, f"{side}_layers", 2))
        setattr(args, f"{side}_attention_heads", safe_getattr(args, f"{side}_attention_heads", 4))
    args.dropout = safe_getattr(args, "dropout", 0.0)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", True)
    base_architecture(args)
