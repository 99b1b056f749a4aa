"""Per-segment normalisation. Statistics are computed in float64 and kept with every segment
(schema columns ``seg_mean`` / ``seg_std``) so that ``raw = value * std + mean`` maps back.

- ``zscore`` (default, as the released Time-MoE code): mean and POPULATION std (ddof 0); a
  constant segment (std == 0) is only centred (std recorded as 1.0).
- ``max``: divide by max |x| (mean recorded as 0.0); an all-zero segment keeps std 1.0.
- ``none``: values unchanged (mean 0.0, std 1.0).
"""
from __future__ import annotations

import numpy as np


def segment_stats(x: np.ndarray, method: str) -> tuple[float, float]:
    """``(mean, std)`` that :func:`apply_stats` uses for ``x`` under ``method``."""
    if method == "none" or len(x) == 0:
        return 0.0, 1.0
    if method == "zscore":
        mean = float(np.mean(x, dtype=np.float64))
        std = float(np.std(x, dtype=np.float64))
        return mean, (std if std > 0.0 else 1.0)
    if method == "max":
        scale = float(np.max(np.abs(x)))
        return 0.0, (scale if scale > 0.0 else 1.0)
    raise ValueError(f"unknown normalisation method {method!r} (zscore, max, none)")


def apply_stats(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x - mean) / std`` as float32 (computed in float64 for large offsets)."""
    if mean == 0.0 and std == 1.0:
        return np.asarray(x, dtype=np.float32)
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)


def denormalize(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    return values.astype(np.float64) * std + mean


def normalize_run(x: np.ndarray, method: str) -> tuple[np.ndarray, float, float]:
    """Fast fused form of ``segment_stats`` + ``apply_stats`` for the pipeline's hot loop:
    returns ``(values_f32, mean, std)`` with ``values == (x - mean) / std`` to float32 precision.

    Arithmetic stays in float32 (one subtraction, one dot product, one in-place scale; no
    float64 temporaries: allocation is what costs on small VMs). The RECORDED mean is the
    float32 value actually subtracted, so ``values * std + mean`` maps back to ``x`` within about
    one float32 ulp of ``x``; the std may differ from the float64 population std in the 5th
    digit, which only means the values have std 1 +- 1e-4. Tests compare with the slow path.
    """
    n = len(x)
    if method == "none" or n == 0:
        return np.asarray(x, dtype=np.float32), 0.0, 1.0
    if method == "max":
        scale = float(max(abs(float(x.max())), abs(float(x.min()))))
        if scale == 0.0:
            return np.asarray(x, dtype=np.float32).copy(), 0.0, 1.0
        out = x * np.float32(1.0 / scale)
        return out, 0.0, scale
    if method != "zscore":
        raise ValueError(f"unknown normalisation method {method!r} (zscore, max, none)")
    mean32 = np.float32(float(x.sum(dtype=np.float64)) / n) if n < 4096 else np.float32(float(x.sum()) / n)
    out = x - mean32
    with np.errstate(over="ignore"):  # float32 overflow of huge values: redone in float64 below
        var = float(np.dot(out, out)) / n
    if not np.isfinite(var):  # float32 overflow of huge values: redo the variance in float64
        d = out.astype(np.float64)
        var = float(np.dot(d, d)) / n
    std = float(np.sqrt(var))
    if std > 0.0:
        out *= np.float32(1.0 / std)
    else:
        std = 1.0
    return out, float(mean32), std
