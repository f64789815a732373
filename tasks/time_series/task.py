"""The long time-series forecasting task: Informer on ETT, ECL and Weather (CAB's LSTF task)."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from attention_zoo import AttentionConfigError
from tasks.base import AttentionChoice, Metric, Task, TaskResult, resolve_attention, split_heads
from tasks.time_series.data import (
    ForecastWindows,
    PreparedData,
    count_rows,
    dataset_spec,
    locate,
    n_time_features,
    prepare,
    split_borders,
)
from tasks.time_series.model import ROLES, Informer, InformerShape

Batch = tuple[Tensor, Tensor, Tensor, Tensor]
Forecaster = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""(x, y, x_mark, y_mark) -> forecast [B, pred_len, output_dims]; must only read y[:, :label_len]."""


@dataclass(frozen=True)
class TimeSeriesConfig:
    """Settings of one forecasting run. The defaults are the smoke size (ETTh1 from the shipped
    CSV, a small Informer, 60 training steps, 512 evenly spaced validation and test windows:
    seconds per attention on a CPU);
    :data:`PAPER_SETTINGS` holds CAB's settings."""

    dataset: Literal["ETTh1", "ETTh2", "ETTm1", "ETTm2", "ECL", "WTH"] = field(
        default="ETTh1", metadata={"help": "dataset (ETTh1/ETTh2 ship with the project)"})
    features: Literal["M", "S", "MS"] = field(
        default="M", metadata={"help": "M multivariate, S univariate (target only), MS all -> target"})
    target: str | None = field(default=None, metadata={"help": "target column (None: the dataset's)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of the CSV (None: shipped sample or fetched data)"})
    seq_len: int = field(default=96, metadata={"help": "encoder input length", "min": 1})
    label_len: int = field(default=48, metadata={"help": "decoder start-token length", "min": 1})
    pred_len: int = field(default=24, metadata={"help": "forecast length", "min": 1})
    d_model: int = field(default=32, metadata={"help": "model width", "min": 1})
    n_heads: int = field(default=4, metadata={"help": "attention heads", "min": 1})
    e_layers: int = field(default=2, metadata={"help": "encoder layers", "min": 1})
    d_layers: int = field(default=1, metadata={"help": "decoder layers", "min": 1})
    d_ff: int = field(default=64, metadata={"help": "feed-forward width", "min": 1})
    dropout: float = field(default=0.05, metadata={"help": "dropout", "min": 0.0})
    distil: bool = field(default=True, metadata={"help": "self-attention distilling in the encoder"})
    batch_size: int = field(default=32, metadata={"help": "batch size", "min": 1})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Adam learning rate, halved after every epoch", "min": 0.0})
    train_epochs: int = field(default=1, metadata={"help": "epochs", "min": 1})
    max_train_steps: int | None = field(
        default=60, metadata={"help": "stop training after this many steps (None: full epochs)",
                              "min": 1})
    patience: int = field(
        default=3, metadata={"help": "early stopping: epochs without validation gain", "min": 1})
    max_eval_windows: int | None = field(
        default=512, metadata={"help": "evaluate on this many evenly spaced windows (None: all)",
                                "min": 1})


_INFORMER = {"d_model": 512, "n_heads": 8, "d_ff": 2048, "dropout": 0.05, "distil": True,
             "batch_size": 32, "learning_rate": 1e-4, "train_epochs": 6, "patience": 3,
             "max_train_steps": None, "max_eval_windows": None}


def _setting(dataset: str, features: str, seq_len: int, label_len: int, pred_len: int,
             e_layers: int, d_layers: int) -> dict[str, Any]:
    return {**_INFORMER, "dataset": dataset, "features": features, "seq_len": seq_len,
            "label_len": label_len, "pred_len": pred_len, "e_layers": e_layers,
            "d_layers": d_layers}


PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    # CAB's LSTF settings (Shark-NLP/CAB tasks/LSTF/scripts), Informer2020's hyperparameters.
    "ETTh1-M": _setting("ETTh1", "M", 336, 336, 720, 2, 1),
    "ETTh1-S": _setting("ETTh1", "S", 168, 168, 720, 2, 1),
    "ETTh2-M": _setting("ETTh2", "M", 720, 336, 720, 2, 1),
    "ETTh2-S": _setting("ETTh2", "S", 336, 336, 720, 2, 1),
    "ETTm1-M": _setting("ETTm1", "M", 672, 384, 672, 2, 1),
    "ETTm1-S": _setting("ETTm1", "S", 384, 384, 672, 2, 1),
    "ECL-M": _setting("ECL", "M", 336, 336, 960, 3, 2),
    "ECL-S": _setting("ECL", "S", 336, 336, 960, 3, 2),
    "WTH-M": _setting("WTH", "M", 720, 336, 720, 3, 2),
    "WTH-S": _setting("WTH", "S", 720, 336, 720, 3, 2),
}
"""CAB's settings by name; ``TimeSeriesTask.make_config(PAPER_SETTINGS["ETTh1-M"])``."""

