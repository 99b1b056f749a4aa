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
