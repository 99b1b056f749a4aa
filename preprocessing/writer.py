"""Shard writing and atomic publication to a local folder or an ``s3://`` prefix.

A run writes every shard under ``<output>/_tmp-<runid>/{train,val}/`` and then publishes:
(1) remove any previous ``manifest.json`` (so the output never looks complete while it holds a
mix of two runs), (2) replace ``train/`` and ``val/`` by the new shards, (3) write the reports,
(4) write ``manifest.json`` LAST, (5) delete the temporary folder. A run killed at any point
before (4) leaves no manifest, so readers treat the output as incomplete.

Shards are byte-identical across re-runs with the same inputs and config: rows arrive in a
fixed order, the shuffle is seeded, and Parquet files carry no timestamps (pyarrow writes
only the library version as ``created_by``).
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from preprocessing.config import OutputConfig
from preprocessing.schema import MANIFEST_FILE, SHARD_PATTERN, window_schema

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


@dataclass
class ShardWriter:
    """Writes packed rows of one split into ``shard-NNNNN.parquet`` files of ``rows_per_shard``
    rows, through a bounded, seeded shuffle buffer (mixes rows from different datasets and pack
    batches without holding the corpus in memory)."""

    fs: pafs.FileSystem
    directory: str
    window_length: int
    options: OutputConfig
    shuffle_buffer_rows: int
    seed: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self.schema = window_schema(self.window_length)
        self._rng = np.random.default_rng(self.seed)
        self.fs.create_dir(self.directory, recursive=True)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table.select(list(SHARD_COLUMNS)))
        self._buffered += table.num_rows
        per = self.options.rows_per_shard
        while self._buffered >= self.shuffle_buffer_rows + per:
            self._emit(per)

    def _emit(self, rows: int) -> None:
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        if self.shuffle_buffer_rows > 0:
            perm = self._rng.permutation(table.num_rows)
            out, rest = table.take(perm[:rows]), table.take(np.sort(perm[rows:]))
        else:
            out, rest = table.slice(0, rows), table.slice(rows)
        self._write(out)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows

    def close(self) -> None:
        while self._buffered > 0:
            self._emit(min(self._buffered, self.options.rows_per_shard))

    def _write(self, table: pa.Table) -> None:
        name = SHARD_PATTERN.format(index=len(self.shards))
        path = join(self.directory, name)
        table = pa.Table.from_arrays([table.column(c).combine_chunks() for c in SHARD_COLUMNS], schema=self.schema)
        pq.write_table(
            table, path, filesystem=self.fs, compression=self.options.compression,
            compression_level=self.options.compression_level, use_dictionary=["seg_series"],
            write_statistics=False, row_group_size=max(1, table.num_rows),
        )
        mask = table.column("loss_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.shards.append({"file": name, "rows": table.num_rows, "points": int(mask.sum())})
        log.info("wrote %s (%d rows)", path, table.num_rows)


def publish(
    fs: pafs.FileSystem, output: str, tmp: str, splits: list[str], files: dict[str, bytes], manifest: dict[str, Any]
) -> None:
    """Move the finished shards from ``tmp`` into ``output`` and write ``files`` (reports), then the
    manifest LAST. See the module docstring for why this order."""
    manifest_path = join(output, MANIFEST_FILE)
    if exists(fs, manifest_path):
        fs.delete_file(manifest_path)
    for split in splits:
        final_dir = join(output, split)
        delete_dir(fs, final_dir)
        fs.create_dir(final_dir, recursive=True)
        src_dir = join(tmp, split)
        for info in fs.get_file_info(pafs.FileSelector(src_dir, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                fs.move(info.path, join(final_dir, info.base_name))
    for name, data in files.items():
        write_bytes(fs, join(output, name), data)
    write_bytes(fs, manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    delete_dir(fs, tmp)
