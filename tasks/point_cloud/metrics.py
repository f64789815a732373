"""PCN's completion metrics, as PoinTr reports them: per sample, per category, averaged.

- ``cd_l1``: CD-L1 x 1000, ``cd_l2``: CD-L2 x 1000 (PoinTr's definitions, see ``geometry.py``),
- ``f_score``: F-Score@1% (threshold 0.01 in the unit-cube frame of PCN),

each computed between the dense completion and the complete cloud, averaged over the samples of a
category, and the headline value is the mean over categories (so that a large category does not
outweigh a small one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from tasks.point_cloud.geometry import chamfer_l1, chamfer_l2, f_score

METRIC_NAMES = ("cd_l1", "cd_l2", "f_score")


def sample_metrics(prediction: Tensor, target: Tensor, *, threshold: float = 0.01,
                   backend: str = "auto") -> dict[str, Tensor]:
    """Per-sample metrics of prediction [B, N, 3] against target [B, M, 3]: each [B]."""
    with torch.no_grad():
        return {
            "cd_l1": chamfer_l1(prediction, target, backend=backend) * 1000,
            "cd_l2": chamfer_l2(prediction, target, backend=backend) * 1000,
            "f_score": f_score(prediction, target, threshold, backend=backend),
        }


def summarize(
    rows: Iterable[tuple[str, dict[str, float]]],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Average (category, {metric: value}) rows per category, then over categories.

    Returns:
        (the mean over categories of each metric, {category: {metric: mean, "samples": count}}).
    """
    grouped: dict[str, list[dict[str, float]]] = defaultdict(list)
    for category, values in rows:
        grouped[category].append(values)
    if not grouped:
        raise ValueError("summarize: no samples")
    per_category = {
        category: {**{m: sum(v[m] for v in values) / len(values) for m in METRIC_NAMES},
                   "samples": float(len(values))}
        for category, values in sorted(grouped.items())
    }
    overall = {m: sum(c[m] for c in per_category.values()) / len(per_category) for m in METRIC_NAMES}
    return overall, per_category
