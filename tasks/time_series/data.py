"""Long time-series forecasting data in Informer's format: files, splits, scaling, time features,
forecasting windows, and the download commands (``attnbench data fetch ett|ecl|weather``).

Everything here follows Informer2020 (Zhou et al., AAAI 2021) so that numbers are comparable:

- Splits: ETT-hour takes 12/4/4 months of 30 days (8640/2880/2880 rows); ETT-minute the same
  months in 15-minute steps (x4); ECL and Weather 70/10/20 % of the rows. The validation and
  test windows start ``seq_len`` rows before their split so that their first forecast is the
  first row of the split.
- Scaling: a standard scaler (mean, population std) fitted on the training split only, applied
  to every split; metrics are computed on these standardised values.
- Time features (Informer's ``timeF``): calendar fields scaled to [-0.5, 0.5]; hourly data uses
  hour of day, day of week, day of month, day of year; 15-minute data adds minute of hour.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attention_zoo import AttentionConfigError
from tasks.base import DataError, DatasetUnavailable

SAMPLES = Path(__file__).parent / "samples"
Split = Literal["train", "val", "test"]
Features = Literal["M", "S", "MS"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset in Informer's format.

    Attributes:
        file: the CSV file name (a ``date`` column, then one column per variable).
        target: the variable forecast in univariate (``S``) and ``MS`` mode.
        freq: ``"h"`` hourly or ``"15min"``.
        split: ``"ett_hour"``, ``"ett_minute"`` (fixed months) or ``"ratio"`` (70/10/20).
        fetch: the ``attnbench data fetch`` name that downloads it.
    """

    file: str
    target: str
    freq: Literal["h", "15min"]
    split: Literal["ett_hour", "ett_minute", "ratio"]
    fetch: str


DATASETS: dict[str, DatasetSpec] = {
    "ETTh1": DatasetSpec("ETTh1.csv", "OT", "h", "ett_hour", "ett"),
    "ETTh2": DatasetSpec("ETTh2.csv", "OT", "h", "ett_hour", "ett"),
    "ETTm1": DatasetSpec("ETTm1.csv", "OT", "15min", "ett_minute", "ett"),
    "ETTm2": DatasetSpec("ETTm2.csv", "OT", "15min", "ett_minute", "ett"),
    "ECL": DatasetSpec("ECL.csv", "MT_320", "h", "ratio", "ecl"),
    "WTH": DatasetSpec("WTH.csv", "WetBulbCelsius", "h", "ratio", "weather"),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; unknown names list the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise AttentionConfigError(
            f"unknown time-series dataset {name!r}; valid: {', '.join(DATASETS)}"
        ) from None


def locate(name: str, data_dir: str | Path | None = None) -> Path:
    """The CSV of dataset ``name``: in ``data_dir`` if given, else the shipped sample (ETTh1,
    ETTh2), else where ``attnbench data fetch`` puts it (``$ATTNBENCH_DATA/<fetch name>``)."""
    from tasks.base import data_root

    spec = dataset_spec(name)
    if data_dir is not None:
        candidates = [Path(data_dir) / spec.file]
    else:
        candidates = [SAMPLES / spec.file, data_root() / spec.fetch / spec.file]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name}: {spec.file} not found (looked in {', '.join(str(p.parent) for p in candidates)}); "
        f"download it with `attnbench data fetch {spec.fetch}`"
    )


def split_borders(n_rows: int, seq_len: int, kind: str) -> dict[Split, tuple[int, int]]:
    """Row ranges [start, end) of the train, validation and test windows (Informer's borders).

    The validation and test ranges begin ``seq_len`` rows early: those rows are only the input
    of the first window, never a forecast target.
    """
    if kind in ("ett_hour", "ett_minute"):
        month = 30 * 24 * (4 if kind == "ett_minute" else 1)
        train, val, test = 12 * month, 4 * month, 4 * month
        if train + val + test > n_rows:
            raise ValueError(f"{kind} needs {train + val + test} rows, the file has {n_rows}")
    elif kind == "ratio":
        train, test = int(n_rows * 0.7), int(n_rows * 0.2)
        val = n_rows - train - test
    else:
        raise ValueError(f"unknown split kind {kind!r}; valid: ett_hour, ett_minute, ratio")
    borders: dict[Split, tuple[int, int]] = {
        "train": (0, train),
        "val": (train - seq_len, train + val),
        "test": (train + val - seq_len, train + val + test),
    }
    if borders["val"][0] < 0:
        raise ValueError(f"seq_len={seq_len} is longer than the training split ({train} rows)")
    return borders


