"""The completion figure: partial input, completion and ground truth, one sample per row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FigureRow:
    """One sample: its title and clouds [N, 3] (``truth`` None for a real scan without one)."""

    title: str
    partial: np.ndarray
    completion: np.ndarray
    truth: np.ndarray | None


def completion_figure(rows: Sequence[FigureRow], path: str | Path, *, max_points: int = 2048) -> Path:
    """Draw ``rows`` as 3-D scatter plots (partial / completion / ground truth) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("completion_figure: no rows to draw")
    rng = np.random.default_rng(0)
    figure = plt.figure(figsize=(9, 3 * len(rows)))
    columns = ("partial", "completion", "ground truth")
    for r, row in enumerate(rows):
        for c, (label, cloud) in enumerate(zip(columns, (row.partial, row.completion, row.truth))):
            axis = figure.add_subplot(len(rows), 3, 3 * r + c + 1, projection="3d")
            axis.set_axis_off()
            axis.set_title(f"{row.title}: {label}" if c == 0 else label, fontsize=8)
            if cloud is None:
                axis.text2D(0.5, 0.5, "(no ground truth: real scan)", ha="center", fontsize=7,
                            transform=axis.transAxes)
                continue
            if len(cloud) > max_points:
                cloud = cloud[rng.choice(len(cloud), max_points, replace=False)]
            # PCN is y-up; matplotlib's 3-D axes are z-up.
            axis.scatter(cloud[:, 0], cloud[:, 2], cloud[:, 1], s=0.5, c=cloud[:, 1], cmap="viridis")
            axis.set_xlim(-0.5, 0.5)
            axis.set_ylim(-0.5, 0.5)
            axis.set_zlim(-0.5, 0.5)
            axis.view_init(elev=20, azim=-60)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
