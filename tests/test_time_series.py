"""The time-series forecasting task: Informer's splits, scaler and windows on the shipped ETTh1
CSV against hand-computed values, the metrics, the backbone's causality, training, refusal."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")

import pandas as pd
import torch
from torch.utils.data import DataLoader

from attention_zoo import AttentionConfigError, Pattern, attention_spec, list_attentions
from runners.execute import execute
from tasks.base import AttentionChoice, DatasetUnavailable
from tasks.registry import get_task
from tasks.time_series import data as ts_data
from tasks.time_series.data import ForecastWindows, prepare, split_borders, time_features
from tasks.time_series.metrics import evaluate, mae, mse, persistence
from tasks.time_series.model import ROLES, Informer, InformerShape
from tasks.time_series.task import TimeSeriesTask, train_step

pytestmark = pytest.mark.task

ETTH1 = Path(ts_data.__file__).parent / "samples" / "ETTh1.csv"
# ETT-hour: 12 / 4 / 4 months of 30 days.
TRAIN_ROWS, VAL_ROWS, TEST_ROWS = 12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24

FULL_ZOO = [name for name in list_attentions()
            if all(attention_spec(name).supports(p) for p in ROLES.values())]
# A cross attention that pools its queries (Nystrom landmarks, ProbSparse's top-u) lets later
# decoder positions reach earlier ones by design; the whole-decoder causality check keeps those
# whose cross attention is query by query, which is what supporting causal_cross declares.
QUERY_INDEPENDENT_ZOO = [name for name in FULL_ZOO if attention_spec(name).supports("causal_cross")]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation (and stalls badly on a
    shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _independent_scaled(features: str) -> np.ndarray:
    """ETTh1 standardised with the training rows' mean and population std, by pandas alone."""
    frame = pd.read_csv(ETTH1)
    columns = ["OT"] if features == "S" else list(frame.columns[1:])
    train = frame[columns].iloc[:TRAIN_ROWS]
    return ((frame[columns] - train.mean()) / train.std(ddof=0)).to_numpy()


def test_task_is_registered_with_its_roles():
    assert get_task("time_series") is TimeSeriesTask
    assert TimeSeriesTask.roles == {"encoder_self": Pattern.NONCAUSAL_SELF,
                                    "decoder_self": Pattern.CAUSAL_SELF,
                                    "cross": Pattern.NONCAUSAL_CROSS}


def test_ett_hour_splits_are_informers_months():
    data = prepare("ETTh1", features="M", seq_len=96)
    assert data.borders == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    assert split_borders(69680, 96, "ett_minute") == {
        "train": (0, 34560), "val": (34464, 46080), "test": (45984, 57600)}
    # ECL: 26,304 rows -> 18,412 / 2,632 / 5,260 (70 / 10 / 20 %, rounded down, rest to val).
    assert split_borders(26304, 336, "ratio") == {
        "train": (0, 18412), "val": (18076, 21044), "test": (20708, 26304)}
    with pytest.raises(ValueError, match="seq_len=9000 is longer than the training split"):
        split_borders(17420, 9000, "ett_hour")


@pytest.mark.parametrize("features", ["M", "S"])
def test_scaler_is_fitted_on_the_training_split_only(features):
    data = prepare("ETTh1", features=features, seq_len=96)
    expected = _independent_scaled(features)
    np.testing.assert_allclose(data.values, expected, rtol=0, atol=1e-10)
    assert data.columns[-1] == "OT" and data.output_dims == (7 if features == "M" else 1)
    train = data.values[:TRAIN_ROWS]
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-10)
    test = data.values[TRAIN_ROWS + VAL_ROWS:TRAIN_ROWS + VAL_ROWS + TEST_ROWS]
    assert np.abs(test.mean(axis=0)).max() > 0.1  # fitted on all rows, this would be ~0


def test_time_features_by_hand():
    dates = pd.DatetimeIndex(["2016-07-01 00:00:00", "2016-12-31 23:45:00"])
    hourly = time_features(dates, "h")
    # 2016-07-01 is a Friday (dayofweek 4), day 183 of the leap year 2016.
    np.testing.assert_allclose(hourly[0], [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5])
    # 2016-12-31 23:45 is a Saturday, day 366.
    np.testing.assert_allclose(hourly[1], [0.5, 5 / 6 - 0.5, 30 / 30 - 0.5, 365 / 365 - 0.5])
    quarter = time_features(dates, "15min")
    np.testing.assert_allclose(quarter[:, 0], [-0.5, 45 / 59 - 0.5])
    np.testing.assert_allclose(quarter[:, 1:], hourly)


def test_windows_are_cut_like_informers():
    data = prepare("ETTh1", features="M", seq_len=96)
    windows = ForecastWindows(data, "test", seq_len=96, label_len=48, pred_len=24)
    assert len(windows) == (TEST_ROWS + 96) - 96 - 24 + 1
    x, y, x_mark, y_mark = windows[5]
    start = TRAIN_ROWS + VAL_ROWS - 96 + 5
    np.testing.assert_allclose(x.numpy(), data.values[start:start + 96], atol=1e-6)
    np.testing.assert_allclose(y.numpy(), data.values[start + 48:start + 96 + 24], atol=1e-6)
    assert x_mark.shape == (96, 4) and y_mark.shape == (72, 4)