class StandardScaler:
    """Per-variable standardisation, (x - mean) / std with the population std (as sklearn's).

    A constant variable (std 0) is only centred.
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, values: np.ndarray) -> StandardScaler:
        """values: [T, C]."""
        self.mean = values.mean(axis=0)
        std = values.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("StandardScaler.transform called before fit")
        return (values - self.mean) / self.std

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("StandardScaler.inverse_transform called before fit")
        return values * self.std + self.mean


def time_features(dates: pd.DatetimeIndex, freq: str) -> np.ndarray:
    """Informer's ``timeF`` encoding: [T, F] calendar fields scaled to [-0.5, 0.5].

    Hourly (``"h"``): hour of day, day of week, day of month, day of year (F = 4);
    ``"15min"`` puts minute of hour first (F = 5).
    """
    fields = [
        dates.hour / 23.0 - 0.5,
        dates.day_of_week / 6.0 - 0.5,
        (dates.day - 1) / 30.0 - 0.5,
        (dates.day_of_year - 1) / 365.0 - 0.5,
    ]
    if freq == "15min":
        fields.insert(0, dates.minute / 59.0 - 0.5)
    elif freq != "h":
        raise ValueError(f"unknown frequency {freq!r}; valid: h, 15min")
    return np.stack([np.asarray(f, dtype=np.float64) for f in fields], axis=1)


def n_time_features(freq: str) -> int:
    return 5 if freq == "15min" else 4


@dataclass
class PreparedData:
    """A dataset read, split and scaled.

    Attributes:
        values: [T, C] standardised variables of the whole file (target last).
        marks: [T, F] time features.
        columns: the variable names, in the order of ``values``.
        borders: row ranges of the splits (see :func:`split_borders`).
        scaler: fitted on the training rows.
        output_dims: how many trailing variables are forecast (C for M, 1 for S and MS).
    """

    values: np.ndarray
    marks: np.ndarray
    columns: list[str]
    borders: dict[Split, tuple[int, int]]
    scaler: StandardScaler
    output_dims: int


def count_rows(path: Path) -> int:
    """Data rows of a CSV file (its lines but the header), without parsing it."""
    lines, last = 0, b"\n"
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return max(0, lines + (last != b"\n") - 1)


def read_series(path: Path) -> pd.DataFrame:
    """A time-series CSV: a ``date`` column (parsed) and numeric variables, every value finite;
    a :class:`DataError` names the file, the line and the column of the first bad value."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a CSV table ({error})") from None
    if "date" not in frame.columns:
        raise DataError(f"{path}: no 'date' column (columns: {', '.join(frame.columns)}); "
                        "a time series file has a 'date' column and one column per variable")
    if len(frame.columns) < 2:
        raise DataError(f"{path}: no variable besides 'date'")
    dates = pd.to_datetime(frame["date"], errors="coerce")
    if dates.isna().any():
        row = int(dates.isna().to_numpy().argmax())
        raise DataError(f"{path}: line {row + 2}, column 'date': {frame['date'].iloc[row]!r} is not a "
                        "date (or not in the format of the first rows)")
    values = {}
    for column in frame.columns.drop("date"):
        numbers = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=np.float64))
        if bad.any():
            row = int(bad.argmax())
            text = frame[column].iloc[row]
            hint = " (a decimal comma? numbers use '.')" if "," in text else ""
            raise DataError(f"{path}: line {row + 2}, column {column!r}: {text!r} is not a finite "
                            f"number{hint}")
        values[column] = numbers.astype(np.float64)
    return pd.DataFrame({"date": dates, **values})


def prepare(
    name: str,
    *,
    features: Features,
    seq_len: int,
    target: str | None = None,
    data_dir: str | Path | None = None,
) -> PreparedData:
    """Read dataset ``name``, choose its variables, split it and scale it.

    ``features``: ``M`` multivariate in and out, ``S`` the target alone, ``MS`` every variable
    in and the target out. The target is moved last, as Informer does.
    """
    spec = dataset_spec(name)
    if features not in ("M", "S", "MS"):
        raise AttentionConfigError(f"unknown features {features!r}; valid: M, S, MS")
    frame = read_series(locate(name, data_dir))
    target = target or spec.target
    if target not in frame.columns:
        raise AttentionConfigError(
            f"{name}: unknown target {target!r}; columns: {', '.join(frame.columns[1:])}"
        )
    others = [c for c in frame.columns if c not in ("date", target)]
    columns = [target] if features == "S" else [*others, target]
    raw = frame[columns].to_numpy(dtype=np.float64)  # [T, C]
    borders = split_borders(len(frame), seq_len, spec.split)
    train_start, train_end = borders["train"]
    scaler = StandardScaler().fit(raw[train_start:train_end])
    marks = time_features(pd.DatetimeIndex(frame["date"]), spec.freq)
    return PreparedData(
        values=scaler.transform(raw),
        marks=marks,
        columns=columns,
        borders=borders,
        scaler=scaler,
        output_dims=len(columns) if features == "M" else 1,
    )


