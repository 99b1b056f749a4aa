"""Zero-shot protocol: hand-computed metrics, split borders / window counts, baselines, real
benchmark files, outputs (JSON/CSV/PNG), MLflow logging and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.baselines import LastValue, SeasonalNaive, TrainMean, make_baseline
from pipeline.evaluation.benchmark_data import infer_period, load_benchmark, split_borders
from pipeline.evaluation.protocol import EvalConfig, evaluate, log_to_mlflow, plot_forecasts, window_starts

REPO = Path(__file__).resolve().parents[1]


def write_csv(folder: Path, name: str, values_TC: np.ndarray, freq: str = "h", columns=None) -> Path:
    cols = columns or [f"c{i}" for i in range(values_TC.shape[1])]
    df = pd.DataFrame(values_TC, columns=cols)
    df.insert(0, "date", pd.date_range("2020-01-01", periods=len(df), freq=freq).strftime("%Y-%m-%d %H:%M:%S"))
    path = folder / f"{name}.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    """20 hourly rows: train = rows 0..13 (0,2,0,2,...: mean 1, std 1), test = rows 16..19.
    Channel c1 is constant 5 (std 0 -> scale 1, scaled 0)."""
    c0 = np.array([0, 2] * 8 + [1, 3, 5, 2], dtype=float)  # rows 14, 15 = 0, 2
    c1 = np.full(20, 5.0)
    write_csv(tmp_path, "toy", np.stack([c0, c1], axis=1))
    return tmp_path


def test_hand_computed_metrics(toy_dir: Path):
    # scaled c0 test rows 16..19 = 0, 2, 4, 1; row 15 = 1. Naive, H=1, released window count:
    # t=16: pred 1 truth 0; t=17: pred 0 truth 2; t=18: pred 2 truth 4 -> c0 sq errors 1,4,4; c1 zeros.
    cfg = EvalConfig(datasets=["toy"], horizons=[1], context=2, progress=False)
    r = evaluate(LastValue(), toy_dir, cfg).rows[0]
    assert r.windows == 6 and r.points == 6
    assert r.mse == pytest.approx(9 / 6) and r.mae == pytest.approx(5 / 6)
    # counting the last possible window adds t=19: pred 4 truth 1 (error 3) and a c1 zero
    cfg.include_last_window = True
    r = evaluate(LastValue(), toy_dir, cfg).rows[0]
    assert r.windows == 8
    assert r.mse == pytest.approx(18 / 8) and r.mae == pytest.approx(8 / 8)
    # train mean = 0 on scaled data: truths 0,2,4 (+ zeros for c1)
    cfg.include_last_window = False
    r = evaluate(TrainMean(), toy_dir, cfg).rows[0]
    assert r.mse == pytest.approx(20 / 6) and r.mae == pytest.approx(6 / 6)


def _reference(ds_path: Path, name: str, fc, horizon: int, context: int, stride: int, include_last: bool):
    """Slow independent reference: per channel, per window, explicit loops."""
    df = pd.read_csv(ds_path)
    vals = df.iloc[:, 1:].to_numpy(float)
    n = len(vals)
    b = split_borders(name, n)
    sq, ab, cnt = 0.0, 0.0, 0
    for c in range(vals.shape[1]):
        train = vals[b.train[0] : b.train[1], c]
        mu, sd = train.mean(), train.std()
        sd = sd if sd > 0 else 1.0
        x = (vals[:, c] - mu) / sd
        last = b.test[1] - horizon if include_last else b.test[1] - horizon - 1
        t = b.test[0]
        while t <= last:
            ctx = x[max(0, t - context) : t]
            pred = fc.forecast([ctx], horizon)[0]
            for k in range(horizon):
                e = pred[k] - x[t + k]
                sq += e * e
                ab += abs(e)
                cnt += 1
            t += stride
    return sq / cnt, ab / cnt, cnt


class _Damped:
    """Not a baseline: decays the mean of the last 5 context values towards 0."""

    name = "damped"

    def forecast(self, series, horizon):
        last5 = np.stack([np.asarray(s)[-5:] for s in series]).mean(axis=1, keepdims=True)
        return last5 * 0.9 ** np.arange(1, horizon + 1)[None, :]


@pytest.mark.parametrize("stride,include_last", [(1, False), (3, True)])
def test_matches_slow_reference(tmp_path: Path, stride: int, include_last: bool):
    rng = np.random.default_rng(0)
    vals = np.cumsum(rng.normal(size=(300, 3)), axis=0) * [1, 10, 0.1] + [0, 100, -5]
    path = write_csv(tmp_path, "walk", vals)
    cfg = EvalConfig(datasets=["walk"], horizons=[7], context=20, stride=stride, batch_size=13,
                     include_last_window=include_last, progress=False)
    r = evaluate(_Damped(), tmp_path, cfg).rows[0]
    mse, mae, cnt = _reference(path, "walk", _Damped(), 7, 20, stride, include_last)
    assert r.points == cnt
    assert r.mse == pytest.approx(mse, rel=1e-10) and r.mae == pytest.approx(mae, rel=1e-10)


def test_context_before_row_zero_is_trimmed(tmp_path: Path):
    """A context longer than the rows before the test start is handed over shorter, not wrapped."""
    rng = np.random.default_rng(1)
    path = write_csv(tmp_path, "short", rng.normal(size=(50, 2)))
    cfg = EvalConfig(datasets=["short"], horizons=[3], context=45, progress=False)
    r = evaluate(_Damped(), tmp_path, cfg).rows[0]
    mse, mae, cnt = _reference(path, "short", _Damped(), 3, 45, 1, False)
    assert r.points == cnt and r.mse == pytest.approx(mse, rel=1e-10)


def test_seasonal_naive_exact_on_periodic_series(tmp_path: Path):
    t = np.arange(3000)
    base = np.sin(2 * np.pi * t / 24) + 0.5 * np.cos(2 * np.pi * 3 * t / 24)
    write_csv(tmp_path, "periodic", np.stack([base, 3 * base + 7], axis=1), freq="h")
    cfg = EvalConfig(datasets=["periodic"], horizons=[48, 100], context=96, stride=5, progress=False)
    res = evaluate(SeasonalNaive(), tmp_path, cfg)
    assert all(r.mse < 1e-20 and r.mae < 1e-10 for r in res.rows)
    # the naive baseline is far from exact on the same data (the test can fail)
    assert evaluate(LastValue(), tmp_path, cfg).rows[0].mse > 0.1


@pytest.mark.parametrize("freq,period", [("h", 24), ("15min", 96), ("10min", 144), ("D", 7), ("7D", 52),
                                         ("MS", 12), ("30min", 48)])
def test_infer_period(freq: str, period: int):
    assert infer_period(pd.date_range("2020-01-01", periods=50, freq=freq)) == period


def test_paper_borders_and_window_counts():
    etth = split_borders("ETTh1", 17420)
    assert (etth.train, etth.val, etth.test) == ((0, 8640), (8640, 11520), (11520, 14400))
    ettm = split_borders("ETTm2", 69680)
    assert ettm.test == (46080, 57600)
    assert len(window_starts(etth.test, 96)) == 2784  # released code: skips the last window
    assert len(window_starts(etth.test, 96, include_last=True)) == 2785
    assert len(window_starts(etth.test, 720)) == 2160
    assert len(window_starts(ettm.test, 96)) == 11424
    assert len(window_starts(etth.test, 96, stride=100)) == 28
    other = split_borders("weather", 52696)  # 70/10/20 with int() like the released code
    assert other.train == (0, 36887) and other.test == (52696 - 10539, 52696)
    with pytest.raises(ValueError, match="ETTh1.*14400 rows.*1000"):
        split_borders("ETTh1", 1000)


def test_real_benchmark_files(shared_data: Path):
    bench = shared_data / "benchmarks"
    expect = {"ETTh1": (17420, 7), "ETTm1": (69680, 7), "weather": (52696, 21),
              "exchange_rate": (7588, 8), "national_illness": (966, 7)}
    for name, (rows, chans) in expect.items():
        ds = load_benchmark(bench, name)
        assert ds.values_TC.shape == (rows, chans), name
        assert np.isfinite(ds.values_TC).all()
    assert load_benchmark(bench, "weather").channels[-1] == "OT"  # CRLF did not leak into names
    assert infer_period(load_benchmark(bench, "weather").timestamps) == 144
    assert infer_period(load_benchmark(bench, "exchange_rate").timestamps) == 7
    assert infer_period(load_benchmark(bench, "national_illness").timestamps) == 52
    assert infer_period(load_benchmark(bench, "ETTm2").timestamps) == 96


def test_full_protocol_etth1_naive(shared_data: Path):
    """Stride-1 ETTh1 at H=96 with the paper's 512 context: 2784 windows per channel."""
    cfg = EvalConfig(datasets=["ETTh1"], horizons=[96], progress=False)
    res = evaluate(LastValue(), shared_data / "benchmarks", cfg)
    r = res.rows[0]
    assert r.context == 512 and r.windows == 2784 * 7 and r.points == 2784 * 7 * 96
    # the naive forecast is a weak but sane baseline on scaled ETTh1 (Time-MoE gets ~0.35 here)
    assert 0.5 < r.mse < 3.0 and 0.4 < r.mae < 1.5
    sn = evaluate(make_baseline("seasonal_naive"), shared_data / "benchmarks", cfg).rows[0]
    assert sn.mse != r.mse


