"""Metrics of the forecasting task: MSE and MAE on standardised values, the persistence
baseline, and the forecast figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

Forecaster = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""(x, y, x_mark, y_mark) -> forecast [B, pred_len, output_dims]; must only read y[:, :label_len]."""


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
