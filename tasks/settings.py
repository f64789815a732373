"""One vocabulary for the settings that mean the same thing in every task.

A task's ``Config`` names such a setting as here (``attnbench run smoke lr=1e-3`` then reaches
every task that has a learning rate), with the type given here; the names in :data:`SYNONYMS`
are refused by the task contract. A task without the thing (a model whose width its architecture
fixes) simply has no such field, and an override of it names the tasks it skipped.
"""

from __future__ import annotations

from typing import Any

VOCABULARY: dict[str, tuple[type, str]] = {
    "data": (str, "data folder (empty: the task's shipped sample)"),
    "lr": (float, "peak learning rate"),
    "steps": (int, "training steps (optimiser updates)"),
    "warmup_steps": (int, "learning-rate warm-up steps"),
    "clip_norm": (float, "largest gradient norm (0: no clipping)"),
    "batch_size": (int, "training examples per step"),
    "threads": (int, "intra-op CPU threads of the run (0: the runner's share of the cores)"),
    "d_model": (int, "model width"),
    "heads": (int, "attention heads"),
    "dropout": (float, "dropout probability"),
}
"""Setting name -> (type, meaning)."""

SYNONYMS: dict[str, str] = {
    "learning_rate": "lr", "max_update": "steps", "max_train_steps": "steps",
    "train_steps": "steps", "train_epochs": "steps (or epochs)", "warmup_updates": "warmup_steps",
    "warmup": "warmup_steps", "grad_clip": "clip_norm", "clip_grad": "clip_norm",
    "data_dir": "data", "data_path": "data", "dim": "d_model", "adim": "d_model",
    "hidden_size": "d_model", "width": "d_model", "n_heads": "heads", "aheads": "heads",
    "num_heads": "heads", "nthreads": "threads", "num_threads": "threads",
}
"""Names the vocabulary replaces -> the vocabulary's name."""


def vocabulary_problems(fields: dict[str, Any]) -> list[str]:
    """What in a task's settings (name -> annotation) breaks the vocabulary: a synonym used, or
    a vocabulary name with another type (``None`` may be allowed besides the type)."""
    problems = [f"setting {name!r} should be called {SYNONYMS[name]!r}" for name in fields
                if name in SYNONYMS]
    for name, annotation in fields.items():
        if name in VOCABULARY:
            expected = VOCABULARY[name][0]
            members = getattr(annotation, "__args__", (annotation,))
            if expected not in members:
                problems.append(f"setting {name!r} should be {expected.__name__}, "
                                f"not {getattr(annotation, '__name__', annotation)}")
    return problems
