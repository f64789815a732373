"""The long time-series forecasting task: Informer on ETT, ECL and Weather (CAB's LSTF task)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from attention_zoo import AttentionConfigError
from tasks.base import AttentionChoice, Metric, RunContext, Task, split_heads
from tasks.registry import register_task
from tasks.time_series.model import ROLES, Informer, InformerShape


@dataclass(frozen=True)
class TimeSeriesConfig:
    """Settings of one forecasting run. The defaults are the smoke size (ETTh1 from the shipped
    CSV, a small Informer, 60 training steps, 512 evenly spaced validation and test windows:
    seconds per attention on a CPU); ``presets/paper.yaml`` holds CAB's settings."""

    dataset: Literal["ETTh1", "ETTh2", "ETTm1", "ETTm2", "ECL", "WTH"] = field(
        default="ETTh1", metadata={"help": "dataset (ETTh1/ETTh2 ship with the project)"})
    features: Literal["M", "S", "MS"] = field(
        default="M", metadata={"help": "M multivariate, S univariate (target only), MS all -> target"})
    target: str | None = field(default=None, metadata={"help": "target column (None: the dataset's)"})
    data: str = field(
        default="", metadata={"help": "folder of the CSV (empty: shipped sample or fetched data)"})
    seq_len: int = field(default=96, metadata={"help": "encoder input length", "min": 1})
    label_len: int = field(default=48, metadata={"help": "decoder start-token length", "min": 1})
    pred_len: int = field(default=24, metadata={"help": "forecast length", "min": 1})
    d_model: int = field(default=32, metadata={"help": "model width", "min": 1})
    heads: int = field(default=4, metadata={"help": "attention heads", "min": 1})
    e_layers: int = field(default=2, metadata={"help": "encoder layers", "min": 1})
    d_layers: int = field(default=1, metadata={"help": "decoder layers", "min": 1})
    d_ff: int = field(default=64, metadata={"help": "feed-forward width", "min": 1})
    dropout: float = field(default=0.05, metadata={"help": "dropout", "min": 0.0})
    distil: bool = field(default=True, metadata={"help": "self-attention distilling in the encoder"})
    batch_size: int = field(default=32, metadata={"help": "batch size", "min": 1})
    lr: float = field(
        default=1e-3, metadata={"help": "Adam learning rate, halved after every epoch", "min": 0.0})
    epochs: int = field(default=1, metadata={"help": "epochs", "min": 1})
    steps: int | None = field(
        default=60, metadata={"help": "stop training after this many steps (None: full epochs)",
                              "min": 1})
    patience: int = field(
        default=3, metadata={"help": "early stopping: epochs without validation gain", "min": 1})
    max_eval_windows: int | None = field(
        default=512, metadata={"help": "evaluate on this many evenly spaced windows (None: all)",
                                "min": 1})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: the runner's)", "min": 0})


@dataclass
class Forecasting:
    """What ``prepare`` hands the other stages: the scaled series and its loaders."""

    data: Any  # tasks.time_series.data.PreparedData
    loaders: dict[str, DataLoader]