def test_perfect_forecast_has_zero_error():
    data = prepare("ETTh1", features="M", seq_len=96)
    loader = DataLoader(ForecastWindows(data, "test", seq_len=96, label_len=48, pred_len=24),
                        batch_size=256)
    result = evaluate(lambda x, y, xm, ym: y[:, -24:].clone(), loader, output_dims=7, pred_len=24)
    assert result.mse == 0.0 and result.mae == 0.0
    assert result.windows == TEST_ROWS - 24 + 1
    truth = torch.randn(3, 24, 7)
    assert mse(truth, truth) == 0.0 and mae(truth, truth) == 0.0
    assert mse(truth + 0.5, truth) == pytest.approx(0.25) and mae(truth - 2, truth) == 2.0


@pytest.mark.parametrize("features", ["S", "M"])
def test_persistence_baseline_matches_an_independent_computation(features):
    seq_len, label_len, pred_len = 96, 48, 24
    scaled = _independent_scaled(features)
    rows = scaled[TRAIN_ROWS + VAL_ROWS - seq_len:TRAIN_ROWS + VAL_ROWS + TEST_ROWS]
    count = len(rows) - seq_len - pred_len + 1
    last = rows[seq_len - 1:seq_len - 1 + count]  # [N, C]: last input step of each window
    futures = np.stack([rows[seq_len + h:seq_len + h + count] for h in range(pred_len)], axis=1)
    expected_mse = float(np.mean((futures - last[:, None]) ** 2))
    expected_mae = float(np.mean(np.abs(futures - last[:, None])))

    data = prepare("ETTh1", features=features, seq_len=seq_len)
    loader = DataLoader(ForecastWindows(data, "test", seq_len=seq_len, label_len=label_len,
                                        pred_len=pred_len), batch_size=128)
    result = evaluate(persistence(data.output_dims, pred_len), loader,
                      output_dims=data.output_dims, pred_len=pred_len)
    assert result.windows == count
    assert result.mse == pytest.approx(expected_mse, rel=1e-5)
    assert result.mae == pytest.approx(expected_mae, rel=1e-5)


def _tiny_model(name: str, pred_len: int = 12, dropout: float = 0.0) -> Informer:
    shape = InformerShape(input_dims=7, output_dims=7, time_dims=4, pred_len=pred_len,
                          d_model=16, n_heads=2, e_layers=2, d_layers=2, d_ff=32, dropout=dropout)
    return Informer(shape, dict.fromkeys(ROLES, AttentionChoice(name)))