class ForecastWindows(Dataset):
    """The sliding windows of one split, as Informer cuts them.

    Window i: encoder input rows [i, i + seq_len); decoder rows [i + seq_len - label_len,
    i + seq_len + pred_len): the last ``label_len`` known rows (the start token) followed by
    the ``pred_len`` rows to forecast. Items are ``(x, y, x_mark, y_mark)``:
    x [seq_len, C], y [label_len + pred_len, C], x_mark [seq_len, F], y_mark [.., F].
    """

    def __init__(
        self, data: PreparedData, split: Split, *, seq_len: int, label_len: int, pred_len: int
    ) -> None:
        if label_len > seq_len:
            raise ValueError(f"label_len={label_len} must not exceed seq_len={seq_len}")
        start, end = data.borders[split]
        self.values = torch.as_tensor(data.values[start:end], dtype=torch.float32)  # [T, C]
        self.marks = torch.as_tensor(data.marks[start:end], dtype=torch.float32)  # [T, F]
        self.seq_len, self.label_len, self.pred_len = seq_len, label_len, pred_len
        self.length = len(self.values) - seq_len - pred_len + 1
        if self.length < 1:
            raise ValueError(
                f"the {split} split ({end - start} rows) is too short for seq_len={seq_len} "
                f"+ pred_len={pred_len}"
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        encoder_end = index + self.seq_len
        decoder_start = encoder_end - self.label_len
        decoder_end = encoder_end + self.pred_len
        return (
            self.values[index:encoder_end],
            self.values[decoder_start:decoder_end],
            self.marks[index:encoder_end],
            self.marks[decoder_start:decoder_end],
        )


# Downloads. The ETT files come from the ETDataset repository (CC BY-ND 4.0). Informer's ECL.csv
# holds the 321-client hourly electricity series of LSTNet's repository (26,304 rows); it is
# written here in Informer's layout. Informer's WTH.csv is only distributed through the cloud
# folders linked from the Informer2020 README, which cannot be downloaded without a browser.
ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{name}.csv"
ECL_URL = (
    "https://raw.githubusercontent.com/laiguokun/multivariate-time-series-data/master/"
    "electricity/electricity.txt.gz"
)
ECL_START = "2012-01-01 00:00:00"
WEATHER_URL_VARIABLE = "ATTNBENCH_WEATHER_URL"


def _download(url: str, path: Path) -> Path:
    """Download ``url`` to ``path`` atomically (a partial download never takes its place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, part)
        except BaseException:
            Path(part.name).unlink(missing_ok=True)
            raise
    os.replace(part.name, path)
    return path


def fetch_ett(destination: Path) -> Path:
    """``attnbench data fetch ett``: ETTh1, ETTh2, ETTm1, ETTm2 from the ETDataset repository."""
    for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2"):
        target = destination / f"{name}.csv"
        if not target.is_file():
            _download(ETT_URL.format(name=name), target)
    return destination


def fetch_ecl(destination: Path) -> Path:
    """``attnbench data fetch ecl``: ECL.csv in Informer's layout (``date``, MT_000..MT_320,
    hourly from 2012-01-01), built from LSTNet's electricity.txt.gz."""
    target = destination / "ECL.csv"
    if target.is_file():
        return destination
    archive = _download(ECL_URL, destination / "electricity.txt.gz")
    with gzip.open(archive, "rt") as stream:
        values = pd.read_csv(stream, header=None)
    values.columns = [f"MT_{i:03d}" for i in range(values.shape[1])]
    dates = pd.Series(pd.date_range(ECL_START, periods=len(values), freq="h"), name="date")
    values = pd.concat([dates, values], axis=1)
    partial = target.with_suffix(".csv.part")
    values.to_csv(partial, index=False)
    os.replace(partial, target)
    archive.unlink()
    return destination


def fetch_weather(destination: Path) -> Path:
    """``attnbench data fetch weather``: Informer's WTH.csv from the URL in
    ``$ATTNBENCH_WEATHER_URL`` (a direct link to the file you obtained from the Informer2020
    README's data folder, or a ``file://`` path)."""
    target = destination / "WTH.csv"
    if target.is_file():
        return destination
    url = os.environ.get(WEATHER_URL_VARIABLE)
    if not url:
        raise DatasetUnavailable(
            "weather: Informer's WTH.csv is only published in the cloud folders linked from "
            "https://github.com/zhouhaoyi/Informer2020 (README, Data); set "
            f"{WEATHER_URL_VARIABLE} to a direct link or file:// path to WTH.csv and run again"
        )
    _download(url, target)
    return destination
