"""fairseq plug-in: zoo attention inside fairseq models (fairseq's ``--user-dir`` mechanism).

Shared by the fairseq tasks (language modeling: ``zoo_transformer_lm``; summarization:
``zoo_transformer``). ``import tasks.backends.fairseq_plugin``
or ``fairseq-train --user-dir tasks/backends/fairseq_plugin`` applies the compatibility patches
(:mod:`tasks.backends.fairseq_plugin.compat`, first) and registers the models.

fairseq imports a ``--user-dir`` folder under its bare name (``fairseq_plugin``); the imports
below are absolute, so the models are registered once even when the folder is also imported as
``tasks.backends.fairseq_plugin``.
"""

import logging

# Importing fairseq lowers the root logger to DEBUG, which floods every later library's debug
# output (matplotlib, numba) into a sweep's or a report's console, and its text-to-speech task
# adds a root handler (logging.basicConfig): restore the level and the handlers after.
_root_level = logging.getLogger().level
_root_handlers = list(logging.getLogger().handlers)

from tasks.backends.fairseq_plugin import compat  # noqa: E402,F401  (must come before any fairseq data path)

# isort: split
from tasks.backends.fairseq_plugin import (  # noqa: E402
    transformer,  # noqa: F401  (registers zoo_transformer)
    transformer_lm,  # noqa: F401  (registers zoo_transformer_lm)
)
from tasks.backends.fairseq_plugin.attention import ZooAttention, index_batch, state_bytes  # noqa: E402

logging.getLogger().setLevel(_root_level)
for _handler in [h for h in logging.getLogger().handlers if h not in _root_handlers]:
    logging.getLogger().removeHandler(_handler)

USER_DIR = __path__[0]
"""The folder to pass as fairseq's ``--user-dir``."""

__all__ = ["USER_DIR", "ZooAttention", "index_batch", "state_bytes"]
