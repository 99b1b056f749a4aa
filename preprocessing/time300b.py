"""Time-300B on disk (spec section 4): reader and writer.

A dataset folder holds ``meta.json`` and ``data-{i}-of-{n}.bin`` (float32). Offsets in
``meta.json``'s ``scales`` are global element offsets over the files concatenated in order of
i, so a sequence may straddle two files; ``mean``/``std`` in a scale entry mean the stored
values are normalised (raw = x * std + mean).

Reading is planned once and streamed: :func:`load_meta` parses ``meta.json`` (tens of MB) ONCE
in the planner; :func:`plan_chunks` cuts the scales list into contiguous chunks of about
``block_elements`` points; each :class:`Time300BChunk` carries only its own slice of offsets,
lengths and scales, and :func:`read_chunk` reads its element range with one ranged read per
file and slices every sequence out of that buffer with numpy (no per-sequence I/O).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from preprocessing import storage
from preprocessing.formats_table import IngestError, concat, quarantine_table, series_table
from preprocessing.storage import StorageOptions

_FILE_RE = re.compile(r"^data-(\d+)-of-(\d+)\.bin$")


# ------------------------------------------------------------------------------ writer


class Time300BWriter:
    """Streaming writer of one dataset folder: sequences go to ``data-{i}-of-{n}.bin`` files of
    at most ``max_elements_per_file`` elements (a sequence straddles two files at a boundary);
    ``meta.json`` is written last, so a folder without it is an unfinished write. Files are
    written under temporary names and renamed once ``n`` is known."""

    def __init__(self, path: str, max_elements_per_file: int = 2**30, options: StorageOptions | None = None):
        self.path, self.cap, self.options = path, int(max_elements_per_file), options
        self.entries: list[dict] = []
        self.parts: list[tuple[str, int]] = []   # (temporary URL, elements)
        self.total = 0
        self._out = None
        self._in_file = 0

    def _roll(self) -> None:
        if self._out is not None:
            self._out.close()
        url = storage.join(self.path, f"_part-{len(self.parts):05d}.tmp")
        self._out = storage.open_output(url, self.options)
        self.parts.append((url, 0))
        self._in_file = 0

    def _write(self, flat: np.ndarray) -> None:
        flat = np.ascontiguousarray(flat, dtype=np.float32)
        pos = 0
        while pos < len(flat):
            if self._out is None or self._in_file == self.cap:
                self._roll()
            take = min(self.cap - self._in_file, len(flat) - pos)
            self._out.write(flat[pos:pos + take].tobytes())
            self._in_file += take
            self.parts[-1] = (self.parts[-1][0], self._in_file)
            pos += take

    def add_many(self, flat: np.ndarray, lengths: np.ndarray, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None) -> None:
        """Append sequences given as one flat buffer (already normalised if mean/std are given)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        offs = self.total + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if mean is None:
            self.entries += [{"offset": int(o), "length": int(n)} for o, n in zip(offs, lengths)]
        else:
            self.entries += [{"offset": int(o), "length": int(n), "mean": float(m), "std": float(s)}
                             for o, n, m, s in zip(offs, lengths, mean, std)]
        self._write(flat)
        self.total += int(lengths.sum())

    def add(self, values: np.ndarray, scale: tuple[float, float] | None = None) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if scale is None:
            return self.add_many(values, np.array([len(values)]))
        mean, std = float(scale[0]), float(scale[1])
        stored = ((values.astype(np.float64) - mean) / std).astype(np.float32)
        self.add_many(stored, np.array([len(values)]), np.array([mean]), np.array([std]))

    def close(self) -> dict:
        if self._out is not None:
            self._out.close()
        if not self.parts:
            self._roll()
            self._out.close()
        n = len(self.parts)
        files = {}
        fs, _ = storage.resolve_filesystem(self.path, self.options)
        for i, (tmp, count) in enumerate(self.parts):
            name = f"data-{i + 1}-of-{n}.bin"
            fs.move(storage.resolve_filesystem(tmp, self.options)[1],
                    storage.resolve_filesystem(storage.join(self.path, name), self.options)[1])
            files[name] = int(count)
        meta = {"num_sequences": len(self.entries), "dtype": "float32", "files": files, "scales": self.entries}
        storage.publish_bytes(storage.join(self.path, "meta.json"), json.dumps(meta).encode(), self.options)
        return meta