PAPER_SEEDS: dict[str, int] = {"ETTh1": 5, "ETTh2": 5, "ETTm1": 5, "ECL": 3, "WTH": 3}
"""Seeds per dataset in CAB (the runner averages them and reports the spread)."""


def mse(prediction: Tensor, truth: Tensor) -> float:
    """Mean squared error over every element."""
    return float(torch.mean((prediction - truth) ** 2))


def mae(prediction: Tensor, truth: Tensor) -> float:
    """Mean absolute error over every element."""
    return float(torch.mean(torch.abs(prediction - truth)))


def persistence(output_dims: int, pred_len: int) -> Forecaster:
    """The repeat-the-last-value baseline: every forecast step equals the last input step."""

    def forecast(x: Tensor, y: Tensor, x_mark: Tensor, y_mark: Tensor) -> Tensor:
        return x[:, -1:, -output_dims:].expand(-1, pred_len, -1)

    return forecast


@dataclass
class Evaluation:
    """Errors of a forecaster over a split, on standardised values.

    Attributes:
        mse, mae: over every forecast element of every window.
        windows: windows evaluated.
        example: (input [seq_len], truth [pred_len], forecast [pred_len]) of the target
            variable in the first window, for the figure.
    """

    mse: float
    mae: float
    windows: int
    example: tuple[np.ndarray, np.ndarray, np.ndarray]


@torch.no_grad()
def evaluate(forecaster: Forecaster, loader: DataLoader, *, output_dims: int, pred_len: int,
             device: str | torch.device = "cpu") -> Evaluation:
    """MSE and MAE of ``forecaster`` over every window of ``loader`` (streamed, so the full
    ECL test set never sits in memory)."""
    squared = absolute = 0.0
    count = windows = 0
    example = None
    for batch in loader:
        x, y, x_mark, y_mark = (t.to(device) for t in batch)
        truth = y[:, -pred_len:, -output_dims:]  # [B, Lp, O]
        forecast = forecaster(x, y, x_mark, y_mark)
        if forecast.shape != truth.shape:
            raise ValueError(f"forecast shape {list(forecast.shape)} != truth {list(truth.shape)}")
        error = (forecast - truth).double()
        squared += float(error.pow(2).sum())
        absolute += float(error.abs().sum())
        count += error.numel()
        windows += x.shape[0]
        if example is None:
            example = (x[0, :, -1].cpu().numpy(), truth[0, :, -1].cpu().numpy(),
                       forecast[0, :, -1].float().cpu().numpy())
    if example is None:
        raise ValueError("evaluate: the loader yielded no window")
    return Evaluation(mse=squared / count, mae=absolute / count, windows=windows, example=example)


