"""``fairseq-train`` (fairseq's own ``cli_main``), then the peak memory of the process as JSON.

The child process of :func:`tasks.backends.fairseq_training.run_fairseq_train`:
``python -m tasks.backends.fairseq_train ARGS...`` with the arguments ``fairseq-train`` takes. It lives
outside the plug-in package so that fairseq's CLI configures logging first (its JSON log lines
are what the parent parses). When ``$ATTNBENCH_TRAIN_REPORT`` names a file, it receives
``{"peak_rss_mib": ..., "cuda_peak_mib": ...}`` after training.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch
from fairseq_cli.train import cli_main


def main() -> None:
    """fairseq's own ``fairseq-train`` entry point, then the memory report."""
    cli_main()
    report = os.environ.get("ATTNBENCH_TRAIN_REPORT")
    if report:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        Path(report).write_text(json.dumps({
            # ru_maxrss is in KiB on Linux
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }))


if __name__ == "__main__":
    main()
