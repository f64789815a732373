"""The point-cloud completion task: PoinTr-style on PCN (or its shipped PCN-style sample)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from tasks.base import AttentionChoice, Metric, Task, TaskResult, resolve_attention, split_heads
from tasks.point_cloud.data import REAL_SCANS, SYNTHETIC_SAMPLE, PCNDataset, resample
from tasks.point_cloud.figure import FigureRow, completion_figure
from tasks.point_cloud.geometry import resolve_backend
from tasks.point_cloud.metrics import sample_metrics, summarize
from tasks.point_cloud.model import ROLES, PoinTr, PoinTrSettings
from tasks.point_cloud.pcd import read_pcd


@dataclass(frozen=True)
class PointCloudConfig:
    """Settings of a run. Defaults: the smoke size (CPU, shipped sample, seconds per mechanism);
    PoinTr's PCN values are given in each help text."""

    data: str = field(default="", metadata={"help": "PCN root (PCN.json, train/, val/, test/); "
                                                    "empty: the shipped PCN-style sample"})
    categories: str = field(default="", metadata={"help": "comma-separated category names; empty: all"})
    eval_subset: Literal["val", "test"] = field(default="test", metadata={"help": "split to evaluate"})
    partial_points: int = field(default=512, metadata={"help": "input points [2048]", "min": 16})
    centres: int = field(default=32, metadata={"help": "point proxies [128]", "min": 2})
    neighbours: int = field(default=16, metadata={"help": "points per proxy patch [16]", "min": 1})
    dim: int = field(default=64, metadata={"help": "model width [384]", "min": 8})
    heads: int = field(default=4, metadata={"help": "attention heads [6]", "min": 1})
    encoder_depth: int = field(default=2, metadata={"help": "encoder blocks [6]", "min": 1})
    decoder_depth: int = field(default=2, metadata={"help": "decoder blocks [8]", "min": 1})
    queries: int = field(default=32, metadata={"help": "decoder queries = coarse points [224]", "min": 2})
    fold_step: int = field(default=4, metadata={"help": "fold grid side, step^2 points per query [8]",
                                                "min": 1})
    geometry_layers: int = field(default=1, metadata={"help": "geometry-aware blocks [1]", "min": 0})
    steps: int = field(default=30, metadata={"help": "optimiser steps", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "training batch [48]", "min": 1})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate [5e-4]", "min": 0.0})
    weight_decay: float = field(default=5e-4, metadata={"help": "AdamW weight decay [5e-4]", "min": 0.0})
    eval_batch_size: int = field(default=16, metadata={"help": "evaluation batch", "min": 1})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes (PCN: 4 or more)",
                                             "min": 0})
    fscore_threshold: float = field(default=0.01, metadata={"help": "F-Score distance [0.01]", "min": 0.0})
    figure_samples: int = field(default=3, metadata={"help": "test samples in the figure (0: no figure)",
                                                     "min": 0})
    geometry_backend: Literal["auto", "torch", "pytorch3d"] = field(
        default="auto", metadata={"help": "FPS/kNN/Chamfer: pytorch3d if importable (auto) or PyTorch"})