def train_step(model: Informer, optimizer: torch.optim.Optimizer, batch: Batch,
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


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _evenly_spaced(dataset: ForecastWindows, limit: int | None) -> torch.utils.data.Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    indices = np.linspace(0, len(dataset) - 1, limit).round().astype(int)
    return torch.utils.data.Subset(dataset, indices.tolist())


def save_figure(evaluation: Evaluation, path: Path, title: str) -> Path:
    """Input, truth and forecast of the target variable in the first test window."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    history, truth, forecast = evaluation.example
    past = np.arange(-len(history), 0)
    future = np.arange(len(truth))
    figure, axes = plt.subplots(figsize=(8, 3))
    axes.plot(past, history, color="0.4", label="input")
    axes.plot(future, truth, color="tab:blue", label="truth")
    axes.plot(future, forecast, color="tab:orange", label="forecast")
    axes.axvline(0, color="0.7", linewidth=0.8)
    axes.set_xlabel("step (0 = first forecast step)")
    axes.set_ylabel("standardised value")
    axes.set_title(title)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class TimeSeriesTask(Task):
    """Long time-series forecasting with an Informer backbone (CAB's LSTF task).

    Trains with MSE and Adam (learning rate halved after each epoch, early stopping on the
    validation MSE, the best epoch's weights tested), and reports the test MSE and MAE on
    standardised values for one seed; the runner averages seeds (:data:`PAPER_SEEDS`).
    """

    name = "time_series"
    roles = ROLES
    metrics = (
        Metric("mse", higher_is_better=False, description="test MSE, standardised values"),
        Metric("mae", higher_is_better=False, description="test MAE, standardised values"),
    )
    Config = TimeSeriesConfig

    @classmethod
    def check_settings(cls, config: TimeSeriesConfig) -> None:
        """The windows fit every split of the dataset's file, when the file is at hand (on a
        machine without it, the run checks as it reads)."""
        if config.label_len > config.seq_len:
            raise AttentionConfigError(f"task {cls.name}: label_len={config.label_len} must not exceed "
                                       f"seq_len={config.seq_len}")
        try:
            path = locate(config.dataset, config.data_dir)
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
        shape = split_heads(config.d_model, config.n_heads, f"task {cls.name}: d_model / n_heads")
        return dict.fromkeys(cls.roles, shape)

    def run(
        self,
        config: TimeSeriesConfig,
        attention: Mapping[str, AttentionChoice] | AttentionChoice,
        *,
        seed: int,
        device: str,
        workdir: Path,
    ) -> TaskResult:
        """Train and evaluate once (see :meth:`Task.run`)."""
        choices = resolve_attention(type(self), attention)
        if config.label_len > config.seq_len:
            raise ValueError(f"label_len={config.label_len} must not exceed "
                             f"seq_len={config.seq_len}")
        generator = _seed_everything(seed)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        data = prepare(config.dataset, features=config.features, seq_len=config.seq_len,
                       target=config.target, data_dir=config.data_dir)
        loaders = self._loaders(config, data, generator)
        model = Informer(self._shape(config, data), choices).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        output_dims = data.output_dims

        def forecaster(x: Tensor, y: Tensor, x_mark: Tensor, y_mark: Tensor) -> Tensor:
            return model(x, x_mark, y, y_mark)

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        losses: list[float] = []
        validation: list[float] = []
        best_state, best_val, stale, steps = None, math.inf, 0, 0
        for epoch in range(config.train_epochs):
            for batch in loaders["train"]:
                losses.append(train_step(model, optimizer, tuple(t.to(device) for t in batch),
                                         output_dims))
                steps += 1
                if config.max_train_steps is not None and steps >= config.max_train_steps:
                    break
            model.eval()
            val = evaluate(forecaster, loaders["val"], output_dims=output_dims,
                           pred_len=config.pred_len, device=device).mse
            validation.append(val)
            if val < best_val:
                best_val, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
            if stale >= config.patience or (
                config.max_train_steps is not None and steps >= config.max_train_steps
            ):
                break
            # Informer's "type1" schedule: after epoch e (from 0) the rate is lr * 0.5^e.
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * 0.5**epoch
        train_seconds = time.perf_counter() - started  # validation passes included
        peak = (torch.cuda.max_memory_allocated(device) / 2**20
                if device.startswith("cuda") else None)
        if best_state is None:
            raise FloatingPointError(f"validation MSE was never finite: {validation}")
        model.load_state_dict(best_state)
        torch.save(best_state, workdir / "checkpoint.pt")

        started = time.perf_counter()
        model.eval()
        test = evaluate(forecaster, loaders["test"], output_dims=output_dims,
                        pred_len=config.pred_len, device=device)
        eval_seconds = time.perf_counter() - started
        baseline = evaluate(persistence(output_dims, config.pred_len), loaders["test"],
                            output_dims=output_dims, pred_len=config.pred_len, device=device)
        label = "/".join(choices[role].label() for role in ROLES)
        figure = save_figure(test, workdir / "forecast.png",
                             f"{config.dataset}-{config.features} {data.columns[-1]}: {label}")
        return TaskResult(
            metrics={"mse": test.mse, "mae": test.mae},
            parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            attention_parameters=model.attention_parameters(),
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            peak_memory_mib=peak,
            extra={
                "persistence_mse": baseline.mse,
                "persistence_mae": baseline.mae,
                "validation_mse": validation,
                "train_loss": losses,
                "train_steps": steps,
                "test_windows": test.windows,
                "figure": str(figure),
                "attention": {role: {"name": c.name, "args": dict(c.args)}
                              for role, c in choices.items()},
                "config": asdict(config),
            },
        )

    @staticmethod
    def _shape(config: TimeSeriesConfig, data: PreparedData) -> InformerShape:
        return InformerShape(
            input_dims=len(data.columns), output_dims=data.output_dims,
            time_dims=n_time_features(dataset_spec(config.dataset).freq),
            pred_len=config.pred_len, d_model=config.d_model, n_heads=config.n_heads,
            e_layers=config.e_layers, d_layers=config.d_layers, d_ff=config.d_ff,
            dropout=config.dropout, distil=config.distil,
        )

    @staticmethod
    def _loaders(config: TimeSeriesConfig, data: PreparedData,
                 generator: torch.Generator) -> dict[str, DataLoader]:
        sizes = {"seq_len": config.seq_len, "label_len": config.label_len,
                 "pred_len": config.pred_len}
        train = ForecastWindows(data, "train", **sizes)
        loaders = {"train": DataLoader(train, batch_size=config.batch_size, shuffle=True,
                                       drop_last=len(train) > config.batch_size,
                                       generator=generator)}
        for split in ("val", "test"):
            windows = _evenly_spaced(ForecastWindows(data, split, **sizes),
                                     config.max_eval_windows)
            loaders[split] = DataLoader(windows, batch_size=config.batch_size, shuffle=False)
        return loaders


__all__ = ["PAPER_SEEDS", "PAPER_SETTINGS", "TimeSeriesConfig", "TimeSeriesTask"]
