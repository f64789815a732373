"""Long time-series forecasting (CAB's LSTF task): Informer on ETT, ECL and Weather."""

from tasks.time_series.task import PAPER_SEEDS, PAPER_SETTINGS, TimeSeriesConfig, TimeSeriesTask

__all__ = ["PAPER_SEEDS", "PAPER_SETTINGS", "TimeSeriesConfig", "TimeSeriesTask"]
