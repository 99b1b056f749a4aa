"""Loading the zero-shot benchmark CSVs (ETTh1/2, ETTm1/2, weather, exchange_rate, national_illness).

A benchmark file is a CSV (optionally gzip-compressed, LF or CRLF line endings) with a header
row; the first column is the timestamp and is dropped, every other column is one channel that
is evaluated as an independent univariate series (the paper's protocol, spec section 6).

Split borders follow the released Time-MoE evaluation code: ETTh uses fixed borders of 12/4/4
months of hourly rows, ETTm the same times 4, everything else 70% / 10% / 20% with the test
split taking ``int(0.2 * n)`` rows at the end.

Shape legend: T = time steps, C = channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# The datasets we know about, in table order. Global Temp is in the paper but not available here.
KNOWN_DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2", "weather", "exchange_rate", "national_illness")
DEFAULT_DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2", "weather")
_SUFFIXES = (".csv", ".csv.gz")

ETTH_MONTH = 30 * 24  # rows per "month" in the ETT borders (hourly)


@dataclass(frozen=True)
class Borders:
    """Half-open row ranges [start, end) of the three splits."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


@dataclass
class BenchmarkDataset:
    name: str
    path: Path
    values_TC: np.ndarray  # float64, raw (unscaled)
    channels: list[str]
    timestamps: pd.DatetimeIndex | None

    @property
    def num_rows(self) -> int:
        return self.values_TC.shape[0]


def find_benchmark_file(benchmarks_dir: str | Path, name: str) -> Path:
    """``<dir>/<name>.csv`` or ``<dir>/<name>.csv.gz``; a clear error listing what is there otherwise."""
    root = Path(benchmarks_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder {root} does not exist")
    for suffix in _SUFFIXES:
        p = root / f"{name}{suffix}"
        if p.exists():
            return p
    have = sorted(available_datasets(root))
    raise FileNotFoundError(f"benchmark {name!r}: no {name}.csv or {name}.csv.gz in {root} (found: {have})")


def available_datasets(benchmarks_dir: str | Path) -> list[str]:
    """Dataset names (file names without .csv/.csv.gz) in a benchmark folder."""
    names = []
    for p in sorted(Path(benchmarks_dir).iterdir()):
        for suffix in _SUFFIXES:
            if p.name.endswith(suffix):
                names.append(p.name[: -len(suffix)])
    return names


def load_benchmark(benchmarks_dir: str | Path, name: str) -> BenchmarkDataset:
    """Read one benchmark CSV: drop the first (timestamp) column, every other column is a channel."""
    path = find_benchmark_file(benchmarks_dir, name)
    try:
        df = pd.read_csv(path)  # handles gzip and CRLF
    except Exception as e:  # pandas' parser errors do not name the file
        raise ValueError(f"{path}: cannot parse as CSV: {e}") from e
    if df.shape[1] < 2:
        raise ValueError(f"{path}: expected a timestamp column followed by >= 1 channel, got columns {list(df.columns)}")
    time_col, channels = df.columns[0], [str(c) for c in df.columns[1:]]
    data = df.iloc[:, 1:]
    non_numeric = [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]
    if non_numeric:
        raise ValueError(f"{path}: channel column(s) {non_numeric} are not numeric (is the file header-less?)")
    values_TC = data.to_numpy(dtype=np.float64)
    if not np.isfinite(values_TC).all():
        bad = [channels[i] for i in np.where(~np.isfinite(values_TC).all(axis=0))[0]]
        raise ValueError(f"{path}: channel(s) {bad} contain missing or non-finite values")
    try:
        timestamps = pd.DatetimeIndex(pd.to_datetime(df[time_col], format="mixed"))
    except (ValueError, TypeError):
        timestamps = None  # the period for seasonal naive then has to be given explicitly
    return BenchmarkDataset(name=name, path=path, values_TC=values_TC, channels=channels, timestamps=timestamps)


def split_borders(name: str, num_rows: int) -> Borders:
    """The released code's borders: by file name for ETTh/ETTm (fixed), else 70/10/20."""
    lname = name.lower()
    if "etth" in lname or "ettm" in lname:
        m = ETTH_MONTH * (4 if "ettm" in lname else 1)
        train_end, val_end, test_end = 12 * m, 16 * m, 20 * m
        if num_rows < test_end:
            raise ValueError(f"benchmark {name}: ETT borders need {test_end} rows, the file has {num_rows}")
        return Borders((0, train_end), (train_end, val_end), (val_end, test_end))
    num_train = int(num_rows * 0.7)
    num_test = int(num_rows * 0.2)
    return Borders((0, num_train), (num_train, num_rows - num_test), (num_rows - num_test, num_rows))


@dataclass(frozen=True)
class Scaler:
    """Per-channel StandardScaler (population std, like sklearn; constant channels get scale 1)."""

    mean_C: np.ndarray
    scale_C: np.ndarray

    @classmethod
    def fit(cls, values_TC: np.ndarray) -> "Scaler":
        mean_C = values_TC.mean(axis=0)
        std_C = values_TC.std(axis=0)
        return cls(mean_C, np.where(std_C > 0, std_C, 1.0))

    def transform(self, values_TC: np.ndarray) -> np.ndarray:
        return (values_TC - self.mean_C) / self.scale_C


def scaled_values(ds: BenchmarkDataset) -> tuple[np.ndarray, Borders]:
    """All rows scaled with a StandardScaler fitted on the train split, and the borders."""
    borders = split_borders(ds.name, ds.num_rows)
    scaler = Scaler.fit(ds.values_TC[borders.train[0] : borders.train[1]])
    return scaler.transform(ds.values_TC), borders


def infer_period(timestamps: pd.DatetimeIndex | None) -> int:
    """Seasonal period from the sampling step: one day for sub-daily data (24 hourly, 96 for
    15-min, 144 for 10-min), a week for daily, a year for weekly (52) and monthly (12) data."""
    if timestamps is None or len(timestamps) < 2:
        raise ValueError("cannot infer a seasonal period without timestamps; pass the period explicitly")
    step = pd.Series(timestamps).diff().dropna().median()
    day = pd.Timedelta(days=1)
    if step <= pd.Timedelta(0):
        raise ValueError(f"non-increasing timestamps (median step {step})")
    if step < day:
        return max(1, int(round(day / step)))
    if step == day:
        return 7
    if step == 7 * day:
        return 52
    if 28 * day <= step <= 31 * day:
        return 12
    if 89 * day <= step <= 92 * day:
        return 4
    return 1
