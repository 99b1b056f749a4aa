"""The packed-window shard format: the one contract between the data plane and the trainer.

A preprocessing run writes, under its output location (local folder or s3:// prefix)::

    manifest.json            written LAST; its presence means the run is complete
    report.json, report.html curation report
    train/shard-00000.parquet ...
    val/shard-00000.parquet ...   held-out windows (same schema)

Every Parquet row is ONE packed window of ``window_length + 1`` points (the trainer splits it
into ``inputs = w[:-1]`` and ``labels = w[1:]``). Logical columns (what :func:`decode_batch`
returns, whatever the physical layout):

=================  ===============================  =============================================
column             logical type                     meaning
=================  ===============================  =============================================
values             float32[W+1]                     normalised values; padding slots hold 0.0
segment_ids        int32[W+1]                       0 = padding, 1..k = k-th series chunk in row
loss_mask          uint8[W+1]                       1 where the point is a real, observed target
seg_mean           list<float64>                    per segment (index i -> segment id i+1): mean
seg_std            list<float64>                    ... and std used to normalise it (1.0 = none)
seg_series         list<string>                     ... stable series key "domain/dataset/series"
=================  ===============================  =============================================

Physical layouts of the three dense columns (``window_schema(window_length, layout)``; the
layout is also recorded in the schema metadata key ``timemoe.layout``):

- ``"bytes"`` (what ``jobs.preprocess`` writes): ``fixed_size_binary[(W+1) * itemsize]``, the
  row's little-endian float32 / int32 / uint8 array as raw bytes, non-nullable. Parquet writes
  such a column without per-element repetition levels, about 3x faster than a fixed-size list
  (measured: the shard write was half of the preprocessing CPU time), and the file is the same
  size after compression; decoding is a zero-copy reinterpretation.
- ``"list"`` (the original layout, still accepted everywhere): ``fixed_size_list<T>[W+1]``.

Readers must go through :func:`decode_batch` (it accepts both layouts, as Arrow arrays, as
numpy object arrays of ``bytes`` or arrays, or as 2-D arrays, the forms pyarrow and Ray Data
hand over) rather than interpret the column types themselves.

Segments are contiguous runs of one id, in increasing order from 1, and never straddle rows.
Mapping back: ``raw = values * seg_std[id-1] + seg_mean[id-1]``.

This module imports no torch: the trainer turns the numpy arrays it returns into tensors.
"""
from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from preprocessing.storage import resolve_filesystem

SCHEMA_VERSION = 1
TRAIN_DIR = "train"
VAL_DIR = "val"
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.parquet"


LAYOUTS = ("list", "bytes")
DENSE_DTYPES = {"values": np.dtype("<f4"), "segment_ids": np.dtype("<i4"), "loss_mask": np.dtype("u1")}


