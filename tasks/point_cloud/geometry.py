"""Point-cloud geometry: farthest point sampling, k nearest neighbours, Chamfer distance, F-score.

Each operation runs on pytorch3d (``pytorch3d.ops``) when it is importable and otherwise on the
exact pure-PyTorch versions below; ``backend="auto"`` (the default) chooses. The PyTorch versions
rank neighbours by ``torch.cdist`` in its direct-difference mode (no ``|a|^2 + |b|^2 - 2ab``
expansion, whose cancellation loses digits for nearby points), visiting the queries in chunks so
that memory stays bounded by ``max_elements`` distances whatever the cloud sizes; the returned
squared distances are then recomputed as ``sum((a - b) ** 2)`` from the gathered neighbours, with
autograd, so backward stores ``[B, M, K, 3]`` numbers, never the all-pairs tensor.

Definitions follow PoinTr (Yu et al., ICCV 2021, ``extensions/chamfer_dist``): with
``d(x, Y) = min_y |x - y|^2`` (squared Euclidean distance to the nearest point),

- CD-L2(X, Y) = mean_x d(x, Y) + mean_y d(y, X)
- CD-L1(X, Y) = (mean_x sqrt d(x, Y) + mean_y sqrt d(y, X)) / 2
- F-Score@t (Tatarchenko et al., CVPR 2019): precision = share of predicted points within
  Euclidean distance ``t`` of the ground truth, recall = share of ground-truth points within
  ``t`` of the prediction, F = 2PR / (P + R) (0 when both are 0).

All three are symmetric in their two clouds except F-score, which swaps precision and recall
(and is therefore symmetric too).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "pytorch3d"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "pytorch3d")

#: Largest number of pairwise distances a chunk may hold (64 MiB in float32).
DEFAULT_MAX_ELEMENTS = 1 << 24

PYTORCH3D_INSTALL = (
    "pytorch3d has no Linux wheel on PyPI; install it from source against the installed torch: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/pytorch3d.git@stable' "
    "(or conda install pytorch3d -c pytorch3d); see the README, 'Task: point-cloud completion'"
)


@functools.cache
def pytorch3d_available() -> bool:
    """Whether ``pytorch3d.ops`` can be imported."""
    if importlib.util.find_spec("pytorch3d") is None:
        return False
    try:
        import pytorch3d.ops  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """``"pytorch3d"`` or ``"torch"``: ``auto`` takes pytorch3d when it is importable.

    Raises:
        ValueError: for an unknown name, or ``"pytorch3d"`` when it is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown geometry backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "pytorch3d" if pytorch3d_available() else "torch"
    if backend == "pytorch3d" and not pytorch3d_available():
        raise ValueError(f"geometry backend 'pytorch3d' requested but not importable: {PYTORCH3D_INSTALL}")
    return backend


def _check_clouds(*clouds: Tensor) -> None:
    for cloud in clouds:
        if cloud.dim() != 3 or cloud.shape[-1] != 3:
            raise ValueError(f"point clouds must have shape [B, N, 3], got {tuple(cloud.shape)}")
    if len({c.shape[0] for c in clouds}) > 1:
        raise ValueError(f"batch sizes differ: {[tuple(c.shape) for c in clouds]}")


def gather_points(points: Tensor, index: Tensor) -> Tensor:
    """Rows of each batch element: points [B, N, C], index [B, ...] -> [B, ..., C]."""
    batch = points.shape[0]
    flat = index.reshape(batch, -1)  # [B, I]
    gathered = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return gathered.view(*index.shape, points.shape[-1])


def farthest_point_sample(points: Tensor, num_samples: int, *, backend: str = "auto") -> Tensor:
    """Greedy farthest point sampling, starting from point 0 (as pytorch3d without random start).

    Each step takes the point whose squared distance to the already chosen set is largest
    (the first such point on ties).

    Args:
        points: [B, N, 3].
        num_samples: S <= N.
        backend: "auto", "torch" or "pytorch3d".

    Returns:
        indices [B, S] (int64) into ``points``.
    """
    _check_clouds(points)
    count = points.shape[1]
    if not 0 < num_samples <= count:
        raise ValueError(f"farthest_point_sample: num_samples={num_samples} must be in [1, {count}]")
    if resolve_backend(backend) == "pytorch3d":
        from pytorch3d.ops import sample_farthest_points

        return sample_farthest_points(points.detach(), K=num_samples)[1]
    with torch.no_grad():
        batch = points.shape[0]
        chosen = torch.zeros(batch, num_samples, dtype=torch.long, device=points.device)
        nearest = torch.full((batch, count), float("inf"), dtype=points.dtype, device=points.device)
        farthest = torch.zeros(batch, dtype=torch.long, device=points.device)  # [B]
        rows = torch.arange(batch, device=points.device)
        for step in range(num_samples):
            chosen[:, step] = farthest
            centre = points[rows, farthest].unsqueeze(1)  # [B, 1, 3]
            nearest = torch.minimum(nearest, ((points - centre) ** 2).sum(-1))  # [B, N]
            farthest = nearest.argmax(dim=1)
    return chosen


