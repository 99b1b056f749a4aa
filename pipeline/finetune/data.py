"""A benchmark's train split as packed training shards, and the guard that keeps fine-tuning off
the data it is evaluated on.

The contamination guard: pretraining never sees a benchmark (``preprocessing.contamination``);
fine-tuning sees only the TRAIN split of the dataset it is then evaluated on. Asking for the
``val`` or ``test`` borders is refused (:class:`ContaminationError`). Early stopping, when asked,
uses the last ``early_stop_fraction`` of the train split's rows, held out from training; the
benchmark's own validation split stays unseen, like its test split.

The held-out rows never exceed that fraction: on a short split (ETTh1's 8,640 rows against the
3,793-point windows of the paper's longest context) a held-out part of "two windows at least"
would take most of the data the model is meant to learn from. A held-out window ends in the
held-out rows, every quarter of the training stride, and reaches back into the rows before
them for its context, as a test window does; only its held-out points carry loss, so the
held-out loss is a forecast of points no training step saw. Values are scaled with
the zero-shot protocol's scaler (``pipeline.evaluation.benchmark_data``:
per channel, fitted on the train split), so the model fine-tunes on what it is evaluated on.
Each channel is one series, cut into windows of ``window_length + 1`` points every ``stride``
points (one series per row, no packing: every row is full).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluation.benchmark_data import load_benchmark, scaled_values
from preprocessing.config import OutputConfig
from preprocessing.pack import PackedRows
from preprocessing.schema import MANIFEST_FILE, TRAIN_DIR, VAL_DIR, minimal_manifest
from preprocessing.storage import resolve_filesystem
from preprocessing.writer import write_named_shards

ALLOWED_SPLIT = "train"


class ContaminationError(ValueError):
    """Fine-tuning asked for data the model is evaluated on."""


@dataclass(frozen=True)
class FinetuneData:
    path: Path | str    # packed shards (train/, val/, manifest.json); a URL for data on s3://
    dataset: str
    split: str          # always "train": what the run saw, recorded on it
    rows: tuple[int, int]  # the train split's rows used [start, end)
    train_windows: int
    val_windows: int


def benchmark_train_shards(benchmarks_dir: str | Path, dataset: str, out_dir: str | Path, window_length: int,
                           stride: int | None = None, split: str = ALLOWED_SPLIT,
                           early_stop_fraction: float = 0.1, rows_per_shard: int = 256) -> FinetuneData:
    """Write the train split of ``dataset`` as packed shards under ``out_dir`` (module doc)."""
    if split != ALLOWED_SPLIT:
        raise ContaminationError(
            f"fine-tuning on {dataset}'s {split!r} split is refused: only its train split may be seen; the "
            f"validation and test borders hold the data the model is evaluated on")
    if not 0.0 <= early_stop_fraction < 0.5:
        raise ValueError(f"early_stop_fraction must be in [0, 0.5), got {early_stop_fraction}")
    ds = load_benchmark(benchmarks_dir, dataset)
    scaled_TC, borders = scaled_values(ds)
    start, end = borders.train
    train_TC = scaled_TC[start:end]
    width = window_length + 1
    stride = stride or max(1, window_length // 4)
    held_out = int(round(early_stop_fraction * len(train_TC)))
    held_out = held_out if held_out >= 2 else 0  # one input and one label at least
    cut = len(train_TC) - held_out
    out = Path(out_dir)
    train_NW = _windows(train_TC[:cut], width, stride)
    if len(train_NW) == 0:
        raise ValueError(f"{dataset}: its train split ({len(train_TC)} rows, {held_out} of them held out) is shorter "
                         f"than one window of {width} points; lower the window length")
    parts = {TRAIN_DIR: (train_NW, np.ones_like(train_NW, np.uint8)),
             VAL_DIR: _heldout_windows(train_TC, cut, width, max(1, stride // 4))}
    shards, counts = {}, {}
    for split_dir, (windows_NW, loss_NW) in parts.items():
        shards[split_dir] = _write(out / split_dir, windows_NW, loss_NW, window_length, f"{dataset}/{split_dir}",
                                   rows_per_shard)
        counts[split_dir] = len(windows_NW)
    manifest = minimal_manifest(window_length, shards, source={"benchmark": dataset, "split": ALLOWED_SPLIT,
                                                               "rows": [start, end], "stride": stride})
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return FinetuneData(out, dataset, ALLOWED_SPLIT, (start, end), counts[TRAIN_DIR], counts[VAL_DIR])


def _windows(values_TC: np.ndarray, width: int, stride: int) -> np.ndarray:
    """``[N, width]`` windows of every channel, channel-major, every ``stride`` rows."""
    if len(values_TC) < width:
        return np.zeros((0, width), np.float32)
    starts = np.arange(0, len(values_TC) - width + 1, stride)
    return np.concatenate([np.stack([values_TC[s:s + width, c] for s in starts])
                           for c in range(values_TC.shape[1])]).astype(np.float32)


def _heldout_windows(values_TC: np.ndarray, cut: int, width: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ending in rows ``cut:`` (every ``every`` rows, the last row always), their context
    reaching back before ``cut``; the loss mask keeps only the points at rows >= ``cut``."""
    T, C = values_TC.shape
    first_end = max(cut + 1, width)
    if cut >= T or T < width:
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.uint8)
    ends = sorted(set(range(first_end, T + 1, every)) | {T})
    windows = np.concatenate([np.stack([values_TC[e - width:e, c] for e in ends]) for c in range(C)])
    loss = np.concatenate([np.stack([np.arange(e - width, e) >= cut for e in ends]) for _ in range(C)])
    return windows.astype(np.float32), loss.astype(np.uint8)


def _write(folder: Path, windows_NW: np.ndarray, loss_NW: np.ndarray, window_length: int, name: str,
           rows_per_shard: int) -> list[dict]:
    """The windows as shards through the preprocessing job's own writer (one series per row;
    ``loss_NW`` marks the points whose prediction counts)."""
    n, width = windows_NW.shape
    rows = PackedRows(values_RW=windows_NW, segment_ids_RW=np.ones((n, width), np.int32),
                      loss_mask_RW=loss_NW, seg_mean=[[0.0]] * n, seg_std=[[1.0]] * n,
                      seg_series=[[f"{name}/{i}"] for i in range(n)], seg_lengths=[[width]] * n)
    fs, root = resolve_filesystem(str(folder))
    return write_named_shards(fs, root, rows, window_length, OutputConfig(rows_per_shard=rows_per_shard))