@register_task
class TimeSeriesTask(Task):
    """Long time-series forecasting with an Informer backbone (CAB's LSTF task).

    Trains with MSE and Adam (learning rate halved after each epoch, early stopping on the
    validation MSE, the best epoch's weights tested), and reports the test MSE and MAE on
    standardised values for one seed; the runner averages seeds.
    """

    name = "time_series"
    roles = ROLES
    metrics = (
        Metric("mse", higher_is_better=False, description="test MSE, standardised values"),
        Metric("mae", higher_is_better=False, description="test MAE, standardised values"),
    )
    Config = TimeSeriesConfig
    requires = ("pandas", "matplotlib")
    datasets = {"ett": "tasks.time_series.data:fetch_ett", "ecl": "tasks.time_series.data:fetch_ecl",
                "weather": "tasks.time_series.data:fetch_weather"}

    @classmethod
    def check_settings(cls, config: TimeSeriesConfig) -> None:
        """The windows fit every split of the dataset's file, when the file is at hand (on a
        machine without it, the run checks as it reads)."""
        from tasks.time_series.data import count_rows, dataset_spec, locate, split_borders

        if config.label_len > config.seq_len:
            raise AttentionConfigError(f"task {cls.name}: label_len={config.label_len} must not exceed "
                                       f"seq_len={config.seq_len}")
        try:
            path = locate(config.dataset, config.data or None)
        except FileNotFoundError:
            return
        try:
            borders = split_borders(count_rows(path), config.seq_len, dataset_spec(config.dataset).split)
        except ValueError as error:
            raise AttentionConfigError(f"task {cls.name}: {path}: {error}") from None
        for split, (start, end) in borders.items():
            if end - start < config.seq_len + config.pred_len:
                raise AttentionConfigError(
                    f"task {cls.name}: {path}: the {split} split has {end - start} rows, fewer than "
                    f"seq_len + pred_len = {config.seq_len + config.pred_len}")

    @classmethod
    def attention_shapes(cls, config: TimeSeriesConfig) -> dict[str, tuple[int, int]]:
        shape = split_heads(config.d_model, config.heads, f"task {cls.name}: d_model / heads")
        return dict.fromkeys(cls.roles, shape)

    def prepare(self, config: TimeSeriesConfig, run: RunContext) -> Forecasting:
        from tasks.time_series import data as ts_data

        if config.label_len > config.seq_len:
            raise ValueError(f"label_len={config.label_len} must not exceed seq_len={config.seq_len}")
        prepared = ts_data.prepare(config.dataset, features=config.features, seq_len=config.seq_len,
                                   target=config.target, data_dir=config.data or None)
        sizes = {"seq_len": config.seq_len, "label_len": config.label_len, "pred_len": config.pred_len}
        train = ts_data.ForecastWindows(prepared, "train", **sizes)
        loaders = {"train": DataLoader(train, batch_size=config.batch_size, shuffle=True,
                                       drop_last=len(train) > config.batch_size,
                                       generator=run.generator())}
        for split in ("val", "test"):
            windows = _evenly_spaced(ts_data.ForecastWindows(prepared, split, **sizes),
                                     config.max_eval_windows)
            loaders[split] = DataLoader(windows, batch_size=config.batch_size, shuffle=False)
        return Forecasting(prepared, loaders)

    def build(self, config: TimeSeriesConfig, attention: Mapping[str, AttentionChoice],
              data: Forecasting, run: RunContext) -> Informer:
        from tasks.time_series.data import dataset_spec, n_time_features

        shape = InformerShape(
            input_dims=len(data.data.columns), output_dims=data.data.output_dims,
            time_dims=n_time_features(dataset_spec(config.dataset).freq),
            pred_len=config.pred_len, d_model=config.d_model, n_heads=config.heads,
            e_layers=config.e_layers, d_layers=config.d_layers, d_ff=config.d_ff,
            dropout=config.dropout, distil=config.distil,
        )
        return Informer(shape, attention).to(run.device)

    def train(self, model: Informer, config: TimeSeriesConfig, data: Forecasting,
              run: RunContext) -> None:
        """Epochs of Adam with Informer's schedule, validated after each; the best epoch's
        weights are kept (and saved to the workdir)."""
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        losses: list[float] = []
        validation: list[float] = []
        best_state, best_val, stale = None, math.inf, 0
        for epoch in range(config.epochs):
            losses += _epoch(model, optimizer, data, run.device, config.steps, len(losses))
            validation.append(self._score(model, config, data, "val", run).mse)
            if validation[-1] < best_val:
                best_val, best_state, stale = validation[-1], copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
            if stale >= config.patience or (config.steps is not None and len(losses) >= config.steps):
                break
            # Informer's "type1" schedule: after epoch e (from 0) the rate is lr * 0.5^e.
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5**epoch
        if best_state is None:
            raise FloatingPointError(f"validation MSE was never finite: {validation}")
        model.load_state_dict(best_state)
        torch.save(best_state, run.workdir / "checkpoint.pt")
        run.extra.update(train_loss=losses, validation_mse=validation, train_steps=len(losses))

    def evaluate(self, model: Informer, config: TimeSeriesConfig, data: Forecasting,
                 run: RunContext) -> dict[str, float]:
        from tasks.time_series.metrics import evaluate, persistence, save_figure

        test = self._score(model, config, data, "test", run)
        baseline = evaluate(persistence(data.data.output_dims, config.pred_len), data.loaders["test"],
                            output_dims=data.data.output_dims, pred_len=config.pred_len,
                            device=run.device)
        label = "/".join(run.attention[role].label() for role in ROLES)
        figure = save_figure(test, Path(run.workdir) / "forecast.png",
                             f"{config.dataset}-{config.features} {data.data.columns[-1]}: {label}")
        run.extra.update(persistence_mse=baseline.mse, persistence_mae=baseline.mae,
                         test_windows=test.windows, figure=str(figure), config=asdict(config))
        return {"mse": test.mse, "mae": test.mae}

    @staticmethod
    def _score(model: Informer, config: TimeSeriesConfig, data: Forecasting, split: str,
               run: RunContext) -> Any:
        from tasks.time_series.metrics import evaluate

        model.eval()
        return evaluate(lambda x, y, x_mark, y_mark: model(x, x_mark, y, y_mark), data.loaders[split],
                        output_dims=data.data.output_dims, pred_len=config.pred_len, device=run.device)


def train_step(model: Informer, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
               output_dims: int) -> float:
    """One Adam step on the MSE of the forecast; returns the loss before the step."""
    x, y, x_mark, y_mark = batch
    model.train()
    forecast = model(x, x_mark, y, y_mark)
    loss = torch.nn.functional.mse_loss(forecast, y[:, -model.shape.pred_len:, -output_dims:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _epoch(model: Informer, optimizer: torch.optim.Optimizer, data: Forecasting, device: str,
           steps: int | None, done: int) -> list[float]:
    """One pass over the training windows, cut at ``steps`` in all (``done`` taken already)."""
    losses = []
    for batch in data.loaders["train"]:
        losses.append(train_step(model, optimizer, tuple(t.to(device) for t in batch),
                                 data.data.output_dims))
        if steps is not None and done + len(losses) >= steps:
            break
    return losses


def _evenly_spaced(dataset: torch.utils.data.Dataset, limit: int | None) -> torch.utils.data.Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    indices = np.linspace(0, len(dataset) - 1, limit).round().astype(int)
    return torch.utils.data.Subset(dataset, indices.tolist())