def write_time300b_dataset(path: str, sequences: Iterable[np.ndarray], max_elements_per_file: int = 2**30,
                           scales: Sequence[tuple[float, float] | None] | None = None,
                           options: StorageOptions | None = None) -> dict:
    """Write ``sequences`` (raw values) as one Time-300B dataset folder and return its meta.

    ``scales[i] = (mean, std)`` stores sequence i normalised, ``(x - mean) / std``, with the
    pair recorded in its scale entry (the reader maps it back); None stores it raw. Files hold
    at most ``max_elements_per_file`` elements, so sequences straddle files when it is small.
    """
    w = Time300BWriter(path, max_elements_per_file, options)
    for i, s in enumerate(sequences):
        w.add(s, scales[i] if scales is not None else None)
    return w.close()


# ------------------------------------------------------------------------------ meta + plan


@dataclass
class Time300BMeta:
    """``meta.json`` parsed into arrays (one parse per dataset, in the planner)."""

    folder: str
    files: list[str]              # data file URLs in order of i
    file_elements: np.ndarray     # int64 elements per file (as meta claims)
    offsets: np.ndarray           # int64 global element offset per sequence
    lengths: np.ndarray           # int64
    mean: np.ndarray | None       # float64, NaN where the entry is raw; None if no entry has it
    std: np.ndarray | None
    # Per sequence: OFFSETS_OK, or why its scale entry cannot be trusted (read as a quarantine
    # row instead of data); ``overlaps[i]`` is the sequence that sequence i overlaps (-1: none).
    problems: np.ndarray | None = None
    overlaps: np.ndarray | None = None

    @property
    def total_points(self) -> int:
        return int(self.lengths.sum())


OFFSETS_OK, OFFSETS_BEYOND_FILES, OFFSETS_OVERLAP = 0, 1, 2