def test_bad_inputs_name_the_file(tmp_path: Path):
    (tmp_path / "bad.csv").write_text("date,a,b\n2020-01-01,1,x\n2020-01-02,2,y\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*\['b'\].*not numeric"):
        load_benchmark(tmp_path, "bad")
    (tmp_path / "gap.csv").write_text("date,a\n2020-01-01,1\n2020-01-02,\n")
    with pytest.raises(ValueError, match=r"gap\.csv.*\['a'\].*missing"):
        load_benchmark(tmp_path, "gap")
    with pytest.raises(FileNotFoundError, match=r"nope.*found: \['bad', 'gap'\]"):
        load_benchmark(tmp_path, "nope")
    write_csv(tmp_path, "walk", np.random.default_rng(0).normal(size=(60, 2)))

    class WrongShape:
        def forecast(self, series, horizon):
            return np.zeros((1, horizon))

    with pytest.raises(ValueError, match=r"WrongShape\.forecast returned shape \(1, 2\)"):
        evaluate(WrongShape(), tmp_path, EvalConfig(datasets=["walk"], horizons=[2], context=3, progress=False))


def test_outputs_and_mlflow_logging(toy_dir: Path, tmp_path: Path, mlflow_server: str):
    import mlflow

    t = np.arange(2000)
    write_csv(toy_dir, "periodic", np.stack([np.sin(2 * np.pi * t / 24)], axis=1))
    cfg = EvalConfig(datasets=["toy", "periodic"], horizons=[1, 2], context=2, progress=False)
    res = evaluate(LastValue(), toy_dir, cfg)
    files = res.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["rows"]) == 4 and data["rows"][0]["mse"] == pytest.approx(1.5)
    assert data["avg_mse"] == pytest.approx(res.average_mse())
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 4
    png = plot_forecasts({"naive": LastValue(), "seasonal": SeasonalNaive()}, toy_dir, "periodic", 24,
                         tmp_path / "out" / "forecasts.png", context=96, num_examples=2)
    assert png.read_bytes()[:4] == b"\x89PNG"
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment(f"eval-test-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    log_to_mlflow(res, files + [png], run_id=run_id, tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.data.metrics["zeroshot/toy/1/mse"] == pytest.approx(1.5)
    assert "zeroshot/periodic/avg/mae" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id, "zeroshot")}
    assert {"zeroshot/results.json", "zeroshot/results.csv", "zeroshot/forecasts.png"} <= arts


def test_cli_baseline_logs_to_run(toy_dir: Path, tmp_path: Path, mlflow_server: str):
    import mlflow

    t = np.arange(1500)
    write_csv(toy_dir, "periodic", np.stack([np.sin(2 * np.pi * t / 24)], axis=1))
    client = mlflow.MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"cli-{tmp_path.name}")).info.run_id
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--model", "baseline:naive", "--benchmarks", str(toy_dir),
         "--datasets", "toy", "periodic", "--horizons", "1", "--context", "2", "--output", str(out),
         "--tracking-uri", mlflow_server, "--run-id", run_id],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "toy" in proc.stdout and "1.5000" in proc.stdout
    assert json.loads((out / "results.json").read_text())["rows"][0]["windows"] == 6
    assert (out / "forecasts.png").read_bytes()[:4] == b"\x89PNG"
    assert client.get_run(run_id).data.metrics["zeroshot/toy/1/mse"] == pytest.approx(1.5)