def window_schema(window_length: int, layout: str = "list") -> pa.Schema:
    """Arrow schema of a shard for windows of ``window_length + 1`` points; ``layout`` is the
    physical type of the dense columns (see the module docstring): ``"list"`` (fixed-size
    lists) or ``"bytes"`` (fixed-size binary, what the preprocessing job writes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown shard layout {layout!r}; known: {LAYOUTS}")
    width = window_length + 1

    def dense(name: str) -> pa.Field:
        dtype = DENSE_DTYPES[name]
        kind = pa.binary(width * dtype.itemsize) if layout == "bytes" else pa.list_(pa.from_numpy_dtype(dtype), width)
        return pa.field(name, kind, nullable=False)

    return pa.schema(
        [
            dense("values"),
            dense("segment_ids"),
            dense("loss_mask"),
            pa.field("seg_mean", pa.list_(pa.float64()), nullable=False),
            pa.field("seg_std", pa.list_(pa.float64()), nullable=False),
            pa.field("seg_series", pa.list_(pa.string()), nullable=False),
        ],
        metadata={b"timemoe.schema_version": str(SCHEMA_VERSION).encode(), b"timemoe.layout": layout.encode()},
    )


def _from_bytes(data: bytes | memoryview | np.ndarray, rows: int, row_bytes: int, stored: np.dtype,
                dtype: np.dtype) -> np.ndarray:
    """``rows`` rows of ``row_bytes`` raw little-endian bytes each -> ``[rows, W+1]`` of ``dtype``."""
    width = row_bytes // stored.itemsize
    if rows == 0:
        return np.zeros((0, width), dtype)
    return np.frombuffer(data, dtype=stored).reshape(rows, width).astype(dtype, copy=False)


def _as_matrix(column: object, stored: np.dtype, dtype: np.dtype) -> np.ndarray:
    """Turn a batch column (Arrow fixed-size list or fixed-size binary; numpy object array of
    arrays or of ``bytes``; numpy bytes array; 2-D array -- as Ray Data or pyarrow may hand it
    over) into a dense ``[B, W+1]`` array of ``dtype``. ``stored`` is the dtype of the raw
    bytes of the ``"bytes"`` layout."""
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        if isinstance(column, pa.ChunkedArray):
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        if pa.types.is_fixed_size_binary(column.type):
            if column.null_count:
                raise ValueError("dense shard column holds nulls")
            size = column.type.byte_width
            buf = column.buffers()[1]
            data = memoryview(buf)[column.offset * size:(column.offset + len(column)) * size]
            return _from_bytes(data, len(column), size, stored, dtype)
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)
    array = np.asarray(column)
    if array.dtype.kind in "SV":  # numpy fixed-width bytes: one row per element
        return _from_bytes(np.ascontiguousarray(array).view(np.uint8), len(array), array.dtype.itemsize, stored, dtype)
    if array.dtype == object:
        if len(array) and isinstance(array[0], (bytes, bytearray, memoryview)):
            return _from_bytes(b"".join(array.tolist()), len(array), len(array[0]), stored, dtype)
        array = np.stack([np.asarray(row) for row in array]) if len(array) else array.reshape(0, 0)
    return array.astype(dtype, copy=False)


def decode_batch(batch: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Dense arrays of a batch of shard rows, for either physical layout: ``values`` float32
    ``[B, W+1]``, ``segment_ids`` int32 ``[B, W+1]``, ``loss_mask`` bool ``[B, W+1]``."""
    return {
        "values": _as_matrix(batch["values"], DENSE_DTYPES["values"], np.dtype(np.float32)),
        "segment_ids": _as_matrix(batch["segment_ids"], DENSE_DTYPES["segment_ids"], np.dtype(np.int32)),
        "loss_mask": _as_matrix(batch["loss_mask"], DENSE_DTYPES["loss_mask"], np.dtype(np.uint8)).astype(bool),
    }


def split_windows(values: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Split ``[B, W+1]`` windows into the model's training inputs, all ``[B, W]``.

    ``loss_mask[t]`` is true when label ``t`` (window point t+1) is an observed point of the
    SAME series as input ``t``: a target never crosses a segment boundary or lands on padding.
    """
    inputs_seg = segment_ids[:, :-1]
    labels_seg = segment_ids[:, 1:]
    target_ok = (labels_seg == inputs_seg) & (inputs_seg > 0) & loss_mask[:, 1:].astype(bool)
    return {
        "inputs": np.ascontiguousarray(values[:, :-1], dtype=np.float32),
        "labels": np.ascontiguousarray(values[:, 1:], dtype=np.float32),
        "segment_ids": np.ascontiguousarray(inputs_seg, dtype=np.int32),
        "loss_mask": np.ascontiguousarray(target_ok),
    }


# ----------------------------------------------------------------------------- manifest reading
# Readers find the shards through the manifest, never by listing folders: a folder may hold a
# half-written run, and the manifest is written last.


def minimal_manifest(window_length: int, shards: dict[str, list[dict]], **extra) -> dict:
    """The keys every reader relies on: ``schema_version``, ``window_length``, the shards per split
    in order (``{"file", "rows", ...}`` each) and the rows per split. The preprocessing job adds
    its provenance (config, inputs, counts); other writers (fine-tuning data, tests) may not."""
    return {"schema_version": SCHEMA_VERSION, "window_length": window_length, "width": window_length + 1,
            "shards": shards, "rows": {split: sum(s["rows"] for s in entries) for split, entries in shards.items()},
            **extra}


def read_manifest(url: str) -> dict:
    """The ``manifest.json`` of a finished run at ``url`` (folder or s3:// prefix). Raises
    ``FileNotFoundError`` when absent: the run is incomplete or never happened."""
    fs, base = resolve_filesystem(url)
    path = base + "/" + MANIFEST_FILE
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{url}: no {MANIFEST_FILE} (run incomplete or output missing)")
    with fs.open_input_stream(path) as fh:
        manifest = json.loads(fh.read())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{url}: schema_version {manifest.get('schema_version')} != supported {SCHEMA_VERSION}")
    return manifest


def list_shards(url: str, split: str = TRAIN_DIR) -> list[str]:
    """Shard locations (same scheme as ``url``) of ``split`` in manifest order."""
    manifest = read_manifest(url)
    root = url.rstrip("/")
    return [f"{root}/{split}/{s['file']}" for s in manifest["shards"].get(split, [])]
