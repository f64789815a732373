"""Make fairseq 0.12 (the ``fairseq-fixed==0.12.3.1`` fork) run on today's numpy, torch and CPU.

fairseq's last release predates numpy 2 and torch 2.6. Everything needed to run it here is in this
one module, applied when the plugin is imported (``import tasks.backends.fairseq_plugin`` or
``--user-dir tasks/backends/fairseq_plugin``), before fairseq touches any data. Nothing in site-packages is
edited. Each patch is idempotent and only fills in what is missing.

1. numpy 2 removed the aliases ``np.int``, ``np.float`` and ``np.compat.long`` that fairseq's
   data code still uses (``TokenBlockDataset`` with ``--sample-break-mode eos``,
   ``data_utils.compute_mask_indices``, ``LanguagePairDataset.num_tokens_vec``). They are put
   back as the builtins they always were.
2. torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses fairseq's own
   checkpoints (they pickle an ``argparse.Namespace`` and omegaconf configs). Only fairseq's
   checkpoint loader (``fairseq.checkpoint_utils``) is given a ``torch`` whose ``load`` defaults
   to ``weights_only=False``; ``torch.load`` everywhere else keeps the safe default. These are
   checkpoints this project wrote itself.
3. The torchaudio wheel that fairseq pulls in is a CUDA build whose native library fails to
   load on a CPU-only machine with an ``OSError``, which fairseq's ``try: import torchaudio /
   except ImportError`` guards do not catch. A torchaudio that cannot load is marked absent, so
   that ``import torchaudio`` raises ``ImportError`` and fairseq's audio paths report it cleanly.
   A working torchaudio is left alone. (Language modeling never uses torchaudio.)
4. fairseq's command-line modules (``fairseq_cli.preprocess``, ``eval_lm``...) call
   ``logging.basicConfig(stream=sys.stdout)`` when imported: in a process that runs them in place
   (a sweep's worker) the root logger then prints fairseq's INFO lines, to whatever stdout was at
   import time, for the rest of the process. :func:`import_fairseq_cli` imports them with the root
   logger's handlers and level left as they were.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any

import numpy as np
import torch

_applied = False


def _restore_numpy_aliases() -> None:
    for alias, builtin in (("int", int), ("float", float), ("long", int)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
    if "compat" not in np.__dict__:
        compat = types.ModuleType("numpy.compat")
        compat.long = int  # type: ignore[attr-defined]
        np.compat = compat  # type: ignore[attr-defined]
    elif not hasattr(np.compat, "long"):
        np.compat.long = int


class _TorchForTrustedCheckpoints(types.ModuleType):
    """``torch`` as fairseq's checkpoint loader sees it: ``load`` unpickles full checkpoints."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def _trust_fairseq_checkpoints() -> None:
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchForTrustedCheckpoints):
        checkpoint_utils.torch = _TorchForTrustedCheckpoints()


def _hide_broken_torchaudio() -> None:
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is None:
        return
    try:
        import torchaudio  # noqa: F401
    except (OSError, ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.modules["torchaudio"] = None  # type: ignore[assignment]  # import -> ImportError


def import_fairseq_cli(name: str) -> types.ModuleType:
    """``fairseq_cli.<name>``, imported without the root-logger handler it installs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(f"fairseq_cli.{name}")
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def apply() -> None:
    """Apply every patch (once per process)."""
    global _applied
    if _applied:
        return
    _restore_numpy_aliases()
    _trust_fairseq_checkpoints()
    _hide_broken_torchaudio()
    _applied = True


apply()
