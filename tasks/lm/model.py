"""The LM's model: fairseq's ``transformer_lm`` with zoo attention (``zoo_transformer_lm``,
registered by the fairseq plug-in in :mod:`tasks.backends.fairseq_plugin`), as ``fairseq-train``
is told to build it, and loaded back from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.backends.fairseq_training import attention_args_text
from tasks.base import AttentionChoice


def train_arguments(config: Any, data_bin: Path, choice: AttentionChoice) -> list[str]:
    """The LM's own ``fairseq-train`` arguments (the shared ones come from
    :func:`tasks.backends.fairseq_training.common_arguments`)."""
    from tasks.backends.fairseq_plugin import USER_DIR

    arguments = [
        str(data_bin), "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", config.arch, "--attention", choice.name,
        "--attention-args", attention_args_text(choice.args),
        "--tokens-per-sample", str(config.seq_len), "--sample-break-mode", "none",
        "--criterion", "cross_entropy", "--max-valid-steps", "20",
    ]
    if config.positions == "none":
        arguments.append("--no-token-positional-embeddings")
    return arguments


def load_model(
    checkpoint: Path, data_bin: Path, device: str, *, max_positions: int | None = None
) -> Any:
    """A trained model in eval mode, through fairseq's checkpoint loader; ``max_positions``
    raises the model's length limit (for evaluation beyond the training context)."""
    from fairseq import checkpoint_utils

    overrides: dict[str, Any] = {"data": str(data_bin)}
    if max_positions is not None:
        overrides["max_target_positions"] = max_positions
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides=overrides
    )
    return models[0].to(device).eval()