class PointCloudCompletion(Task):
    """Point-cloud completion on PCN, PoinTr-style (Yu et al., ICCV 2021).

    Roles: ``encoder_self`` (proxies attend to proxies), ``decoder_self`` (queries to queries),
    ``cross`` (queries to proxies); all non-causal. Metrics: CD-L1 x 1000, CD-L2 x 1000 and
    F-Score@1% of the dense completion, averaged per category and then over categories.
    """

    name = "point_cloud"
    roles = ROLES
    metrics = (
        Metric("cd_l1", higher_is_better=False,
               description="Chamfer L1 x 1000 (PoinTr), mean over categories"),
        Metric("cd_l2", higher_is_better=False,
               description="Chamfer L2 x 1000 (PoinTr), mean over categories"),
        Metric("f_score", higher_is_better=True, description="F-Score@1%, mean over categories"),
    )
    Config = PointCloudConfig

    @classmethod
    def attention_shapes(cls, config: PointCloudConfig) -> dict[str, tuple[int, int]]:
        shape = split_heads(config.dim, config.heads, f"task {cls.name}: dim / heads")
        return dict.fromkeys(cls.roles, shape)

    def run(
        self,
        config: PointCloudConfig,
        attention: Mapping[str, AttentionChoice],
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        attention = resolve_attention(type(self), attention)
        backend = resolve_backend(config.geometry_backend)
        torch.manual_seed(seed)
        root = Path(config.data) if config.data else SYNTHETIC_SAMPLE
        categories = tuple(c for c in config.categories.split(",") if c)
        train = PCNDataset(root, "train", partial_points=config.partial_points, categories=categories,
                           seed=seed)
        test = PCNDataset(root, config.eval_subset, partial_points=config.partial_points,
                          categories=categories, seed=seed)
        model = PoinTr(self.settings(config, attention), backend=backend).to(device)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=False,
                            generator=generator, collate_fn=_collate, num_workers=config.workers)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        losses: list[float] = []
        started = time.perf_counter()
        model.train()
        while len(losses) < config.steps:
            for partial, complete, _ in loader:
                loss = model.loss(partial.to(device), complete.to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
                if len(losses) == config.steps:
                    break
        train_seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None

        started = time.perf_counter()
        model.eval()
        rows: list[tuple[str, dict[str, float]]] = []
        shown: list[FigureRow] = []
        with torch.no_grad():
            for partial, complete, names in DataLoader(test, batch_size=config.eval_batch_size,
                                                       collate_fn=_collate, num_workers=config.workers):
                dense = model(partial.to(device))[1]
                values = sample_metrics(dense, complete.to(device), threshold=config.fscore_threshold,
                                        backend=backend)
                for i, category in enumerate(names):
                    rows.append((category, {m: float(v[i]) for m, v in values.items()}))
                    if len(shown) < config.figure_samples:
                        shown.append(FigureRow(category, partial[i].numpy(), dense[i].cpu().numpy(),
                                               complete[i].numpy()))
        overall, per_category = summarize(rows)
        eval_seconds = time.perf_counter() - started

        extra: dict[str, object] = {
            "per_category": per_category, "loss_curve": losses, "geometry_backend": backend,
            "data": str(root), "train_models": len(train), "eval_models": len(test),
        }
        if config.figure_samples:
            shown += self._real_scans(model, config, device, seed)
            extra["figure"] = str(completion_figure(shown, Path(workdir) / "completion.png"))
        return TaskResult(
            metrics=overall,
            parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            attention_parameters=model.attention_parameters(),
            train_seconds=train_seconds, eval_seconds=eval_seconds, peak_memory_mib=peak, extra=extra,
        )

    @staticmethod
    def settings(config: PointCloudConfig, attention: Mapping[str, AttentionChoice]) -> PoinTrSettings:
        """The network sizes and per-role mechanisms of ``config``."""
        return PoinTrSettings(
            centres=config.centres, neighbours=config.neighbours, dim=config.dim, heads=config.heads,
            encoder_depth=config.encoder_depth, decoder_depth=config.decoder_depth, queries=config.queries,
            fold_step=config.fold_step, geometry_layers=config.geometry_layers,
            attention={role: (choice.name, dict(choice.args)) for role, choice in attention.items()},
        )

    @staticmethod
    def _real_scans(model: PoinTr, config: PointCloudConfig, device: str, seed: int) -> list[FigureRow]:
        """Completions of the two real partial scans shipped with the task (no ground truth)."""
        rows = []
        with torch.no_grad():
            for name, path in REAL_SCANS.items():
                points = resample(read_pcd(path), config.partial_points, np.random.default_rng(seed))
                dense = model(torch.from_numpy(points).unsqueeze(0).to(device))[1][0]
                rows.append(FigureRow(f"real scan ({name})", points, dense.cpu().numpy(), None))
        return rows


def _collate(
    batch: list[tuple[torch.Tensor, torch.Tensor, str]],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    partial, complete, names = zip(*batch)
    return torch.stack(partial), torch.stack(complete), list(names)
