"""Device-aware inference (``pipeline.evaluation.inference``) and the protocol spread over Ray actors
(``pipeline.evaluation.workers``), on the CPU: the CPU path of every GPU feature.

The references are the paths earlier results came from: ``TimeMoeModel.forecast`` called
directly, and the single-process ``evaluate``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model import TimeMoeModel
from pipeline.evaluation.inference import (
    InferenceOptionError,
    InferenceOptions,
    ModelForecaster,
    add_cli_options,
    forecast,
    load_checkpoint,
    options_from_args,
    resolve,
    resolve_device,
    resolve_dtype,
)
from pipeline.evaluation.protocol import EvalConfig, evaluate
from tests._train_helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """Two small benchmark-style CSVs: one long (every window full), one short enough that the
    longest contexts reach before row 0 (the padded path)."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(1)
    for name, rows, chans in (("long", 900, 3), ("short", 260, 2)):
        t = np.arange(rows)
        vals = np.stack([np.sin(2 * np.pi * t / (12 + 5 * c)) + 0.02 * rng.normal(size=rows).cumsum()
                         for c in range(chans)], axis=1)
        df = pd.DataFrame(vals, columns=[f"c{c}" for c in range(chans)])
        df.insert(0, "date", pd.date_range("2022-01-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
        df.to_csv(root / f"{name}.csv", index=False)
    return root


def _series(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=length).cumsum() + 5 for _ in range(n)]


# ------------------------------------------------------------------------------- options
def test_auto_resolves_to_cpu_fp32_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve(InferenceOptions()) == (torch.device("cpu"), torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("device, message", [("tpu", "--device 'tpu': unknown"), ("cuda:x", "--device cuda:x")])
def test_bad_device_names_the_option(device: str, message: str):
    if device.startswith("cuda") and not torch.cuda.is_available():
        message = "--device cuda:x: no CUDA GPU"
    with pytest.raises(InferenceOptionError, match=message.replace("(", r"\(")):
        resolve_device(device)


def test_cuda_without_gpu_and_unknown_dtype_are_one_line_errors(checkpoint, bench):
    args = [sys.executable, "-m", "jobs.evaluate", "--model", str(checkpoint), "--benchmarks", str(bench), "--no-plot"]
    cases = [(["--dtype", "int8"], "--dtype 'int8': unknown"), (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
             (["--horizons", "0"], "--horizons 0: must be >= 1")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU is visible"))
    for extra, message in cases:
        proc = subprocess.run(args + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ forecasts
def test_cpu_fp32_forecaster_equals_the_model_exactly(checkpoint):
    """``--device cpu --dtype fp32`` reproduces the earlier CPU path bit for bit."""
    series = _series(70, 300) + [np.r_[np.full(40, np.nan), s[:200]] for s in _series(5, 200, seed=1)]
    direct = TimeMoeModel.from_pretrained(str(checkpoint)).eval().forecast(series, 24)
    fc = ModelForecaster(load_checkpoint(str(checkpoint))[0], InferenceOptions("cpu", "fp32"))
    np.testing.assert_array_equal(fc.forecast(series, 24), direct)
    np.testing.assert_array_equal(forecast(str(checkpoint), series, 24, device="cpu", dtype="fp32"), direct)
    assert fc.describe() == {"device": "cpu", "dtype": "fp32", "batch_size": 256, "compiled": False}


def test_compiled_forecaster_equals_eager_and_runs_short_batches_eager(checkpoint):
    """``--compile``: the compiled prefill gives the eager forecasts (fp32, float rounding), and a
    short last batch runs eager (no graph compiled for its shape, no padding), and says so."""
    from torch._dynamo.utils import counters

    series = _series(10, 200, seed=4)
    eager = ModelForecaster(load_checkpoint(str(checkpoint))[0], InferenceOptions("cpu", "fp32", 4))
    compiled = ModelForecaster(load_checkpoint(str(checkpoint))[0], InferenceOptions("cpu", "fp32", 4, compile=True))
    np.testing.assert_allclose(compiled.forecast(series, 16), eager.forecast(series, 16), rtol=1e-4, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the full batches compiled
    np.testing.assert_allclose(compiled.forecast(series[:3], 16), eager.forecast(series[:3], 16), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # the short batch compiled nothing
    assert compiled.describe()["compiled"] is True and eager.describe()["compiled"] is False


def test_compile_modes_auto_is_on_only_for_a_gpu_in_half_precision():
    """``--compile auto`` (the default) compiles on a CUDA device in bf16/fp16 only, so CPU and fp32
    runs stay on the eager path whose results earlier runs recorded; bad values name the option."""
    from pipeline.evaluation.inference import compile_mode, resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    auto = InferenceOptions()
    assert resolve_compile(auto, cuda, torch.bfloat16) and resolve_compile(auto, cuda, torch.float16)
    assert not resolve_compile(auto, cuda, torch.float32) and not resolve_compile(auto, cpu, torch.bfloat16)
    assert resolve_compile(InferenceOptions(compile="on"), cpu, torch.float32)
    assert not resolve_compile(InferenceOptions(compile="off"), cuda, torch.bfloat16)
    assert [compile_mode(v) for v in (None, "", True, False, "1", "no", "ON", "auto")] == \
        ["auto", "auto", "on", "off", "on", "off", "on", "auto"]
    with pytest.raises(InferenceOptionError, match="--compile 'fast'"):
        compile_mode("fast")
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    assert options_from_args(parser.parse_args([])).compile == "auto"
    assert options_from_args(parser.parse_args(["--compile"])).compile == "on"
    assert options_from_args(parser.parse_args(["--compile", "off"])).compile == "off"
    with pytest.raises(InferenceOptionError, match="--compile"):
        options_from_args(parser.parse_args(["--compile", "maybe"]))


def test_bf16_on_cpu_is_close_to_fp32(checkpoint):
    series = _series(16, 256)
    fp32 = forecast(str(checkpoint), series, 16, device="cpu", dtype="fp32")
    bf16 = forecast(str(checkpoint), series, 16, device="cpu", dtype="bf16")
    rel = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    assert 0 < rel < 0.05


def test_out_of_memory_batches_are_halved_with_a_warning(checkpoint, capsys):
    """A batch that does not fit is retried at half the size; the forecasts are unchanged.
    (The out-of-memory error is raised by hand: this machine has no GPU to run out of.)"""
    series = _series(40, 128)
    ref = forecast(str(checkpoint), series, 8, device="cpu", dtype="fp32")
    fc = ModelForecaster(load_checkpoint(str(checkpoint))[0], InferenceOptions("cpu", "fp32", batch_size=32))
    real = fc.model.forecast
    sizes = []

    def limited(chunk, horizon, batch_size=64, fixed_batch=False):
        sizes.append(len(chunk))
        if len(chunk) > 9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(chunk, horizon, batch_size=batch_size, fixed_batch=fixed_batch)

    fc.model.forecast = limited
    np.testing.assert_allclose(fc.forecast(series, 8), ref, rtol=1e-6, atol=1e-6)
    assert sizes[:3] == [32, 16, 8] and max(sizes[3:]) == 8
    err = capsys.readouterr().err
    assert "batch size lowered to 16" in err and "batch size lowered to 8" in err
    fc.model.forecast = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        fc.forecast(series, 8)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_checkpoint(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------- Ray actors
def test_sharded_evaluation_on_cpu_actors_equals_one_process(checkpoint, bench, ray_local):
    from pipeline.evaluation.workers import evaluate_model, plan_workers

    cfg = EvalConfig(datasets=["long", "short"], horizons=[16, 40], context=300, stride=9, progress=False)
    opts = InferenceOptions("cpu", "fp32")
    single = evaluate(ModelForecaster(load_checkpoint(str(checkpoint))[0], opts), bench, cfg)
    assert plan_workers("auto", opts) == (0, False)  # an explicit CPU device stays in this process
    sharded = evaluate_model(str(checkpoint), bench, cfg, opts, workers=2)
    assert sharded.inference["workers"] == 2 and sharded.inference["dtype"] == "fp32"
    assert [(r.dataset, r.horizon, r.windows, r.points) for r in sharded.rows] == \
           [(r.dataset, r.horizon, r.windows, r.points) for r in single.rows]
    # per-channel batches hold other windows than mixed-channel ones: the last float bits move
    for a, b in zip(sharded.rows, single.rows):
        assert a.mse == pytest.approx(b.mse, rel=1e-6) and a.mae == pytest.approx(b.mae, rel=1e-6)
    assert any(r.dataset == "short" for r in single.rows)
    in_process = evaluate_model(str(checkpoint), bench, cfg, opts, workers=0)
    assert [r.mse for r in in_process.rows] == [r.mse for r in single.rows]


def test_results_state_device_and_keep_the_protocol_key(checkpoint, bench, tmp_path):
    cfg = EvalConfig(datasets=["long"], horizons=[16], context=200, stride=50, progress=False)
    res = evaluate(ModelForecaster(load_checkpoint(str(checkpoint))[0], InferenceOptions("cpu", "bf16")), bench, cfg)
    res.write(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["inference"]["device"] == "cpu" and saved["inference"]["dtype"] == "bf16"
    assert saved["protocol"] == cfg.protocol_key() and "bf16" not in saved["protocol"]
    assert "cpu" in (tmp_path / "results.txt").read_text().splitlines()[0]
