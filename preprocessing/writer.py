"""Shard writing and atomic publication to a local folder or an ``s3://`` prefix.

Ray tasks write packed rows as Parquet files with temporary names under
``<output>/_tmp-<runid>/{train,val}/``. The driver then publishes: (1) remove any previous
``manifest.json`` (so the output never looks complete while it holds a mix of two runs),
(2) replace ``train/`` and ``val/`` by the new files, renamed ``shard-NNNNN.parquet`` in their
final order, (3) write the reports, (4) write ``manifest.json`` LAST, (5) delete the temporary
folder. A run killed at any point before (4) leaves no manifest, so readers treat the output as
incomplete.

Shards are byte-identical across re-runs with the same inputs and config: rows arrive in a
fixed order, shuffles are seeded, and Parquet files carry no timestamps (pyarrow writes only
the library version as ``created_by``).
"""
from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from preprocessing.config import OutputConfig
from preprocessing.pack import PackedRows
from preprocessing.schema import DENSE_DTYPES, MANIFEST_FILE, SHARD_PATTERN, window_schema

log = logging.getLogger(__name__)

SHARD_COLUMNS = ("values", "segment_ids", "loss_mask", "seg_mean", "seg_std", "seg_series")


def resolve(url: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://bucket/prefix`` URL. S3 endpoints and
    credentials come from the standard AWS environment (``AWS_ENDPOINT_URL`` etc.)."""
    if "://" in url and not url.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(url)
        return fs, path.rstrip("/")
    path = url[len("file://"):] if url.startswith("file://") else url
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


SHARD_LAYOUT = "bytes"  # physical layout of the dense columns (see preprocessing/schema.py)


def _dense_column(a_RW: np.ndarray, dtype: np.dtype, layout: str) -> pa.Array:
    """One dense ``[R, W]`` array as a shard column, zero copy (rows of a C-contiguous array)."""
    a_RW = np.ascontiguousarray(a_RW, dtype=dtype)
    rows, width = a_RW.shape
    if layout == "bytes":
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width * dtype.itemsize), rows,
                                                    [None, pa.py_buffer(a_RW.reshape(-1).view(np.uint8))])
    return pa.FixedSizeListArray.from_arrays(pa.array(a_RW.reshape(-1)), width)


def rows_table(rows: PackedRows, start: int, end: int, window_length: int, layout: str = SHARD_LAYOUT) -> pa.Table:
    """Rows ``[start, end)`` of packed rows as an Arrow table of the shard schema (zero copy
    for the dense columns)."""
    dense = [(rows.values_RW, "values"), (rows.segment_ids_RW, "segment_ids"), (rows.loss_mask_RW, "loss_mask")]
    return pa.Table.from_arrays(
        [_dense_column(a_RW[start:end], DENSE_DTYPES[name], layout) for a_RW, name in dense]
        + [pa.array(rows.seg_mean[start:end], pa.list_(pa.float64())),
           pa.array(rows.seg_std[start:end], pa.list_(pa.float64())),
           pa.array(rows.seg_series[start:end], pa.list_(pa.string()))],
        schema=window_schema(window_length, layout),
    )


def write_shard(fs: pafs.FileSystem, path: str, table: pa.Table, options: OutputConfig) -> None:
    """One Parquet shard: one row group, no statistics, no timestamps (byte-reproducible)."""
    pq.write_table(
        table, path, filesystem=fs, compression=options.compression,
        compression_level=options.compression_level, use_dictionary=["seg_series"],
        write_statistics=False, row_group_size=max(1, table.num_rows),
    )


def write_packed(fs: pafs.FileSystem, directory: str, rows: PackedRows, window_length: int,
                 options: OutputConfig) -> list[dict[str, Any]]:
    """Write packed rows as files of at most ``rows_per_shard`` rows under ``directory`` with
    temporary unique names (the final ``shard-NNNNN`` names are given at publish)."""
    import uuid

    if rows.num_rows == 0:
        return []
    fs.create_dir(directory, recursive=True)
    out = []
    per = options.rows_per_shard
    for start in range(0, rows.num_rows, per):
        end = min(start + per, rows.num_rows)
        path = join(directory, f"part-{uuid.uuid4().hex}.parquet")
        write_shard(fs, path, rows_table(rows, start, end, window_length), options)
        points = int(sum(sum(lengths) for lengths in rows.seg_lengths[start:end]))
        out.append({"path": path, "rows": end - start, "points": points})
        log.info("wrote %s (%d rows)", path, end - start)
    return out


def publish(
    fs: pafs.FileSystem, output: str, tmp: str, files_by_split: dict[str, list[str]], files: dict[str, bytes],
    manifest: dict[str, Any],
) -> None:
    """Move the finished shards (temporary paths, in their final order) to
    ``<output>/<split>/shard-NNNNN.parquet``, write ``files`` (reports), then the manifest LAST.
    See the module docstring for why this order."""
    manifest_path = join(output, MANIFEST_FILE)
    if exists(fs, manifest_path):
        fs.delete_file(manifest_path)
    for split, paths in files_by_split.items():
        final_dir = join(output, split)
        delete_dir(fs, final_dir)
        fs.create_dir(final_dir, recursive=True)
        for index, src in enumerate(paths):
            fs.move(src, join(final_dir, SHARD_PATTERN.format(index=index)))
    for name, data in files.items():
        write_bytes(fs, join(output, name), data)
    # written beside the shards, then moved: a rename on a local disk, one object PUT on S3, so a
    # kill mid-write never leaves a truncated manifest.json that a reader would take for complete
    staged = join(tmp, MANIFEST_FILE)
    fs.create_dir(tmp, recursive=True)  # a run that wrote no shard has no tmp folder yet
    write_bytes(fs, staged, json.dumps(manifest, indent=2, sort_keys=True).encode())
    fs.move(staged, manifest_path)
    delete_dir(fs, tmp)
    # temp folders of earlier runs that were killed before publishing: this output is now whole
    leftovers = [i.path for i in fs.get_file_info(pafs.FileSelector(output, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("_tmp-")]
    for path in leftovers:
        delete_dir(fs, path)
    if leftovers:
        log.info("removed %d temporary folder(s) of interrupted runs: %s", len(leftovers), leftovers)
