"""Contamination guard: find training series that copy >= ``min_match`` (64) consecutive values
from the TEST split of an evaluation benchmark.

Test splits (spec section 6): ETTh* rows [11520, 14400), ETTm* rows [46080, 57600), any other
CSV its last 20% of rows (``n - int(0.2 n)`` onwards, as TSLib). Every numeric column except the
date is one channel. Values are compared as float32 (the readers' dtype), bit for bit.

Why this is O(n) per series: any shared run of ``m = min_match`` values contains a whole
``h = m // 2`` window that starts at a multiple of ``h`` in the series. So the index holds a
64-bit hash of EVERY h-window (stride 1) of every test channel, the series is hashed only at
stride h, and each hit is verified exactly by extending the match both ways. Constant
benchmark windows are not indexed: "64 zeros" is no evidence of copying.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

ETT_HOURLY_TEST = (11520, 14400)
ETT_MINUTE_TEST = (46080, 57600)



def _coeffs(h: int) -> np.ndarray:
    return np.random.default_rng(h * 7919 + 1).integers(1, 2**63, size=h, dtype=np.uint64) | np.uint64(1)


def _hash_windows(bits_NH: np.ndarray, coeffs_H: np.ndarray) -> np.ndarray:
    """Multiplicative hash of each row of uint32 bits, mod 2^64 (numpy wraps uint64)."""
    with np.errstate(over="ignore"):
        return (bits_NH.astype(np.uint64) * coeffs_H).sum(axis=1, dtype=np.uint64)


def benchmark_test_rows(name: str, n_rows: int) -> tuple[int, int]:
    """Row range of the test split of a benchmark file named ``name``."""
    base = os.path.basename(name)
    if base.startswith("ETTh"):
        return ETT_HOURLY_TEST[0], min(ETT_HOURLY_TEST[1], n_rows)
    if base.startswith("ETTm"):
        return ETT_MINUTE_TEST[0], min(ETT_MINUTE_TEST[1], n_rows)
    return n_rows - int(0.2 * n_rows), n_rows


def load_test_channels(path: str) -> list[np.ndarray]:
    """Test-split channels (float32) of one benchmark CSV (optionally gzip)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"contamination benchmark {path}: cannot read as CSV: {exc}") from exc
    numeric = frame.select_dtypes(include=[np.number])
    if numeric.shape[1] == 0:
        raise ValueError(f"contamination benchmark {path}: no numeric columns")
    start, end = benchmark_test_rows(path, len(frame))
    return [numeric[c].to_numpy(dtype=np.float32)[start:end] for c in numeric.columns]


def benchmark_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".gz", ".csv", ".txt"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    return base


@dataclass
class ContaminationIndex:
    min_match: int
    names: list[str] = field(default_factory=list)
    channels: list[np.ndarray] = field(default_factory=list)   # float32 test values
    channel_name: list[int] = field(default_factory=list)      # channel -> index into names
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (channel, pos)

    @property
    def half(self) -> int:
        return max(1, self.min_match // 2)

    @classmethod
    def build(cls, named_channels: dict[str, list[np.ndarray]], min_match: int = 64) -> "ContaminationIndex":
        index = cls(min_match=min_match)
        h = index.half
        coeffs = _coeffs(h)
        all_h, all_w = [], []
        for name, chans in named_channels.items():
            index.names.append(name)
            for chan in chans:
                c = len(index.channels)
                chan = np.ascontiguousarray(chan, dtype=np.float32)
                index.channels.append(chan)
                index.channel_name.append(len(index.names) - 1)
                if len(chan) < h:
                    continue
                win = np.lib.stride_tricks.sliding_window_view(chan, h)
                informative = (win.max(axis=1) != win.min(axis=1)) & np.isfinite(win).all(axis=1)
                pos = np.flatnonzero(informative)
                if len(pos) == 0:
                    continue
                all_h.append(_hash_windows(win.view(np.uint32)[pos], coeffs))
                all_w.append(np.stack([np.full(len(pos), c), pos], axis=1))
        if all_h:
            hashes = np.concatenate(all_h)
            where = np.concatenate(all_w)
            order = np.argsort(hashes, kind="stable")
            index.hashes, index.where = hashes[order], where[order]
        return index

    @classmethod
    def from_files(cls, paths: list[str], min_match: int = 64) -> "ContaminationIndex":
        return cls.build({benchmark_name(p): load_test_channels(p) for p in paths}, min_match)

    def find(self, x: np.ndarray) -> str | None:
        """Name of the first benchmark whose test split shares >= min_match consecutive values
        with ``x``, else None."""
        h = self.half
        if len(self.hashes) == 0 or len(x) < self.min_match:
            return None
        x = np.ascontiguousarray(x, dtype=np.float32)
        k = len(x) // h
        hs = _hash_windows(x[: k * h].view(np.uint32).reshape(k, h), _coeffs(h))
        lo = np.searchsorted(self.hashes, hs, side="left")
        hi = np.searchsorted(self.hashes, hs, side="right")
        for j in np.flatnonzero(hi > lo).tolist():
            p = j * h
            for c, q in self.where[lo[j]:hi[j]].tolist():
                if self._match_length(x, p, self.channels[c], q) >= self.min_match:
                    return self.names[self.channel_name[c]]
        return None

    def _match_length(self, x: np.ndarray, p: int, b: np.ndarray, q: int) -> int:
        h = self.half
        if not np.array_equal(x[p:p + h], b[q:q + h]):
            return 0  # hash collision
        left = 0
        while p - left - 1 >= 0 and q - left - 1 >= 0 and x[p - left - 1] == b[q - left - 1] and left < self.min_match:
            left += 1
        right = 0
        while p + h + right < len(x) and q + h + right < len(b) and x[p + h + right] == b[q + h + right] and right < self.min_match:
            right += 1
        return left + h + right
