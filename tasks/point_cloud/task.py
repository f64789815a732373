"""The point-cloud completion task: PoinTr-style on PCN (or its shipped PCN-style sample)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from tasks.base import AttentionChoice, Metric, RunContext, Task, split_heads
from tasks.point_cloud.model import ROLES, PoinTr, PoinTrSettings
from tasks.registry import register_task


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
    d_model: int = field(default=64, metadata={"help": "model width [384]", "min": 8})
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
    threads: int = field(default=0, metadata={"help": "CPU threads (0: the runner's)", "min": 0})


@dataclass
class Shapes:
    """What ``prepare`` hands the other stages."""

    root: Path
    train: Any  # tasks.point_cloud.data.PCNDataset
    test: Any
    backend: str


@register_task
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
    requires = ("matplotlib",)
    datasets = {"pcn": "tasks.point_cloud.data:fetch_pcn",
                "pcn_synthetic": "tasks.point_cloud.data:fetch_pcn_synthetic"}
    data_tools = {"pcn_generate": "tasks.point_cloud.generate:main"}

    @classmethod
    def attention_shapes(cls, config: PointCloudConfig) -> dict[str, tuple[int, int]]:
        shape = split_heads(config.d_model, config.heads, f"task {cls.name}: d_model / heads")
        return dict.fromkeys(cls.roles, shape)

    def prepare(self, config: PointCloudConfig, run: RunContext) -> Shapes:
        from tasks.point_cloud.data import SYNTHETIC_SAMPLE, PCNDataset
        from tasks.point_cloud.geometry import resolve_backend

        root = Path(config.data) if config.data else SYNTHETIC_SAMPLE
        categories = tuple(c for c in config.categories.split(",") if c)
        train, test = (PCNDataset(root, split, partial_points=config.partial_points,
                                  categories=categories, seed=run.seed)
                       for split in ("train", config.eval_subset))
        run.extra.update(data=str(root), train_models=len(train), eval_models=len(test))
        return Shapes(root, train, test, resolve_backend(config.geometry_backend))

    def build(self, config: PointCloudConfig, attention: Mapping[str, AttentionChoice], data: Shapes,
              run: RunContext) -> PoinTr:
        run.extra["geometry_backend"] = data.backend
        return PoinTr(self.settings(config, attention), backend=data.backend).to(run.device)

    def train(self, model: PoinTr, config: PointCloudConfig, data: Shapes, run: RunContext) -> None:
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, drop_last=False,
                            generator=run.generator(), collate_fn=_collate, num_workers=config.workers)
        losses: list[float] = []
        model.train()
        while len(losses) < config.steps:
            for partial, complete, _ in loader:
                loss = model.loss(partial.to(run.device), complete.to(run.device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
                if len(losses) == config.steps:
                    break
        run.extra["loss_curve"] = losses

    @torch.no_grad()
    def evaluate(self, model: PoinTr, config: PointCloudConfig, data: Shapes,
                 run: RunContext) -> dict[str, float]:
        from tasks.point_cloud.figure import FigureRow, completion_figure
        from tasks.point_cloud.metrics import sample_metrics, summarize

        model.eval()
        rows: list[tuple[str, dict[str, float]]] = []
        shown: list[FigureRow] = []
        for partial, complete, names in DataLoader(data.test, batch_size=config.eval_batch_size,
                                                   collate_fn=_collate, num_workers=config.workers):
            dense = model(partial.to(run.device))[1]
            values = sample_metrics(dense, complete.to(run.device), threshold=config.fscore_threshold,
                                    backend=data.backend)
            for i, category in enumerate(names):
                rows.append((category, {m: float(v[i]) for m, v in values.items()}))
                if len(shown) < config.figure_samples:
                    shown.append(FigureRow(category, partial[i].numpy(), dense[i].cpu().numpy(),
                                           complete[i].numpy()))
        overall, run.extra["per_category"] = summarize(rows)
        if config.figure_samples:
            shown += self._real_scans(model, config, run)
            run.extra["figure"] = str(completion_figure(shown, run.workdir / "completion.png"))
        return overall

    @staticmethod
    def settings(config: PointCloudConfig, attention: Mapping[str, AttentionChoice]) -> PoinTrSettings:
        """The network sizes and per-role mechanisms of ``config``."""
        return PoinTrSettings(
            centres=config.centres, neighbours=config.neighbours, dim=config.d_model, heads=config.heads,
            encoder_depth=config.encoder_depth, decoder_depth=config.decoder_depth, queries=config.queries,
            fold_step=config.fold_step, geometry_layers=config.geometry_layers,
            attention={role: (choice.name, dict(choice.args)) for role, choice in attention.items()},
        )

    @staticmethod
    def _real_scans(model: PoinTr, config: PointCloudConfig, run: RunContext) -> list[Any]:
        """Completions of the two real partial scans shipped with the task (no ground truth)."""
        from tasks.point_cloud.data import REAL_SCANS, resample
        from tasks.point_cloud.figure import FigureRow
        from tasks.point_cloud.pcd import read_pcd

        rows = []
        for name, path in REAL_SCANS.items():
            points = resample(read_pcd(path), config.partial_points, np.random.default_rng(run.seed))
            dense = model(torch.from_numpy(points).unsqueeze(0).to(run.device))[1][0]
            rows.append(FigureRow(f"real scan ({name})", points, dense.cpu().numpy(), None))
        return rows


def _collate(
    batch: list[tuple[torch.Tensor, torch.Tensor, str]],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    partial, complete, names = zip(*batch)
    return torch.stack(partial), torch.stack(complete), list(names)
