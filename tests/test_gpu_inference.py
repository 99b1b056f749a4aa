"""CUDA-only checks of device-aware inference that the CPU suite cannot reach (skipped without a
GPU): ``auto`` picks the GPU in bf16, the batch size comes from free memory, a batch that does
not fit is halved instead of failing, and bf16 forecasts stay close to fp32 ones.

Run on a GPU node: ``python3 -m pytest -q tests/test_gpu_inference.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import TimeMoeConfig, TimeMoeModel
from pipeline.evaluation.inference import GPU_BATCH_MAX, InferenceOptions, ModelForecaster

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _walks(n: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, length)).cumsum(axis=1)


def _model(preset: str, seed: int = 0) -> TimeMoeModel:
    torch.manual_seed(seed)
    return TimeMoeModel(TimeMoeConfig.preset(preset))


def test_auto_is_the_first_gpu_in_bf16():
    fc = ModelForecaster(_model("tiny"))
    assert fc.device == torch.device("cuda:0") and fc.dtype == torch.bfloat16
    assert next(fc.model.parameters()).is_cuda
    d = fc.describe()
    assert d["dtype"] == "bf16" and d["gpu"] == torch.cuda.get_device_name(0)
    assert fc.compiled and d["compiled"] is True  # compile auto: on for a GPU in bf16


def test_batch_from_free_memory_is_a_power_of_two_that_runs():
    fc = ModelForecaster(_model("timemoe-50m"))
    batch = fc.batch_size_for(3072, 720)
    assert 1 <= batch <= GPU_BATCH_MAX and batch & (batch - 1) == 0
    assert fc.batch_size_for(512, 96) >= batch  # shorter windows fit at least as many
    x = _walks(batch, 3072)
    torch.cuda.reset_peak_memory_stats()
    out = fc.forecast(x, 720)
    assert out.shape == (batch, 720) and np.isfinite(out).all()
    free, total = torch.cuda.mem_get_info()
    assert torch.cuda.max_memory_allocated() < total


def test_a_batch_that_does_not_fit_is_halved(capsys):
    fc = ModelForecaster(_model("timemoe-200m"), InferenceOptions(batch_size=4096))
    x = _walks(1024, 3072)
    out = fc.forecast(x, 64)
    assert out.shape == (1024, 64) and np.isfinite(out).all()
    assert "batch size lowered to" in capsys.readouterr().err
    ref = ModelForecaster(_model("timemoe-200m"), InferenceOptions(batch_size=16)).forecast(x[:16], 64)
    np.testing.assert_allclose(out[:16], ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_bf16_forecasts_are_close_to_fp32_on_the_gpu():
    x = _walks(256, 512, seed=1)
    fp32 = ModelForecaster(_model("timemoe-50m"), InferenceOptions(dtype="fp32")).forecast(x, 96)
    bf16 = ModelForecaster(_model("timemoe-50m"), InferenceOptions(dtype="bf16")).forecast(x, 96)
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < rel < 2e-2, rel



def test_cached_generate_with_left_padding_equals_the_uncached_reference_on_cuda():
    """On CUDA the prefill of left-padded rows runs FlexAttention, and its last layer one query
    row by SDPA with a dense mask: both against the uncached reference, in fp32."""
    torch.manual_seed(3)
    m = TimeMoeModel(TimeMoeConfig.preset("tiny")).cuda().eval()
    x = torch.from_numpy(_walks(4, 96, seed=4)).float().cuda()
    mask = torch.ones_like(x, dtype=torch.bool)
    for i, n in enumerate([96, 50, 96, 17]):
        mask[i, : 96 - n] = False
    x = torch.where(mask, x, torch.zeros_like(x))
    with torch.no_grad():
        fast = m.generate(x, 45, attention_mask=mask)
        slow = m.generate(x, 45, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_compiled_forecaster_equals_eager_on_the_gpu_with_nan_padded_series():
    """The default GPU path (compile auto -> on) against the eager one, in bf16, for series of
    unequal lengths with leading NaNs (left-padded rows: FlexAttention inside the compiled prefill)
    and a short last batch (padded to the batch size)."""
    rng = np.random.default_rng(6)
    series = [rng.normal(size=n).cumsum() for n in (700, 512, 300, 512, 512, 90, 512)]
    series[3][:40] = np.nan
    compiled = ModelForecaster(_model("timemoe-50m", seed=2), InferenceOptions(batch_size=4))
    eager = ModelForecaster(_model("timemoe-50m", seed=2), InferenceOptions(batch_size=4, compile="off"))
    assert compiled.compiled and not eager.compiled
    a, b = compiled.forecast(series, 96), eager.forecast(series, 96)
    assert a.shape == (7, 96) and np.isfinite(a).all()
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 3e-2, rel
