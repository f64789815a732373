"""The summarization model: fairseq's encoder-decoder ``transformer`` with zoo attention in its
three slots (``zoo_transformer``, registered by :mod:`tasks.backends.fairseq_plugin`), as
``fairseq-train`` is told to build it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.backends.fairseq_training import attention_args_text
from tasks.base import AttentionChoice

ROLE_OPTIONS = {"encoder_self": "encoder", "decoder_self": "decoder", "cross": "cross"}
"""Task role -> the ``zoo_transformer`` option prefix (``--{prefix}-attention``)."""


def train_arguments(config: Any, data_bin: Path, attention: Mapping[str, AttentionChoice]) -> list[str]:
    """The task's own ``fairseq-train`` arguments (the shared ones come from
    :func:`tasks.backends.fairseq_training.common_arguments`)."""
    from tasks.backends.fairseq_plugin import USER_DIR

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
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(config.label_smoothing),
        "--skip-invalid-size-inputs-valid-test",
    ]
    return arguments
