"""Shard writing and safe publication to a local folder or an ``s3://`` prefix.

Ray tasks write packed rows as Parquet files with temporary names under a fresh staging folder
``<output>/_tmp-<runid>/{train,val}/``; nothing under ``train/`` or ``val/`` changes while the
run computes, and a run that fails (or publishes nothing: the job refuses an empty result)
only removes its staging folder. The driver then publishes:

1. check again that ``train/`` and ``val/`` hold only files this job wrote (listed in the
   current ``manifest.json`` or in a publish journal); a foreign file stops the run before
   anything is touched (:func:`foreign_files`), since the trainer would read it as a shard;
2. write the journal ``_publishing.json`` (every shard name of the old and the new output), so
   that a publish killed mid-way leaves a record of which files are the job's own;
3. remove the old ``manifest.json`` (the output never looks complete while it holds a mix of
   two runs), move the new shards to ``<split>/shard-NNNNN.parquet`` (replacing same-named old
   ones), delete the old shards the new output does not reuse (only names from the old
   manifest or journal), write the reports, write ``manifest.json`` LAST, delete the journal
   and the staging folder.

A run killed at any point before the manifest is written leaves no manifest, so readers treat
the output as incomplete; a re-run finds the journal and replaces the files it names. Files
the job did not write are never deleted or overwritten. Names starting with ``_tmp-`` and
``_publishing.json`` in the output folder belong to the job.

Shards are byte-identical across re-runs with the same inputs and config: rows arrive in a
fixed order, shuffles are seeded, and Parquet files carry no timestamps (pyarrow writes only
the library version as ``created_by``).
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from preprocessing.config import OutputConfig
from preprocessing.errors import PreprocessError
from preprocessing.pack import PackedRows
from preprocessing.schema import DENSE_DTYPES, MANIFEST_FILE, SHARD_PATTERN, TRAIN_DIR, VAL_DIR, window_schema

log = logging.getLogger(__name__)

SHARD_COLUMNS = ("values", "segment_ids", "loss_mask", "seg_mean", "seg_std", "seg_series")


def join(base: str, *parts: str) -> str:
    """A path inside a filesystem (always '/'-separated, also for S3 keys)."""
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


def write_named_shards(fs: pafs.FileSystem, directory: str, rows: PackedRows, window_length: int,
                       options: OutputConfig) -> list[dict[str, Any]]:
    """Packed rows as the final ``shard-NNNNN`` files under ``directory`` in one go, for writers
    without the job's publish step (fine-tuning data, benchmarks); returns the entries
    ``schema.minimal_manifest`` lists (``file``, ``rows``, ``points`` = window slots)."""
    fs.create_dir(directory, recursive=True)
    entries = []
    per = options.rows_per_shard
    for index, start in enumerate(range(0, rows.num_rows, per)):
        end = min(start + per, rows.num_rows)
        name = SHARD_PATTERN.format(index=index)
        write_shard(fs, join(directory, name), rows_table(rows, start, end, window_length), options)
        entries.append({"file": name, "rows": end - start, "points": (end - start) * (window_length + 1)})
    return entries


JOURNAL_FILE = "_publishing.json"
REPORT_FILES = ("report.json", "report.html")
SPLITS = (TRAIN_DIR, VAL_DIR)
# The only names the job gives shards: a name from a manifest or journal that does not look like
# this (``../x``, a subfolder) is never trusted as the job's own, so never deleted.
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.parquet$")


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when absent; PreprocessError when it is not one."""
    if not exists(fs, path):
        return None
    try:
        data = json.loads(read_bytes(fs, path))
    except (ValueError, UnicodeDecodeError) as e:
        raise PreprocessError(f"{path} is not a JSON file this job wrote ({e}); move it away or choose another "
                              f"--output") from None
    if not isinstance(data, dict):
        raise PreprocessError(f"{path} is not a file this job wrote; move it away or choose another --output")
    return data


def owned_files(fs: pafs.FileSystem, output: str) -> dict[str, set[str]]:
    """Per split, the shard names this job wrote into ``output``: those of the current
    ``manifest.json`` plus those of a publish journal left by a publish that was killed."""
    named: dict[str, list[object]] = {split: [] for split in SPLITS}
    manifest = _read_json(fs, join(output, MANIFEST_FILE))
    for split, shards in ((manifest or {}).get("shards") or {}).items():
        if split in named:
            named[split] += [s.get("file") for s in shards if isinstance(s, dict)]
    journal = _read_json(fs, join(output, JOURNAL_FILE))
    for split, names in ((journal or {}).get("files") or {}).items():
        if split in named:
            named[split] += list(names)
    return {split: {n for n in names if isinstance(n, str) and _SHARD_NAME.match(n)} for split, names in named.items()}


def foreign_files(fs: pafs.FileSystem, output: str) -> list[str]:
    """Paths (relative to ``output``) that this job did not write but would replace or that the
    trainer would read: anything under ``train/`` or ``val/`` not named by the manifest or a
    journal, and reports without a manifest or journal beside them. ``["."]`` when ``output``
    itself is a file."""
    info = fs.get_file_info(output)
    if info.type == pafs.FileType.File:
        return ["."]
    if info.type == pafs.FileType.NotFound:
        return []
    owned = owned_files(fs, output)
    found = []
    for split in SPLITS:
        folder = join(output, split)
        for entry in fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True)):
            name = posixpath.relpath(entry.path, folder)
            if entry.type == pafs.FileType.File and name not in owned.get(split, set()):
                found.append(join(split, name))
    if not any(owned.values()) and not exists(fs, join(output, MANIFEST_FILE)) \
            and not exists(fs, join(output, JOURNAL_FILE)):
        found += [name for name in REPORT_FILES if exists(fs, join(output, name))]
    return sorted(found)


