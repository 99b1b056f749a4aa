"""Builders of SERIES_SCHEMA tables (preprocessing/series.py) used by every reader.

Good rows are built from ONE flat float32 buffer plus int64 offsets (zero-copy into Arrow);
quarantine rows carry a reason, a message naming the file, and the points the input claimed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from preprocessing.series import SERIES_SCHEMA


class IngestError(ValueError):
    """A bad input, raised under ``fail_fast`` (otherwise turned into a quarantine row)."""

    def __init__(self, reason: str, message: str, claimed_points: int = 0):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.claimed_points = int(claimed_points)

    def __reduce__(self):  # picklable across Ray task boundaries (fail_fast inside a task)
        return (IngestError, (self.reason, self.message, self.claimed_points))


def _str_col(value: str | Sequence[str], n: int) -> pa.Array:
    if isinstance(value, str):
        # one value repeated n times via Arrow's take (no Python list of n strings)
        return pa.array([value], pa.string()).take(pa.array(np.zeros(n, np.int64)))
    if isinstance(value, pa.Array):
        return value
    return pa.array(list(value), pa.string())


def series_table(domain: str, dataset: str, names: Sequence[str] | pa.Array, source: str | Sequence[str],
                 flat: np.ndarray, offsets: np.ndarray) -> pa.Table:
    """Good rows: series i holds ``flat[offsets[i]:offsets[i+1]]`` (float32, NaN = missing)."""
    flat = np.ascontiguousarray(flat, dtype=np.float32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    values = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.Table.from_arrays(
        [
            _str_col(domain, n), _str_col(dataset, n), _str_col(names, n), _str_col(source, n), values,
            _str_col("", n), _str_col("", n),
            pa.array(np.diff(offsets), pa.int64()),
        ],
        schema=SERIES_SCHEMA,
    )


def series_table_from_list(domain: str, dataset: str, names: Sequence[str], source: str,
                           arrays: Sequence[np.ndarray]) -> pa.Table:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([np.asarray(a, np.float32) for a in arrays]) if arrays else np.zeros(0, np.float32)
    return series_table(domain, dataset, names, source, flat, offsets)


def quarantine_table(rows: Sequence[tuple[str, str, str, str, str, str, int]]) -> pa.Table:
    """Rows of (domain, dataset, series, source, reason, message, claimed_points)."""
    cols = list(zip(*rows)) if rows else [[] for _ in range(7)]
    n = len(rows)
    return pa.Table.from_arrays(
        [
            pa.array(cols[0], pa.string()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.string()),
            pa.array(cols[3], pa.string()),
            pa.LargeListArray.from_arrays(pa.array(np.zeros(n + 1, np.int64)), pa.array(np.zeros(0, np.float32))),
            pa.array(cols[4], pa.string()), pa.array(cols[5], pa.string()),
            pa.array([int(c) for c in cols[6]], pa.int64()),
        ],
        schema=SERIES_SCHEMA,
    )


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    if not tables:
        return SERIES_SCHEMA.empty_table()
    return pa.concat_tables(tables)
