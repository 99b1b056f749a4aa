"""Chunking and sequence packing into fixed windows of ``width = window_length + 1`` points.

Shape legend: R = packed rows in a batch, W = width (window_length + 1).

- :func:`chunk_bounds`: a cleaned run longer than W is cut into full W-point chunks from its
  start; the tail is KEPT as its own chunk (the released code drops it) unless it is shorter
  than ``min_chunk_length`` (then it is dropped, reason ``short_tail``).
- :func:`best_fit_decreasing`: chunks sorted by length (longest first, ties by input index, so
  the result is deterministic) go into the open row with the SMALLEST remaining room that fits;
  a new row is opened otherwise. Full chunks fill a row alone.
- :func:`assemble_rows`: rows as dense ``[R, W]`` arrays: ``values``, ``segment_ids``
  (0 = padding, 1..k in the order segments were placed, left to right, contiguous),
  ``loss_mask`` (1 on real points), plus per-segment lists.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

REASON_SHORT_TAIL = "short_tail"


def chunk_bounds(start: int, end: int, width: int, min_chunk_length: int) -> tuple[list[tuple[int, int]], int]:
    """Chunks of ``[start, end)`` of at most ``width`` points; returns ``(chunks, dropped_points)``."""
    chunks = [(s, min(s + width, end)) for s in range(start, end, width)]
    dropped = 0
    if chunks and chunks[-1][1] - chunks[-1][0] < min_chunk_length:
        dropped = chunks[-1][1] - chunks[-1][0]
        chunks.pop()
    return chunks, dropped


def best_fit_decreasing(lengths: list[int] | np.ndarray, width: int) -> list[list[int]]:
    """Bin indices per row; every length must be in ``[1, width]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(f"chunk lengths must be in [1, {width}], got {lengths.min()}..{lengths.max()}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    bins: list[list[int]] = []
    # Sorted open rows by (room, row index): bisect finds the tightest fit in O(log R).
    rooms: list[tuple[int, int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        if n == width:
            bins.append([i])
            continue
        pos = bisect.bisect_left(rooms, (n, -1))
        if pos < len(rooms):
            room, b = rooms.pop(pos)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = width - n
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins


@dataclass
class PackedRows:
    values_RW: np.ndarray        # float32
    segment_ids_RW: np.ndarray   # int32
    loss_mask_RW: np.ndarray     # uint8
    seg_mean: list[list[float]]
    seg_std: list[list[float]]
    seg_series: list[list[str]]
    seg_lengths: list[list[int]]

    @property
    def num_rows(self) -> int:
        return self.values_RW.shape[0]

    def efficiency(self) -> float:
        slots = self.values_RW.size
        return float(self.loss_mask_RW.sum()) / slots if slots else 1.0


def assemble_rows(
    chunks: list[np.ndarray], means: list[float], stds: list[float], keys: list[str], width: int,
    shuffle_seed: int | None = None,
) -> PackedRows:
    """Pack normalised chunks (each ``<= width`` points) into rows by best-fit decreasing.
    ``shuffle_seed``: permute the rows (seeded) as they are filled, so that rows of very
    different chunk lengths mix without a copy afterwards."""
    bins = best_fit_decreasing([len(c) for c in chunks], width)
    if shuffle_seed is not None:
        bins = [bins[i] for i in np.random.default_rng(shuffle_seed).permutation(len(bins))]
    R = len(bins)
    values_RW = np.zeros((R, width), dtype=np.float32)
    seg_RW = np.zeros((R, width), dtype=np.int32)
    mask_RW = np.zeros((R, width), dtype=np.uint8)
    seg_mean, seg_std, seg_series, seg_lengths = [], [], [], []
    for r, members in enumerate(bins):
        pos = 0
        for k, i in enumerate(members):
            n = len(chunks[i])
            values_RW[r, pos:pos + n] = chunks[i]
            seg_RW[r, pos:pos + n] = k + 1
            pos += n
        mask_RW[r, :pos] = 1  # segments fill the row from its start: real points are [0, pos)
        seg_mean.append([float(means[i]) for i in members])
        seg_std.append([float(stds[i]) for i in members])
        seg_series.append([keys[i] for i in members])
        seg_lengths.append([len(chunks[i]) for i in members])
    return PackedRows(values_RW, seg_RW, mask_RW, seg_mean, seg_std, seg_series, seg_lengths)