def check_no_foreign_files(fs: pafs.FileSystem, output: str, url: str | None = None) -> None:
    """PreprocessError naming the files when :func:`foreign_files` finds any; ``url`` is how the
    user wrote ``output`` (``s3://...``), for the message."""
    url = (url or output).rstrip("/")
    found = foreign_files(fs, output)
    if found == ["."]:
        raise PreprocessError(f"--output {url} is a file, not a folder")
    if found:
        shown = ", ".join(f"{url}/{name}" for name in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise PreprocessError(f"--output {url} holds {len(found)} file(s) this job did not write: {shown}; "
                              f"the trainer would read them as shards or publishing would replace them: move "
                              f"them away or choose another --output")


def _location(url: str) -> str:
    """A comparable form of a local path (absolute, symlinks resolved) or an s3:// URL."""
    if "://" in url and not url.startswith("file://"):
        scheme, rest = url.split("://", 1)
        return f"{'s3' if scheme in ('s3', 's3a') else scheme}://{rest.strip('/')}"
    import os

    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_output_location(inputs: list[str], output: str) -> None:
    """PreprocessError when ``output`` is an input folder or lies inside one: the job would read
    its own shards, reports and manifest back as input on the next run (and a glob input that
    can match them is treated the same way)."""
    import fnmatch

    out = _location(output)
    ours = [join(out, name) for name in (MANIFEST_FILE, *REPORT_FILES, JOURNAL_FILE)] + \
           [join(out, split, SHARD_PATTERN.format(index=0)) for split in SPLITS]
    for url in inputs:
        if any(c in url for c in "*?["):
            fixed = url[:min(url.index(c) for c in "*?[" if c in url)]
            root = fixed.rsplit("/", 1)[0] if "/" in fixed else ""
            rest = url[len(root):]
            pattern = _location(root or ".").rstrip("/") + (rest if rest.startswith("/") else "/" + rest)
            if _inside(out, _location(root or ".")) and any(fnmatch.fnmatch(p, pattern) for p in ours):
                raise PreprocessError(f"--output {output} lies where the input glob {url} matches: the job would read "
                                      f"its own output back; choose an --output outside the inputs")
            continue
        where = _location(url)
        if out == where:
            raise PreprocessError(f"--output {output} is the input {url}: the job would read its own output back; "
                                  f"choose an --output outside the inputs")
        if _inside(out, where):
            raise PreprocessError(f"--output {output} is inside the input folder {url}: the job would read its own "
                                  f"output back; choose an --output outside the inputs")


def _write_via_tmp(fs: pafs.FileSystem, tmp: str, final: str, data: bytes) -> None:
    """Write ``data`` beside the shards, then move it in place: a rename on a local disk, one
    object PUT on S3, so a kill mid-write never leaves a truncated file under its final name."""
    staged = join(tmp, posixpath.basename(final))
    fs.create_dir(tmp, recursive=True)  # a run that wrote no shard has no tmp folder yet
    write_bytes(fs, staged, data)
    fs.move(staged, final)


def publish(
    fs: pafs.FileSystem, output: str, tmp: str, files_by_split: dict[str, list[str]], files: dict[str, bytes],
    manifest: dict[str, Any],
) -> None:
    """Move the finished shards (temporary paths, in their final order) to
    ``<output>/<split>/shard-NNNNN.parquet``, write ``files`` (reports), then the manifest LAST.
    See the module docstring for the order and why."""
    check_no_foreign_files(fs, output)  # again: files may have appeared while the run computed
    old = owned_files(fs, output)
    new = {split: [SHARD_PATTERN.format(index=i) for i in range(len(paths))] for split, paths in files_by_split.items()}
    journal = {"files": {split: sorted(old.get(split, set()) | set(new.get(split, [])))
                         for split in sorted(set(old) | set(new))}}
    _write_via_tmp(fs, tmp, join(output, JOURNAL_FILE), json.dumps(journal, sort_keys=True).encode())
    manifest_path = join(output, MANIFEST_FILE)
    if exists(fs, manifest_path):
        fs.delete_file(manifest_path)
    for split, paths in files_by_split.items():
        final_dir = join(output, split)
        fs.create_dir(final_dir, recursive=True)
        for src, name in zip(paths, new[split]):
            fs.move(src, join(final_dir, name))
    for split, names in old.items():
        for name in sorted(names - set(new.get(split, []))):
            path = join(output, split, name)
            if exists(fs, path):
                fs.delete_file(path)
    for name, data in files.items():
        write_bytes(fs, join(output, name), data)
    _write_via_tmp(fs, tmp, manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    fs.delete_file(join(output, JOURNAL_FILE))
    delete_dir(fs, tmp)
    # staging folders of earlier runs that were killed before publishing: this output is now whole
    leftovers = [i.path for i in fs.get_file_info(pafs.FileSelector(output, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("_tmp-")]
    for path in leftovers:
        delete_dir(fs, path)
    if leftovers:
        log.info("removed %d temporary folder(s) of interrupted runs: %s", len(leftovers), leftovers)
