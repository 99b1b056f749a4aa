"""Inference helpers: the greedy multi-resolution schedule and the user-facing data handling
of ``TimeMoeModel.forecast`` (z-scoring, unequal lengths, missing values).

NaN policy of ``forecast`` (per series, after keeping the last ``context_length`` points):
- leading non-finite points are dropped (the series starts at its first observation);
- interior non-finite points are linearly interpolated between their observed neighbours;
- trailing non-finite points are treated as part of the future: the model forecasts from the
  last observation and the values for the missing tail are skipped, so the returned
  ``horizon`` points still start right after the end of the given array;
- a series with no finite point is an error naming its index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STD_EPS = 1e-8


def horizon_schedule(horizon: int, horizon_lengths: tuple[int, ...] | list[int]) -> list[int]:
    """Greedy: at each step the largest head <= remaining; if none fits, the smallest
    (truncated). E.g. heads [1,8,32,64]: 45 -> [32,8,1,1,1,1,1], 336 -> [64]*5 + [8,8]."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    heads = sorted(set(int(h) for h in horizon_lengths))
    steps, left = [], horizon
    while left > 0:
        fits = [h for h in heads if h <= left]
        h = fits[-1] if fits else heads[0]
        steps.append(h)
        left -= h
    return steps


@dataclass
class PreparedBatch:
    """Left-padded, z-scored contexts ready for ``generate``."""

    values_BT: np.ndarray  # float32, padding = 0
    mask_BT: np.ndarray  # bool, True on real points
    mean_B: np.ndarray  # float64
    scale_B: np.ndarray  # float64
    missing_tail_B: np.ndarray  # int: trailing NaNs to skip in the forecast


def prepare_contexts(series: list[np.ndarray] | np.ndarray, context_length: int | None) -> PreparedBatch:
    """Apply the NaN policy, z-score each context (mean/std over its points), left-pad.
    A ``[B, T]`` array without NaN/inf (the evaluation protocol's batches) takes a vectorised
    path with the same result; anything else goes row by row."""
    if isinstance(series, np.ndarray) and series.ndim == 2 and series.shape[1] > 0:
        x_BT = np.asarray(series, dtype=np.float64)
        if context_length is not None:
            x_BT = x_BT[:, -context_length:]
        if np.isfinite(x_BT).all():
            return _prepare_finite(x_BT)
    rows, tails = [], []
    for i, s in enumerate(series):
        x = np.asarray(s, dtype=np.float64).reshape(-1)
        if x.ndim != 1 or len(x) == 0:
            raise ValueError(f"forecast: series {i} is empty")
        if context_length is not None:
            x = x[-context_length:]
        finite = np.isfinite(x)
        if not finite.any():
            raise ValueError(f"forecast: series {i} has no finite value in its context (length {len(x)})")
        first = int(np.argmax(finite))
        last = len(x) - 1 - int(np.argmax(finite[::-1]))
        tails.append(len(x) - 1 - last)
        x, finite = x[first : last + 1], finite[first : last + 1]
        if not finite.all():  # interior gaps: linear interpolation keeps the time axis intact
            t = np.arange(len(x))
            x = x.copy()
            x[~finite] = np.interp(t[~finite], t[finite], x[finite])
        rows.append(x)
    T = max(len(r) for r in rows)
    B = len(rows)
    values = np.zeros((B, T), dtype=np.float32)
    mask = np.zeros((B, T), dtype=bool)
    mean = np.empty(B)
    scale = np.empty(B)
    for i, x in enumerate(rows):
        m, s = x.mean(), x.std()
        s = s if s > STD_EPS * max(1.0, abs(m)) else 1.0  # constant context: only mean-centred
        mean[i], scale[i] = m, s
        values[i, T - len(x):] = (x - m) / s
        mask[i, T - len(x):] = True
    return PreparedBatch(values, mask, mean, scale, np.asarray(tails, dtype=np.int64))


def _prepare_finite(x_BT: np.ndarray) -> PreparedBatch:
    """``prepare_contexts`` of equal-length rows without missing values, one numpy op per step."""
    B, T = x_BT.shape
    mean = x_BT.mean(axis=1)
    scale = x_BT.std(axis=1)
    scale = np.where(scale > STD_EPS * np.maximum(1.0, np.abs(mean)), scale, 1.0)  # constant: mean-centred
    values = ((x_BT - mean[:, None]) / scale[:, None]).astype(np.float32)
    return PreparedBatch(values, np.ones((B, T), dtype=bool), mean, scale, np.zeros(B, dtype=np.int64))