@pytest.mark.parametrize("name", QUERY_INDEPENDENT_ZOO)
def test_decoder_self_attention_does_not_see_the_future(name):
    model = _tiny_model(name).eval().double()  # float64: equal prefixes agree to rounding
    x = torch.randn(2, 36, 16, dtype=torch.float64)  # decoder input embeddings [B, Ld, E]
    memory = torch.randn(2, 24, 16, dtype=torch.float64)  # encoder output [B, Le, E]
    t = 20
    changed = x.clone()
    changed[:, t:] = torch.randn(2, 36 - t, 16, dtype=torch.float64)
    with torch.no_grad():
        outputs = []
        for decoder_input in (x, changed):
            torch.manual_seed(0)  # a sampling mechanism draws the same samples in both passes
            outputs.append(model.decoder(decoder_input, memory))
    torch.testing.assert_close(outputs[0][:, :t], outputs[1][:, :t], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(outputs[0][:, t:], outputs[1][:, t:], atol=1e-3)
    # Cross attention is not causal: the last encoder position reaches the first decoder step.
    moved = memory.clone()
    moved[:, -1] += 3.0
    with torch.no_grad():
        torch.manual_seed(0)
        reached = model.decoder(x, moved)
    assert not torch.allclose(reached[:, 0], outputs[0][:, 0], atol=1e-4)


@pytest.mark.parametrize("name", ["softmax", "lavo"])
def test_the_forecast_never_reads_the_truth(name):
    model = _tiny_model(name, pred_len=12).eval()
    x, x_mark = torch.randn(2, 48, 7), torch.randn(2, 48, 4)
    y, y_mark = torch.randn(2, 24 + 12, 7), torch.randn(2, 24 + 12, 4)
    other = y.clone()
    other[:, 24:] = torch.randn(2, 12, 7)  # the values to forecast
    with torch.no_grad():
        forecasts = [model(x, x_mark, target, y_mark) for target in (y, other)]
    torch.testing.assert_close(forecasts[0], forecasts[1], rtol=0, atol=0)
    changed_start = y.clone()
    changed_start[:, 23] += 1.0  # the last start-token step does matter
    with torch.no_grad():
        assert not torch.allclose(model(x, x_mark, changed_start, y_mark), forecasts[0])


@pytest.mark.parametrize("name", ["softmax", "lavo"])
@pytest.mark.slow
def test_informer_trains(name):
    data = prepare("ETTh1", features="M", seq_len=48)
    windows = ForecastWindows(data, "train", seq_len=48, label_len=24, pred_len=12)
    batch = next(iter(DataLoader(windows, batch_size=8, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))))
    model = _tiny_model(name, pred_len=12, dropout=0.05)
    x, y, x_mark, y_mark = batch

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return mse(model(x, x_mark, y, y_mark), y[:, -12:])

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = loss()
    for _ in range(15):
        train_step(model, optimizer, batch, output_dims=7)
    after = loss()
    assert math.isfinite(after) and after < 0.7 * before
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["sdpa", "lavo"])
@pytest.mark.slow
def test_run_trains_and_evaluates(name, tmp_path):
    task = TimeSeriesTask
    config = task.make_config({"seq_len": 48, "label_len": 24, "pred_len": 12, "d_model": 16,
                               "heads": 2, "d_ff": 32, "batch_size": 16,
                               "steps": 4, "max_eval_windows": 48})
    result = execute(task, config, {role: AttentionChoice(name) for role in ROLES}, seed=1,
                     device="cpu", workdir=tmp_path / "run")
    assert set(result.metrics) == {"mse", "mae"}
    assert all(math.isfinite(v) and v > 0 for v in result.metrics.values())
    assert result.extra["train_steps"] == 4 and result.extra["test_windows"] == 48
    assert math.isfinite(result.extra["persistence_mse"])
    assert result.parameters > result.attention_parameters >= 0
    figure = Path(result.extra["figure"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_paper_settings_are_cabs():
    horizons = {"ETTh1": 720, "ETTh2": 720, "ETTm1": 672, "ECL": 960, "WTH": 720}
    parts = TimeSeriesTask.preset("paper").parts
    assert [part.seeds for part in parts] == [(0, 1, 2, 3, 4), (0, 1, 2)]  # CAB: 5 on ETT, 3 on the rest
    settings = [TimeSeriesTask.make_config(v) for part in parts for v in part.settings]
    assert sorted(f"{c.dataset}-{c.features}" for c in settings) == sorted(
        f"{d}-{f}" for d in horizons for f in "MS")
    for config in settings:
        assert config.pred_len == horizons[config.dataset], config
        assert 96 <= config.seq_len <= 720 and config.label_len <= config.seq_len
        assert (config.d_model, config.heads, config.d_ff) == (512, 8, 2048)
        assert config.steps is None and config.max_eval_windows is None


def test_bad_settings_name_the_valid_choices(tmp_path, monkeypatch):
    with pytest.raises(AttentionConfigError, match="cannot read 'ETTh3' as 'dataset' \\('ETTh1'"):
        TimeSeriesTask.make_config({"dataset": "ETTh3"})
    with pytest.raises(AttentionConfigError, match="unknown target 'oil'; columns: HUFL"):
        prepare("ETTh1", features="S", seq_len=96, target="oil")
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="attnbench data fetch ett"):
        prepare("ETTm1", features="M", seq_len=96)


def test_fetchers_write_informers_layout(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2"):
        pd.read_csv(ETTH1, nrows=5).to_csv(source / f"{name}.csv", index=False)
    monkeypatch.setattr(ts_data, "ETT_URL", source.as_uri() + "/{name}.csv")
    ett = ts_data.fetch_ett(tmp_path / "ett")
    assert sorted(p.name for p in ett.iterdir()) == [f"{n}.csv" for n in
                                                     ("ETTh1", "ETTh2", "ETTm1", "ETTm2")]

    rows = np.arange(3 * 321, dtype=float).reshape(3, 321)
    with gzip.open(source / "electricity.txt.gz", "wt") as stream:
        stream.write("\n".join(",".join(f"{v:.1f}" for v in row) for row in rows) + "\n")
    monkeypatch.setattr(ts_data, "ECL_URL", (source / "electricity.txt.gz").as_uri())
    ecl = pd.read_csv(ts_data.fetch_ecl(tmp_path / "ecl") / "ECL.csv")
    assert list(ecl.columns[:3]) == ["date", "MT_000", "MT_001"] and ecl.columns[-1] == "MT_320"
    assert list(ecl["date"]) == ["2012-01-01 00:00:00", "2012-01-01 01:00:00",
                                 "2012-01-01 02:00:00"]
    np.testing.assert_array_equal(ecl.iloc[:, 1:].to_numpy(), rows)

    monkeypatch.delenv("ATTNBENCH_WEATHER_URL", raising=False)
    with pytest.raises(DatasetUnavailable, match="set ATTNBENCH_WEATHER_URL"):
        ts_data.fetch_weather(tmp_path / "weather")
    monkeypatch.setenv("ATTNBENCH_WEATHER_URL", (source / "ETTh1.csv").as_uri())
    assert (ts_data.fetch_weather(tmp_path / "weather") / "WTH.csv").is_file()
