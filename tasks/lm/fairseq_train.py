"""``fairseq-train`` (fairseq's own ``cli_main``), then the peak memory of the process as JSON.

The LM task trains in a child process, ``python -m tasks.lm.fairseq_train ARGS...``, with the
arguments ``fairseq-train`` takes (the zoo arrives through ``--user-dir``). A separate process
gives a clean peak-memory figure for each run. When ``$ATTNBENCH_TRAIN_REPORT`` names a file,
it receives ``{"peak_rss_mib": ..., "cuda_peak_mib": ...}`` after training.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch
from fairseq_cli.train import cli_main


def main() -> None:
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