def knn(
    query: Tensor,
    points: Tensor,
    k: int,
    *,
    backend: str = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """The k nearest ``points`` of every ``query`` point, nearest first.

    Args:
        query: [B, M, 3].
        points: [B, N, 3], N >= k.
        k: number of neighbours.
        backend: "auto", "torch" or "pytorch3d".
        max_elements: bound on the pairwise-distance chunk of the torch version.

    Returns:
        (squared distances [B, M, k], differentiable in both clouds; indices [B, M, k] into points).
    """
    _check_clouds(query, points)
    if not 0 < k <= points.shape[1]:
        raise ValueError(f"knn: k={k} must be in [1, {points.shape[1]}] (the number of points)")
    if resolve_backend(backend) == "pytorch3d":
        from pytorch3d.ops import knn_points

        result = knn_points(query, points, K=k, return_sorted=True)
        return result.dists, result.idx
    batch, queries, count = query.shape[0], query.shape[1], points.shape[1]
    chunk = max(1, max_elements // max(1, batch * count))
    with torch.no_grad():
        index = torch.empty(batch, queries, k, dtype=torch.long, device=query.device)
        for start in range(0, queries, chunk):
            block = query[:, start:start + chunk].detach()  # [B, c, 3]
            # cdist's direct-difference mode: exact differences, no [B, c, N, 3] intermediate.
            distance = torch.cdist(block, points.detach(), compute_mode="donot_use_mm_for_euclid_dist")
            index[:, start:start + chunk] = distance.topk(k, dim=-1, largest=False, sorted=True).indices
    neighbours = gather_points(points, index)  # [B, M, k, 3]
    distances = ((query.unsqueeze(2) - neighbours) ** 2).sum(-1)  # [B, M, k]
    return distances, index


def nearest_squared_distances(
    x: Tensor, y: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Squared distance from each point of one cloud to the nearest point of the other.

    Args:
        x: [B, N, 3]; y: [B, M, 3].

    Returns:
        (d(x, Y) [B, N], d(y, X) [B, M]).
    """
    x_to_y = knn(x, y, 1, backend=backend)[0].squeeze(-1)
    y_to_x = knn(y, x, 1, backend=backend)[0].squeeze(-1)
    return x_to_y, y_to_x


def _sqrt(squared: Tensor) -> Tensor:
    # sqrt has an infinite derivative at 0 (a point that coincides with its neighbour); there
    # the distance is 0 and its gradient is taken as 0, which keeps exact values and finite grads.
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, 1.0)), 0.0)


def chamfer_l2(x: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """PoinTr's CD-L2: mean squared nearest distance both ways, summed. x [B,N,3], y [B,M,3] -> [B]."""
    x_to_y, y_to_x = nearest_squared_distances(x, y, backend=backend)
    return x_to_y.mean(-1) + y_to_x.mean(-1)


def chamfer_l1(x: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """PoinTr's CD-L1: mean nearest Euclidean distance both ways, averaged. -> [B]."""
    x_to_y, y_to_x = nearest_squared_distances(x, y, backend=backend)
    return (_sqrt(x_to_y).mean(-1) + _sqrt(y_to_x).mean(-1)) / 2


def f_score(prediction: Tensor, target: Tensor, threshold: float = 0.01, *, backend: str = "auto") -> Tensor:
    """F-Score@threshold of prediction [B, N, 3] against target [B, M, 3] -> [B]."""
    if threshold <= 0:
        raise ValueError(f"f_score: threshold must be > 0, got {threshold}")
    with torch.no_grad():
        pred_to_target, target_to_pred = nearest_squared_distances(prediction, target, backend=backend)
        precision = (pred_to_target < threshold**2).to(prediction.dtype).mean(-1)
        recall = (target_to_pred < threshold**2).to(prediction.dtype).mean(-1)
        total = precision + recall
        return torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), 0.0)