def offset_problems(offsets: np.ndarray, lengths: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """``(problems, overlaps)`` per sequence of a dataset whose files hold ``total`` elements:
    OFFSETS_BEYOND_FILES when ``[offset, offset + length)`` ends past the files; OFFSETS_OVERLAP
    when it shares elements with another sequence's range (both are flagged: meta.json is wrong
    about at least one and does not say which), ``overlaps`` naming that other sequence.
    Empty sequences overlap nothing. Offsets and lengths must be non-negative."""
    n = len(offsets)
    problems = np.zeros(n, np.int8)
    overlaps = np.full(n, -1, np.int64)
    ends = offsets + lengths
    beyond = ends > total
    problems[beyond] = OFFSETS_BEYOND_FILES
    order = np.flatnonzero(~beyond & (lengths > 0))
    order = order[np.argsort(offsets[order], kind="stable")]
    if len(order) < 2:
        return problems, overlaps
    starts, stops = offsets[order], ends[order]
    reach = np.maximum.accumulate(stops)              # furthest end among sequences 0..k
    positions = np.arange(len(order))
    # the (latest) sequence reaching that far, among 0..k
    holder = np.maximum.accumulate(np.where(stops == reach, positions, 0))
    hit = np.flatnonzero(starts[1:] < reach[:-1]) + 1  # k starts before an earlier one has ended
    if len(hit):
        mine, theirs = order[hit], order[holder[hit - 1]]
        problems[mine] = OFFSETS_OVERLAP
        problems[theirs] = OFFSETS_OVERLAP
        overlaps[mine] = theirs
        unset = overlaps[theirs] < 0
        overlaps[theirs[unset]] = mine[unset]
    return problems, overlaps


def _bad(folder: str, what: str, claimed: int = 0) -> IngestError:
    return IngestError("bad_meta", f"{storage.join(folder, 'meta.json')}: {what}", claimed)


def load_meta(folder: str, options: StorageOptions | None = None, check_files: bool = True) -> Time300BMeta:
    """Parse and validate a dataset folder's ``meta.json``; raise :class:`IngestError` naming
    the file and the reason (bad_meta, missing_file, truncated_bin). Sequences whose offsets
    reach past the files or overlap another sequence are flagged in ``problems`` (read as
    ``bad_offsets`` quarantine rows), not raised: the rest of the dataset is still good."""
    meta_url = storage.join(folder, "meta.json")
    try:
        raw = storage.read_bytes(meta_url, options)
    except FileNotFoundError:
        raise IngestError("missing_file", f"{meta_url}: meta.json not found") from None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(folder, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("scales"), list) or not isinstance(meta.get("files"), dict):
        raise _bad(folder, "expected an object with 'files' (object) and 'scales' (list)")
    dtype = meta.get("dtype", "float32")
    if dtype != "float32":
        raise _bad(folder, f"dtype {dtype!r} is not supported (float32 only)")
    scales = meta["scales"]
    try:
        # list comprehensions + one np.array each: ~2x faster than np.fromiter over generators
        offsets = np.array([s["offset"] for s in scales], dtype=np.int64)
        lengths = np.array([s["length"] for s in scales], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(folder, f"a scale entry lacks an integer offset/length ({e!r})") from None
    claimed = int(lengths.sum()) if len(lengths) else 0
    if "num_sequences" in meta and meta["num_sequences"] != len(scales):
        raise _bad(folder, f"num_sequences={meta['num_sequences']} but {len(scales)} scale entries", claimed)
    mean = std = None
    if any("mean" in s or "std" in s for s in scales):
        try:  # a missing or null mean/std becomes NaN: that sequence is stored raw
            mean = np.array([s.get("mean") for s in scales], dtype=np.float64)
            std = np.array([s.get("std") for s in scales], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise _bad(folder, f"a scale entry has a non-numeric mean/std ({e})", claimed) from None
    names = sorted(meta["files"], key=lambda n: int(_FILE_RE.match(n).group(1)) if _FILE_RE.match(n) else -1)
    bad_names = [n for n in names if not _FILE_RE.match(n)]
    if bad_names:
        raise _bad(folder, f"file names {bad_names} do not follow data-{{i}}-of-{{n}}.bin", claimed)
    try:
        file_elements = np.array([int(meta["files"][n]) for n in names], dtype=np.int64)
    except (TypeError, ValueError):
        raise _bad(folder, "'files' values must be element counts", claimed) from None
    total = int(file_elements.sum())
    if (lengths < 0).any() or (offsets < 0).any():
        i = int(np.flatnonzero((lengths < 0) | (offsets < 0))[0])
        raise _bad(folder, f"sequence {i} has a negative offset or length", claimed)
    # Wrong offsets of single sequences quarantine those sequences, not the whole dataset.
    problems, overlaps = offset_problems(offsets, lengths, total)
    files = [storage.join(folder, n) for n in names]
    if check_files:
        for url, n in zip(files, file_elements):
            try:
                size = storage.file_info(url, options).size
            except FileNotFoundError:
                size = None
            if size is None:
                raise IngestError("missing_file", f"{url}: listed in meta.json but missing", claimed)
            if size < n * 4:
                raise IngestError("truncated_bin", f"{url}: truncated, {size} bytes but meta.json says {n} "
                                                   f"float32 elements ({n * 4} bytes)", claimed)
    if not problems.any():
        problems = overlaps = None
    return Time300BMeta(folder, files, file_elements, offsets, lengths, mean, std, problems, overlaps)


@dataclass
class Time300BChunk:
    """One read unit: a contiguous slice [first, first+len) of a dataset's scales list."""

    domain: str
    dataset: str
    folder: str
    files: list[str]
    file_elements: np.ndarray
    first: int                    # index of the first sequence (for series names)
    offsets: np.ndarray
    lengths: np.ndarray
    mean: np.ndarray | None
    std: np.ndarray | None
    problems: np.ndarray | None = None    # the chunk's slices of Time300BMeta.problems / overlaps
    overlaps: np.ndarray | None = None

    @property
    def points(self) -> int:
        return int(self.lengths.sum())


def plan_chunks(meta: Time300BMeta, domain: str, dataset: str, block_elements: int = 32 * 2**20) -> list[Time300BChunk]:
    """Cut the scales list into contiguous chunks of about ``block_elements`` points each."""
    n = len(meta.lengths)
    if n == 0:
        return []
    cum = np.cumsum(meta.lengths)
    # chunk k ends at the first sequence whose cumulative length passes (k+1) * block
    bounds = np.searchsorted(cum, np.arange(block_elements, int(cum[-1]) + block_elements, block_elements),
                             side="left") + 1
    bounds = np.unique(np.clip(bounds, 1, n))
    starts = np.concatenate([[0], bounds[:-1]])
    chunks = []
    for a, b in zip(starts.tolist(), bounds.tolist()):
        if b <= a:
            continue
        sl = slice(a, b)
        chunks.append(Time300BChunk(
            domain, dataset, meta.folder, meta.files, meta.file_elements, a,
            meta.offsets[sl].copy(), meta.lengths[sl].copy(),
            None if meta.mean is None else meta.mean[sl].copy(),
            None if meta.std is None else meta.std[sl].copy(),
            None if meta.problems is None else meta.problems[sl].copy(),
            None if meta.overlaps is None else meta.overlaps[sl].copy(),
        ))
    return chunks


# ------------------------------------------------------------------------------ reading


def _read_elements(files: list[str], file_elements: np.ndarray, start: int, stop: int,
                   options: StorageOptions | None) -> np.ndarray:
    """Elements [start, stop) of the concatenated files: one ranged read per file touched."""
    bounds = np.concatenate([[0], np.cumsum(file_elements)])
    parts = []
    for i, url in enumerate(files):
        a, b = max(start, int(bounds[i])), min(stop, int(bounds[i + 1]))
        if a >= b:
            continue
        local = a - int(bounds[i])
        data = storage.read_range(url, local * 4, (b - a) * 4, options)
        if len(data) != (b - a) * 4:
            raise IngestError("truncated_bin", f"{url}: truncated, wanted elements [{local}, {local + b - a}) "
                                               f"but got {len(data) // 4}", int(stop - start))
        parts.append(np.frombuffer(data, dtype=np.float32))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def offset_error(meta: Time300BMeta) -> IngestError | None:
    """The first sequence with bad offsets as an error (``fail_fast``), None if there is none."""
    if meta.problems is None:
        return None
    chunk = Time300BChunk("", "", meta.folder, meta.files, meta.file_elements, 0, meta.offsets, meta.lengths,
                          None, None, meta.problems, meta.overlaps)
    first = _offset_quarantine(chunk, limit=1)
    return IngestError("bad_offsets", first.column("quarantine_message")[0].as_py(),
                       int(first.column("claimed_points")[0].as_py()))


def _offset_quarantine(chunk: Time300BChunk, limit: int | None = None) -> pa.Table:
    """One quarantine row (reason ``bad_offsets``) per sequence of the chunk whose scale entry
    points outside the files or into another sequence, naming meta.json and the offsets."""
    meta_url = storage.join(chunk.folder, "meta.json")
    total = int(chunk.file_elements.sum())
    rows = []
    for k in np.flatnonzero(chunk.problems)[:limit].tolist():
        i, start = chunk.first + k, int(chunk.offsets[k])
        end = start + int(chunk.lengths[k])
        if chunk.problems[k] == OFFSETS_BEYOND_FILES:
            why = f"end beyond the {total} elements its .bin files hold"
        else:
            why = f"overlap sequence {int(chunk.overlaps[k])} (offsets in meta.json are wrong for one of them)"
        rows.append((chunk.domain, chunk.dataset, str(i), chunk.folder, "bad_offsets",
                     f"{meta_url}: sequence {i} offsets [{start}, {end}) {why}", int(chunk.lengths[k])))
    return quarantine_table(rows)


def read_chunk(chunk: Time300BChunk, options: StorageOptions | None = None, source_root: str | None = None) -> pa.Table:
    """The chunk's sequences as a SERIES_SCHEMA table (raw units); sequences with bad offsets
    (:func:`offset_problems`) come as quarantine rows after the good ones."""
    if chunk.problems is not None and chunk.problems.any():
        good = chunk.problems == OFFSETS_OK
        bad = _offset_quarantine(chunk)
        if not good.any():
            return bad
        names = np.arange(chunk.first, chunk.first + len(chunk.lengths))[good].astype(str)
        kept = dataclasses.replace(
            chunk, offsets=chunk.offsets[good], lengths=chunk.lengths[good],
            mean=None if chunk.mean is None else chunk.mean[good], std=None if chunk.std is None else chunk.std[good],
            problems=None, overlaps=None)
        table = read_chunk(kept, options, source_root)
        column = table.schema.get_field_index("series")
        return concat([table.set_column(column, table.schema.field(column), pa.array(names.tolist(), pa.string())),
                       bad])
    offsets, lengths = chunk.offsets, chunk.lengths
    start = int(offsets.min()) if len(offsets) else 0
    stop = int((offsets + lengths).max()) if len(offsets) else 0
    buf = _read_elements(chunk.files, chunk.file_elements, start, stop, options)
    rel = offsets - start
    contiguous = bool(len(rel) and rel[0] == 0 and (rel[1:] == (rel + lengths)[:-1]).all())
    list_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if contiguous:
        flat = buf[: int(list_offsets[-1])]  # zero-copy: the sequences tile the buffer
    else:
        # gather: index of every element = its sequence's start + position inside the sequence
        seq_start = np.repeat(rel - list_offsets[:-1], lengths)
        flat = buf[seq_start + np.arange(int(list_offsets[-1]), dtype=np.int64)]
    if chunk.mean is not None:
        # float32 throughout (the stored values are float32): a float64 detour doubles the traffic
        mean = np.nan_to_num(chunk.mean, nan=0.0).astype(np.float32)
        std = np.where(np.isnan(chunk.std), 1.0, chunk.std).astype(np.float32)
        out = np.repeat(std, lengths)
        np.multiply(out, flat, out=out)
        flat = np.add(out, np.repeat(mean, lengths), out=out)
    names = pc.cast(pa.array(np.arange(chunk.first, chunk.first + len(lengths), dtype=np.int64)), pa.string())
    source = chunk.folder
    return series_table(chunk.domain, chunk.dataset, names, source, flat, list_offsets)


def is_dataset_folder(url: str, options: StorageOptions | None = None) -> bool:
    try:
        return storage.file_info(storage.join(url, "meta.json"), options).type.name == "File"
    except FileNotFoundError:
        return False
