"""Reference forecasters evaluated in the same harness as the model.

Every forecaster has ``forecast(series, horizon) -> np.ndarray [B, horizon]`` where ``series``
is a ``[B, T]`` array or a list of 1-D arrays (the model's contract). Baselines that depend on
the dataset (seasonal naive needs the sampling period) implement ``for_dataset(ds)`` returning
a configured copy; the harness calls it before evaluating each dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from pipeline.evaluation.benchmark_data import BenchmarkDataset, infer_period


class Forecaster(Protocol):
    def forecast(self, series: np.ndarray | Sequence[np.ndarray], horizon: int) -> np.ndarray: ...


def _last_values(series: np.ndarray | Sequence[np.ndarray], k: int) -> np.ndarray:
    """The last k values of every series as a [B, k] array."""
    if isinstance(series, np.ndarray) and series.ndim == 2:
        if series.shape[1] < k:
            raise ValueError(f"contexts have length {series.shape[1]}, need at least {k}")
        return series[:, -k:]
    rows = []
    for i, s in enumerate(series):
        s = np.asarray(s, dtype=np.float64)
        if len(s) < k:
            raise ValueError(f"series {i} has length {len(s)}, need at least {k}")
        rows.append(s[-k:])
    return np.stack(rows)


@dataclass
class LastValue:
    """Naive forecast: repeat the last observed value."""

    name: str = "naive"

    def forecast(self, series, horizon: int) -> np.ndarray:
        return np.repeat(_last_values(series, 1), horizon, axis=1)


@dataclass
class SeasonalNaive:
    """Repeat the last full season; ``period=None`` means infer from the dataset's timestamps."""

    period: int | None = None
    name: str = "seasonal_naive"

    def for_dataset(self, ds: BenchmarkDataset) -> "SeasonalNaive":
        return SeasonalNaive(period=self.period or infer_period(ds.timestamps), name=self.name)

    def forecast(self, series, horizon: int) -> np.ndarray:
        if self.period is None:
            raise ValueError("SeasonalNaive.period is unset: call for_dataset(ds) or pass period=")
        season_BP = _last_values(series, self.period)
        reps = -(-horizon // self.period)
        return np.tile(season_BP, (1, reps))[:, :horizon]


@dataclass
class TrainMean:
    """The train-split mean: 0 on data scaled with the train-split StandardScaler."""

    name: str = "mean"

    def forecast(self, series, horizon: int) -> np.ndarray:
        return np.zeros((len(series), horizon))


BASELINES = {"naive": LastValue, "seasonal_naive": SeasonalNaive, "mean": TrainMean}


def make_baseline(name: str) -> Forecaster:
    """``naive``, ``seasonal_naive`` (optionally ``seasonal_naive:PERIOD``) or ``mean``."""
    base, _, arg = name.partition(":")
    if base not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    if base == "seasonal_naive" and arg:
        return SeasonalNaive(period=int(arg))
    return BASELINES[base]()
