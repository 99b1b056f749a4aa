"""The preprocessing pipeline on Ray Data: read -> (dedup fingerprints) -> clean + normalise +
chunk -> pack -> ordered, shuffled shard writing -> reports -> manifest (last).

The data algorithms are the pure functions of ``clean``, ``normalize``, ``pack`` and
``contamination``; this module only maps them over Arrow batches and wires the stages:

1. ``fingerprint_batch`` (only when ``clean.dedup``): one cheap pass over the series computing a
   64-bit hash of each series' raw values and of its key. The driver keeps two uint64 per series
   (16 bytes: 48M series = 0.8 GB) and, for every group of identical value hashes, drops all but
   the copy whose key hash is smallest: deterministic and independent of read order.
2. ``clean_batch``: contamination guard, cleaning, normalisation, validation split, chunking,
   mixture weights; returns chunk rows and an :class:`Accounting` tally (in the Ray pipeline it
   travels with the block as one carrier row, see ``ACCOUNTING_SPLIT``).
3. ``pack_and_write``: best-fit-decreasing over ``pack.pack_batch_chunks`` chunks at a time;
   the task writes its rows to temporary shard files and returns only file metadata.
4. The driver consumes packed blocks IN ORDER (``preserve_order``), routes them to the train/val
   :class:`ShardWriter` (bounded seeded shuffle), checks the accounting invariant and publishes.

Memory stays bounded: nothing holds the corpus; the driver holds the shuffle buffer, the dedup
hashes and per-dataset counters.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import pickle
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from preprocessing import report as report_mod
from preprocessing.accounting import (
    Accounting,
    AccountingError,
    check_invariant,
    empty_result_reason,
    first_quarantine,
    length_bin,
)
from preprocessing.clean import clean_series
from preprocessing.config import OutputConfig, PreprocessConfig, validate
from preprocessing.contamination import ContaminationIndex
from preprocessing.errors import PreprocessError
from preprocessing.normalize import apply_stats, normalize_run
from preprocessing.pack import REASON_SHORT_TAIL, assemble_rows, chunk_bounds
from preprocessing.schema import MANIFEST_FILE, SCHEMA_VERSION, SHARD_PATTERN, TRAIN_DIR, VAL_DIR
from preprocessing.storage import resolve_filesystem
from preprocessing.writer import (
    check_no_foreign_files,
    check_output_location,
    exists,
    join,
    publish,
    write_packed,
)

if TYPE_CHECKING:
    from preprocessing.catalog import SourceCatalog

log = logging.getLogger(__name__)

CHUNK_SCHEMA = pa.schema([
    ("split", pa.string()), ("key", pa.string()), ("values", pa.large_list(pa.float32())),
    ("mean", pa.float64()), ("std", pa.float64()),
])
# In the Ray pipeline each clean block carries its Accounting as ONE extra row (split "",
# ``key`` = the pickled tally) that pack_and_write forwards to the driver in its metadata
# table: no accounting actor (a process of its own and a blocking call per block), and a
# retried task's tally is discarded with its output instead of being counted twice.
ACCOUNTING_SPLIT = ""
# Files written by the clean task itself (``process_block``) travel the same way: one carrier
# row per file, ``key`` = the JSON of its metadata row.
FILE_SPLIT = "#file"


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep freed memory in the glibc heap instead of returning it to the OS after every batch.

    Batches allocate and free tens of MB of temporaries; by default glibc serves those with
    fresh mmaps, and on small VMs the page faults of re-touching fresh pages cost more than the
    numpy work itself (measured 16 ns/point vs 2.4 with this setting). Once per process; a
    no-op off glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 2**20)   # M_MMAP_THRESHOLD: heap-allocate blocks below 256 MiB
        libc.mallopt(-1, 512 * 2**20)   # M_TRIM_THRESHOLD: keep up to 512 MiB of free heap
    except (OSError, AttributeError):
        pass


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def dataset_of(key: str) -> str:
    """``domain/dataset`` of a series key ``domain/dataset/series`` (series names may hold '/')."""
    return "/".join(key.split("/", 2)[:2])


def unit_hash(text: str) -> float:
    """Deterministic uniform number in [0, 1) from a string (stable across runs and machines)."""
    return hash64(text) / 2.0**64


def values_hash(x: np.ndarray) -> int:
    """64 bits of SHA-1 over the float32 bytes (+ length); SHA-1 is the fastest hashlib digest
    here (~640 MB/s vs ~500 for BLAKE2b) and collisions only matter by accident, not attack."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    nan = np.isnan(x)
    if nan.any():  # NaN payloads differ bit-wise; canonicalise before hashing
        x = np.where(nan, np.float32(np.nan), x)
    h = hashlib.sha1(len(x).to_bytes(8, "little"))
    h.update(memoryview(x).cast("B"))
    return int.from_bytes(h.digest()[:8], "little")


def _values_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 values and int64 offsets (starting at 0) of the ``values`` column; zero copy
    for a single-chunk column."""
    col = table.column("values")
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not pa.types.is_large_list(col.type):
        col = col.cast(pa.large_list(pa.float32()))
    offsets = col.offsets.to_numpy()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat, (offsets - offsets[0]) if len(offsets) and offsets[0] else offsets


def fingerprint_batch(table: pa.Table) -> pa.Table:
    """``value_hash``, ``key_hash`` (uint64) per good series row (quarantine rows skipped)."""
    tune_malloc()
    flat, offsets = _values_of(table)
    domains, datasets, series = (table.column(c).to_pylist() for c in ("domain", "dataset", "series"))
    reasons = table.column("quarantine_reason").to_pylist()
    vh, kh = [], []
    for i in range(table.num_rows):
        if reasons[i]:
            continue
        vh.append(values_hash(flat[offsets[i]:offsets[i + 1]]))
        kh.append(hash64(f"{domains[i]}/{datasets[i]}/{series[i]}"))
    return pa.table({"value_hash": pa.array(vh, pa.uint64()), "key_hash": pa.array(kh, pa.uint64())})


def duplicate_losers(value_hash: np.ndarray, key_hash: np.ndarray) -> np.ndarray:
    """Sorted key hashes of duplicate copies to drop: per value hash all but the smallest key hash."""
    if len(value_hash) == 0:
        return np.zeros(0, np.uint64)
    order = np.lexsort((key_hash, value_hash))
    vh, kh = value_hash[order], key_hash[order]
    dup = np.concatenate([[False], vh[1:] == vh[:-1]])
    return np.sort(kh[dup])


@dataclass
class StageContext:
    """What each Ray task needs (pickled with the UDF): config sections, dedup losers, guard."""

    config: PreprocessConfig
    drop_key_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    contamination: ContaminationIndex | None = None


def clean_batch(table: pa.Table, ctx: StageContext) -> tuple[pa.Table, Accounting]:
    """Series rows -> normalised chunk rows (train chunks repeated per mixture weight), plus tally."""
    tune_malloc()
    acc, out = Accounting(), ChunkRows()
    flat, offsets = _values_of(table)
    cols = {c: table.column(c).to_pylist() for c in ("domain", "dataset", "series", "source", "quarantine_reason",
                                                       "quarantine_message")}
    claimed = table.column("claimed_points").to_numpy()
    for i in range(table.num_rows):
        domain, dataset, name = cols["domain"][i], cols["dataset"][i], cols["series"][i]
        tally = acc.tally(domain, dataset)
        if cols["quarantine_reason"][i]:
            account_quarantined(acc, tally, {c: v[i] for c, v in cols.items()}, int(claimed[i]))
            continue
        x = flat[offsets[i]:offsets[i + 1]]
        key = f"{domain}/{dataset}/{name}"
        tally.add_values(x)
        excluded = exclusion_reason(ctx, key, x)
        if excluded:
            tally.add_series(len(x), {excluded: len(x)}, 0)
            continue
        chunk_series(x, key, domain, ctx.config, tally, acc, out)
    return out.to_table(), acc


def account_quarantined(acc: Accounting, tally: Any, row: dict[str, Any], claimed: int) -> None:
    """A row the reader quarantined: its points counted under its reason, and listed."""
    reason = row["quarantine_reason"]
    if reason == "skipped_column":  # not a series (a label, index or covariate column): listed, not counted
        pass
    elif reason == "duplicate_timestamps":  # points of real series, dropped by the reader
        tally.add_dropped_points(claimed, reason)
    else:
        tally.add_series(claimed, {f"quarantine:{reason}": claimed}, 0)
    acc.quarantine.append({"domain": row["domain"], "dataset": row["dataset"], "series": row["series"],
                           "source": row["source"], "reason": reason, "message": row["quarantine_message"],
                           "claimed_points": claimed})


def exclusion_reason(ctx: StageContext, key: str, x: np.ndarray) -> str | None:
    """Why a whole series is left out before cleaning: an exact duplicate of another (dedup), or
    overlapping a benchmark's test split (contamination guard); None to keep it."""
    if len(ctx.drop_key_hashes):
        kh = np.uint64(hash64(key))
        pos = np.searchsorted(ctx.drop_key_hashes, kh)
        if pos < len(ctx.drop_key_hashes) and ctx.drop_key_hashes[pos] == kh:
            return "duplicate"
    if ctx.contamination is not None:
        hit = ctx.contamination.find(x)
        if hit is not None:
            return f"contamination:{hit}"
    return None


class ChunkRows:
    """The chunk rows one block hands to packing (``CHUNK_SCHEMA``)."""

    def __init__(self) -> None:
        self.split: list[str] = []
        self.key: list[str] = []
        self.values: list[np.ndarray] = []
        self.mean: list[float] = []
        self.std: list[float] = []

    def add(self, split: str, key: str, values: np.ndarray, mean: float, std: float, repeats: int) -> None:
        for _ in range(repeats):
            self.split.append(split)
            self.key.append(key)
            self.values.append(values)
            self.mean.append(mean)
            self.std.append(std)

    def to_table(self) -> pa.Table:
        lengths = np.array([len(v) for v in self.values], dtype=np.int64)
        offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(self.values) if self.values else np.zeros(0, np.float32)
        return pa.Table.from_arrays(
            [pa.array(self.split, pa.string()), pa.array(self.key, pa.string()),
             pa.LargeListArray.from_arrays(pa.array(offs), pa.array(flat)),
             pa.array(self.mean, pa.float64()), pa.array(self.std, pa.float64())],
            schema=CHUNK_SCHEMA,
        )


def chunk_series(x: np.ndarray, key: str, domain: str, cfg: PreprocessConfig, tally: Any, acc: Accounting,
                 out: ChunkRows) -> None:
    """One series through Time-300B's cleaning rules, then each kept run normalised and cut into
    window-sized chunks, repeated per the domain's mixture weight (validation series once);
    every point is counted as kept or dropped with its reason."""
    width = cfg.pack.window_length + 1
    cleaned = clean_series(x, cfg.clean)
    dropped = dict(cleaned.dropped)
    if cleaned.outliers is not None:
        note = cleaned.outliers
        acc.outliers.append({"series": key, "points": note.points, "center": note.center, "bound": note.bound,
                             "extreme": note.extreme})
    is_val = unit_hash("val|" + key) < cfg.pack.val_fraction
    split = VAL_DIR if is_val else TRAIN_DIR
    weight = 1.0 if is_val else cfg.mixture.weight(domain)
    reps_base, frac = int(math.floor(weight)), weight - math.floor(weight)
    if cfg.normalize.scope == "series" and cleaned.runs:
        _, s_mean, s_std = normalize_run(np.concatenate([x[s:e] for s, e in cleaned.runs]), cfg.normalize.method)
    kept, chunk_index = 0, 0
    for s, e in cleaned.runs:
        tally.run_length_hist[length_bin(e - s)] += 1
        chunks, tail = chunk_bounds(s, e, width, cfg.pack.min_chunk_length)
        if tail:
            dropped[REASON_SHORT_TAIL] = dropped.get(REASON_SHORT_TAIL, 0) + tail
        if not chunks:
            continue
        if cfg.normalize.scope == "series":
            run_values, mean, std = apply_stats(x[s:e], s_mean, s_std), s_mean, s_std
        else:
            run_values, mean, std = normalize_run(x[s:e], cfg.normalize.method)
        for cs, ce in chunks:
            reps = reps_base + (1 if frac and unit_hash(f"mix|{cfg.seed}|{key}|{chunk_index}") < frac else 0)
            chunk_index += 1
            if reps == 0:
                dropped["mixture_downsample"] = dropped.get("mixture_downsample", 0) + (ce - cs)
                continue
            kept += ce - cs
            tally.points_repeated += (reps - 1) * (ce - cs)
            out.add(split, key, run_values[cs - s:ce - s], mean, std, reps)
    if is_val and kept:
        tally.points_val += kept
        tally.series_val += 1
    tally.add_series(len(x), dropped, kept)


def pack_and_write(table: pa.Table, window_length: int, output: str, tmp_name: str, options: OutputConfig,
                   seed: int) -> pa.Table:
    """Pack a batch of chunk rows (train and val separately) and write the rows, shuffled with a
    seed derived from the batch content, into temporary shard files. Returns one small row per
    file for the driver: ``split``, ``path``, ``rows``, ``points``, ``dataset_points`` (JSON
    ``{"domain/dataset": points}`` on the first file of each split). Writing here, in parallel
    tasks, keeps the driver out of the data path."""
    tune_malloc()
    width = window_length + 1
    flat, offsets = _values_of(table)
    split_col = table.column("split")
    keys = table.column("key").to_pylist()
    means = table.column("mean").to_numpy()
    stds = table.column("std").to_numpy()
    fs, out_path = resolve_filesystem(output)
    meta: dict[str, list] = {"split": [], "path": [], "rows": [], "points": [], "dataset_points": []}
    carrier = pc.invert(pc.is_in(split_col, pa.array([TRAIN_DIR, VAL_DIR]))).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(carrier):
        meta["split"].append(split_col[i].as_py())  # a carrier row (tally, file written upstream), passed through
        meta["path"].append(keys[i])
        meta["rows"].append(0)
        meta["points"].append(0)
        meta["dataset_points"].append("{}")
    for split in (TRAIN_DIR, VAL_DIR):
        idx = np.flatnonzero(pc.equal(split_col, split).to_numpy(zero_copy_only=False))
        if len(idx) == 0:
            continue
        lens = (offsets[idx + 1] - offsets[idx]).tolist()
        split_keys = [keys[i] for i in idx]
        batch_seed = hash64(f"{seed}|{split}|{split_keys[0]}|{split_keys[-1]}|{len(idx)}|{sum(lens)}")
        rows = assemble_rows([flat[offsets[i]:offsets[i + 1]] for i in idx], means[idx].tolist(),
                             stds[idx].tolist(), split_keys, width, shuffle_seed=batch_seed)
        by_dataset: dict[str, int] = {}
        for key, n in zip(split_keys, lens):
            ds_key = dataset_of(key)
            by_dataset[ds_key] = by_dataset.get(ds_key, 0) + n
        for k, f in enumerate(write_packed(fs, join(out_path, tmp_name, split), rows, window_length, options)):
            meta["split"].append(split)
            meta["path"].append(f["path"])
            meta["rows"].append(f["rows"])
            meta["points"].append(f["points"])
            meta["dataset_points"].append(json.dumps(by_dataset) if k == 0 else "{}")
    return pa.table({"split": pa.array(meta["split"], pa.string()), "path": pa.array(meta["path"], pa.string()),
                     "rows": pa.array(meta["rows"], pa.int64()), "points": pa.array(meta["points"], pa.int64()),
                     "dataset_points": pa.array(meta["dataset_points"], pa.string())})


def accounting_row(acc: Accounting, block: dict[str, Any] | None = None) -> pa.Table:
    """A clean block's tally as one carrier row of CHUNK_SCHEMA (split ACCOUNTING_SPLIT).
    ``block``: what the driver needs besides the tally (block id, whether its chunks were
    packed in the task, dedup fingerprints); :func:`decode_carrier` returns both."""
    payload = {"acc": acc, **(block or {})}
    return carrier_row(ACCOUNTING_SPLIT, base64.b64encode(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii"))


def carrier_row(split: str, key: str) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([split]), pa.array([key]),
         pa.LargeListArray.from_arrays(pa.array([0, 0], pa.int64()), pa.array([], pa.float32())),
         pa.array([0.0]), pa.array([1.0])], schema=CHUNK_SCHEMA)


def decode_carrier(blob: str) -> dict[str, Any]:
    """``{"acc": Accounting, ...block info}`` of an ACCOUNTING_SPLIT carrier row."""
    return pickle.loads(base64.b64decode(blob))


def block_id(table: pa.Table) -> str:
    """Content id of a series block (keys, sources, quarantine reasons, lengths): names the
    block across the main pass and a dedup fix-up pass, which re-reads the same blocks."""
    h = hashlib.blake2b(digest_size=12)
    for c in ("domain", "dataset", "series", "source", "quarantine_reason"):
        h.update("\x00".join(table.column(c).to_pylist()).encode())
        h.update(b"\x01")
    h.update(table.column("claimed_points").to_numpy().tobytes())
    _, offsets = _values_of(table)
    h.update(np.diff(offsets).tobytes())
    return h.hexdigest()


def pack_batches(n: int, batch_chunks: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges cutting ``n >= batch_chunks`` chunks into ``n // batch_chunks``
    equal batches (each of batch_chunks .. 2 * batch_chunks - 1 chunks)."""
    k = max(1, n // batch_chunks)
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def process_block(table: pa.Table, ctx: StageContext, tmp_name: str, fingerprint: bool,
                  only_blocks: frozenset[str] | None = None) -> pa.Table:
    """The main pass over one read block, in ONE task: dedup fingerprints, clean + normalise +
    chunk (``clean_batch``), and, when the block holds at least ``pack_batch_chunks`` chunks,
    pack + write them right here (``pack_and_write`` per batch), so that normalised values never
    enter the object store. Returns CHUNK_SCHEMA rows: ``FILE_SPLIT`` carriers for the files
    written, the chunks of a block too small to pack alone (packed downstream with other small
    blocks' chunks), and one ACCOUNTING_SPLIT carrier (tally + block info).

    ``only_blocks``: process only blocks with these ids (the dedup fix-up pass); others yield
    no rows."""
    bid = block_id(table)
    if only_blocks is not None and bid not in only_blocks:
        return CHUNK_SCHEMA.empty_table()
    cfg = ctx.config
    info: dict[str, Any] = {"block": bid}
    if fingerprint:
        fp = fingerprint_batch(table)
        info["value_hash"] = fp.column("value_hash").to_numpy()
        info["key_hash"] = fp.column("key_hash").to_numpy()
    chunks, acc = clean_batch(table, ctx)
    batch = cfg.pack.pack_batch_chunks
    info["packed"] = chunks.num_rows >= batch
    out = []
    if info["packed"]:
        for a, b in pack_batches(chunks.num_rows, batch):
            meta = pack_and_write(chunks.slice(a, b - a), cfg.pack.window_length, cfg.output, tmp_name,
                                  cfg.output_options, cfg.seed)
            for row in meta.to_pylist():
                out.append(carrier_row(FILE_SPLIT, json.dumps({**row, "block": bid})))
    else:
        out.append(chunks)
    out.append(accounting_row(acc, info))
    return pa.concat_tables(out)


def dedup_fixup(files: list[dict[str, Any]], blocks: list[dict[str, Any]], ctx: StageContext, main_pass, collect
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exact-duplicate removal after a speculative main pass (which kept every copy).

    From the fingerprints of all blocks, the copies to drop are known (``duplicate_losers``:
    per group of identical values, all but the smallest key hash). If there are none, nothing
    changes. Otherwise the blocks holding a dropped copy are processed again with those copies
    dropped (``main_pass(only_blocks=...)``, a re-read that skips every other block) and their
    first-pass files and tallies are discarded. Chunks of small blocks were packed together
    downstream, so if a small block is affected, ALL small blocks are redone (and all
    downstream-packed files discarded); if two blocks share an id (a reader emitting identical
    keys), everything is redone. The result is what a run knowing the duplicates from the
    start would produce for the same blocks; unused files die with the tmp folder."""
    if not any("key_hash" in b for b in blocks):
        return files, blocks
    vh = np.concatenate([b["value_hash"] for b in blocks]).astype(np.uint64)
    kh = np.concatenate([b["key_hash"] for b in blocks]).astype(np.uint64)
    losers = duplicate_losers(vh, kh)
    log.info("dedup: %d duplicate series to drop", len(losers))
    if not len(losers):
        return files, blocks
    ctx.drop_key_hashes = losers
    ids = [b["block"] for b in blocks]
    affected = {b["block"] for b in blocks if np.isin(b["key_hash"], losers).any()}
    redo_small = any(not b["packed"] for b in blocks if b["block"] in affected)
    redo: set[str] | None = affected | ({b["block"] for b in blocks if not b["packed"]} if redo_small else set())
    if len(set(ids)) != len(ids):
        redo, redo_small = None, True
    t = time.time()
    files2, blocks2 = collect(main_pass(False, None if redo is None else frozenset(redo)))
    log.info("dedup fix-up: redid %s blocks in %.1fs", "all" if redo is None else len(redo), time.time() - t)
    keep_files = [f for f in files if redo is not None and not (f["block"] in redo or (f["block"] is None and redo_small))]
    keep_blocks = [b for b in blocks if redo is not None and b["block"] not in redo]
    return keep_files + files2, keep_blocks + blocks2


# ----------------------------------------------------------------------------------- driver


# Warnings (report.py: build_warnings) beyond this many are only in the report: a corpus with
# a systematic problem must not bury the rest of the log.
MAX_WARNINGS_LOGGED = 200


@dataclass
class PreprocessResult:
    output: str
    manifest: dict[str, Any]
    report: dict[str, Any]
    accounting: Accounting
    efficiency: float           # train packing efficiency (real points / slots)
    seconds: float


def input_fingerprints(inputs: list[str], max_files: int = 100_000) -> list[dict[str, Any]]:
    """Size and mtime of every file under each input (a cheap change detector for the manifest)."""
    out = []
    for url in inputs:
        fs, path = resolve_filesystem(url)
        info = fs.get_file_info(path)
        infos = [info] if info.type == pafs.FileType.File else (
            fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)) if info.type == pafs.FileType.Directory else [])
        for f in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)[:max_files]:
            out.append({"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns})
    return out


def task_remote_args(config: PreprocessConfig) -> dict[str, Any]:
    """Ray remote args of every preprocessing task: ``config.task_resources`` (e.g. ``{"data": 1}``,
    docs/cluster.md "Placing work"); ``{}`` by default. The same args on every map keeps Ray
    Data's operator fusion as it is without them."""
    return {"resources": dict(config.task_resources)} if config.task_resources else {}


def load_run_catalog(path: str | None) -> "SourceCatalog | None":
    """The source catalog of ``--catalog``, or None; a missing or invalid file is a
    PreprocessError naming it (checked before any work starts)."""
    if not path:
        return None
    import yaml

    from preprocessing.catalog import load_catalog

    try:
        return load_catalog(path)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        raise PreprocessError(f"--catalog {path}: {' '.join(str(e).split())}") from e


def _read(config: PreprocessConfig, catalog: "SourceCatalog | None") -> "ray.data.Dataset":  # noqa: F821
    from preprocessing import ingest

    # Readers always quarantine; ``config.fail_fast`` stops the run on the driver at the first
    # quarantined input (``first_quarantine``): raised inside a Ray task, the error would reach
    # the driver only as Ray's generic task error, after Ray Data logged its traceback.
    kwargs: dict[str, Any] = {"config": ingest.IngestConfig()}
    if task_remote_args(config):
        kwargs["ray_remote_args"] = task_remote_args(config)
    return ingest.read_series(config.inputs, catalog=catalog, **kwargs)


_STARTUP_SHIM = False


def ray_data_startup_shim() -> None:
    """Ray 2.60 workaround: Ray Data learns the CPUs it may use from its autoscaling-coordinator
    actor (a detached singleton created by the first execution on a cluster), polled once a
    second; until it answers, the executor believes the cluster has 0 CPUs and runs ONE task
    (its liveness rule). Measured here: 2-3.5 s of every run at 100M points on a fresh
    cluster, ~2 s even with the actor already up (two polls). While the coordinator's answer is
    still empty, this shim reports the cluster's resources instead (what Ray Data used before
    the coordinator existed); once it answers, its figures apply. Idempotent; a no-op if the
    Ray internals it wraps are not there."""
    global _STARTUP_SHIM
    if _STARTUP_SHIM:
        return
    _STARTUP_SHIM = True
    try:
        import ray
        from ray.data._internal.cluster_autoscaler import default_cluster_autoscaler_v2, rate_based_cluster_autoscaler
        from ray.data._internal.execution.interfaces import ExecutionResources
    except ImportError:
        return

    def wrap(cls) -> None:
        original = getattr(cls, "get_total_resources", None)
        if original is None or getattr(original, "_timemoe_shim", False):
            return

        def get_total_resources(self):
            total = original(self)
            if total.cpu or total.gpu:
                return total
            cluster = ray.cluster_resources()
            return ExecutionResources(cpu=cluster.get("CPU", 0.0), gpu=cluster.get("GPU", 0.0),
                                      object_store_memory=cluster.get("object_store_memory", 0.0))

        get_total_resources._timemoe_shim = True
        cls.get_total_resources = get_total_resources

    for mod, name in ((rate_based_cluster_autoscaler, "RateBasedClusterAutoscaler"),
                      (default_cluster_autoscaler_v2, "DefaultClusterAutoscalerV2")):
        if hasattr(mod, name):
            wrap(getattr(mod, name))


def configure_data_context(data_ctx) -> None:
    """Ray Data settings the pipeline relies on, applied to the global context and to the
    context of the dataset that is executed (a Dataset snapshots the context when created).

    - ``preserve_order``: fixed row order -> byte-identical shards on a re-run.
    - progress bars stay on (the user's view of the job).
    - ``op_resource_reservation_enabled = False``: Ray Data 2.60 reserves at least one CPU for
      EVERY operator; on a 2-CPU node the small downstream pack stage (idle for most of the
      run) then holds a CPU and the main operator runs ONE task at a time (measured: one
      worker did all the work). Without reservations the operators share the CPU budget; the
      object store stays bounded (global limit, and the main operator's outputs are a few
      metadata rows per block).
    """
    data_ctx.execution_options.preserve_order = True
    data_ctx.enable_progress_bars = True
    data_ctx.op_resource_reservation_enabled = False


def run_preprocess(config: PreprocessConfig, series=None) -> PreprocessResult:
    """Run the whole pipeline for ``config``; ``series`` (a Ray Dataset in the series format of
    ``preprocessing/series.py``) replaces reading ``config.inputs`` (tests, custom readers)."""
    fs, out_path = refuse_bad_output(config, check_inputs=series is None)
    catalog = load_run_catalog(config.catalog) if series is None else None
    contamination = load_contamination_guard(config)
    t0 = time.time()
    start_ray_data()
    if series is None:
        series = _read(config, catalog)
    tmp_name = f"_tmp-{uuid.uuid4().hex[:12]}"
    tmp = join(out_path, tmp_name)
    passes = BlockPasses(series, StageContext(config=config, contamination=contamination), tmp_name)
    try:
        files, blocks = passes.run()                       # clean + pack + write per block (+ dedup)
        t_publish = time.time()
        shards = ShardPlan.of(files, blocks, config)       # accounting checked, shard order fixed
        shards.refuse_empty(fs, out_path)
        rep = report_mod.build_report(shards.acc, config, shards.efficiency, shards.manifest_entries, shards.mixture)
        manifest = build_manifest(config, shards, rep)
        log_warnings(rep)
        report_files = {
            "report.json": json.dumps(rep, indent=2, sort_keys=True, default=float).encode(),
            "report.html": report_mod.render_html(rep).encode(),
        }
        publish(fs, out_path, tmp, shards.paths_by_split(), report_files, manifest)
    except BaseException:
        # Leave no half-published state behind: the tmp folder goes, the manifest was never written.
        try:
            if fs.get_file_info(tmp).type == pafs.FileType.Directory:
                fs.delete_dir(tmp)
        except Exception:  # noqa: BLE001 - cleanup must not hide the real error
            log.warning("could not remove %s", tmp)
        raise
    seconds = time.time() - t0
    log.info("reports + publish: %.1fs; preprocess done in %.1fs: train efficiency %.4f",
             time.time() - t_publish, seconds, shards.efficiency[TRAIN_DIR])
    return PreprocessResult(config.output, manifest, rep, shards.acc, shards.efficiency[TRAIN_DIR], seconds)


def refuse_bad_output(config: PreprocessConfig, check_inputs: bool) -> tuple[pafs.FileSystem, str]:
    """The output's filesystem and path, after the checks that refuse a run before any work: a
    config that cannot run, an output the inputs would read back, files in the output the job
    did not write (the trainer would read them as shards)."""
    if check_inputs:
        validate(config)
    if not config.output:
        raise ValueError("config.output is empty: give --output")
    fs, out_path = resolve_filesystem(config.output)
    if config.inputs:
        check_output_location(config.inputs, config.output)
    check_no_foreign_files(fs, out_path, config.output)
    return fs, out_path


def load_contamination_guard(config: PreprocessConfig) -> ContaminationIndex | None:
    if not config.contamination.benchmarks:
        return None
    try:
        index = ContaminationIndex.from_files(config.contamination.benchmarks, config.contamination.min_match)
    except OSError as e:
        raise PreprocessError(f"contamination.benchmarks: {' '.join(str(e).split())}") from e
    log.info("contamination guard: %d benchmark windows indexed", len(index.hashes))
    return index


def start_ray_data() -> None:
    """Ray (the cluster in RAY_ADDRESS, else a local instance) with this job's Ray Data settings."""
    import ray

    if not ray.is_initialized():
        # With its dashboard: the State API behind it is what `ray list`, the dashboard's progress
        # views and Ray Train's placement-group cleaner query (without it the cleaner logs a
        # warning every few seconds of a training run that reuses this instance).
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    configure_data_context(ray.data.DataContext.get_current())
    ray_data_startup_shim()
    # The HTML report needs matplotlib (~0.4 s to import); import it while the driver waits
    # on Ray instead of after the last block.
    threading.Thread(target=report_mod.preload, daemon=True).start()


class BlockPasses:
    """The Ray Data passes over the series: per block fingerprint + clean + pack + write, then
    what the blocks did not pack themselves packed together; their file and accounting rows
    collected on the driver in stream order."""

    def __init__(self, series: Any, ctx: StageContext, tmp_name: str) -> None:
        self.series, self.ctx, self.tmp_name = series, ctx, tmp_name
        self.config = ctx.config

    def run(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Speculative single read: fingerprints are taken in the same task that cleans, with no
        duplicate known yet. Corpora without exact duplicates (the common case) are done after
        this pass; otherwise the blocks that hold a dropped copy are redone (``dedup_fixup``)."""
        t_main = time.time()
        files_meta = self.main_pass(self.config.clean.dedup, None)
        files, blocks = self.collect(files_meta)
        log.info("clean/pack/write pass: %.1fs", time.time() - t_main)
        if os.environ.get("TIMEMOE_DATA_STATS"):
            log.warning("Ray Data stats:\n%s", files_meta.stats())
        if self.config.clean.dedup:
            files, blocks = dedup_fixup(files, blocks, self.ctx, self.main_pass, self.collect)
        return files, blocks

    def main_pass(self, fingerprint: bool, only_blocks: frozenset[str] | None) -> Any:
        """read -> [fingerprint + clean + pack + write per block] -> small blocks' chunks
        re-blocked and packed together -> file metadata rows (in order)."""
        config = self.config
        return (
            self.series.map_batches(process_block, batch_format="pyarrow", zero_copy_batch=True, batch_size=None,
                                    fn_kwargs={"ctx": self.ctx, "tmp_name": self.tmp_name, "fingerprint": fingerprint,
                                               "only_blocks": only_blocks},
                                    **task_remote_args(config))
            # A streaming re-block of what the blocks did not pack themselves (chunks of small
            # blocks + carrier rows) into pack batches: with ``batch_size`` on the pack map
            # instead, Ray fuses the maps and bundles that many INPUT rows into one task.
            .repartition(target_num_rows_per_block=config.pack.pack_batch_chunks, strict=True)
            .map_batches(pack_and_write, batch_format="pyarrow", batch_size=None,
                         fn_kwargs={"window_length": config.pack.window_length, "output": config.output,
                                    "tmp_name": self.tmp_name, "options": config.output_options, "seed": config.seed},
                         **task_remote_args(config))
        )

    def collect(self, files_meta: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(file entries in stream order, block infos in stream order). A file written by the
        downstream pack stage belongs to no single block (``block`` None)."""
        files, blocks = [], []
        # A Dataset keeps the DataContext of its creation: a ``series`` built by the caller
        # before this function ran would otherwise run without our settings (preserve_order!).
        configure_data_context(files_meta.context)
        for batch in files_meta.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                if row["split"] == ACCOUNTING_SPLIT:
                    blocks.append(decode_carrier(row["path"]))
                    problem = first_quarantine(blocks[-1]["acc"].quarantine) if self.config.fail_fast else None
                    if problem is not None:
                        raise problem
                elif row["split"] == FILE_SPLIT:
                    files.append(json.loads(row["path"]))
                else:
                    files.append({**row, "block": None})
        return files, blocks


@dataclass
class ShardPlan:
    """What will be published: the merged accounting (checked against the points written), the
    shard files per split in their final order, and the totals the manifest and report state."""

    config: PreprocessConfig
    acc: Accounting
    entries: dict[str, list[dict[str, Any]]]  # split -> written files, in shard order

    @classmethod
    def of(cls, files: list[dict[str, Any]], blocks: list[dict[str, Any]], config: PreprocessConfig) -> "ShardPlan":
        acc = Accounting()
        for info in blocks:
            acc.merge(info["acc"])
        written_by_dataset: dict[str, int] = {}
        entries: dict[str, list[dict[str, Any]]] = {TRAIN_DIR: [], VAL_DIR: []}
        for row in files:
            entries[row["split"]].append(row)
            for k, v in json.loads(row["dataset_points"]).items():
                written_by_dataset[k] = written_by_dataset.get(k, 0) + v
        # Shard order: a seeded permutation of the (deterministically ordered) files, so that
        # consecutive shards come from different parts of the corpus.
        for k, split in enumerate((TRAIN_DIR, VAL_DIR)):
            perm = np.random.default_rng([config.seed, k]).permutation(len(entries[split]))
            entries[split] = [entries[split][i] for i in perm]
        check_invariant(acc)
        expected = {k: t.points_kept + t.points_repeated for k, t in acc.datasets.items()}
        bad = {k: (expected.get(k, 0), written_by_dataset.get(k, 0)) for k in set(expected) | set(written_by_dataset)
               if expected.get(k, 0) != written_by_dataset.get(k, 0)}
        if bad:
            raise AccountingError(f"points written to shards differ from points kept (+repeats): {bad}")
        return cls(config, acc, entries)

    @property
    def rows(self) -> dict[str, int]:
        return {s: sum(e["rows"] for e in self.entries[s]) for s in self.entries}

    @property
    def efficiency(self) -> dict[str, float]:
        """Share of each split's row slots that hold a real point."""
        width = self.config.pack.window_length + 1
        points = {s: sum(e["points"] for e in self.entries[s]) for s in self.entries}
        return {s: (points[s] / (r * width) if r else 1.0) for s, r in self.rows.items()}

    @property
    def mixture(self) -> dict[str, float]:
        return {d: self.config.mixture.weight(d) for d in self.acc.domains()}

    @property
    def manifest_entries(self) -> dict[str, list[dict[str, Any]]]:
        return {s: [{"file": SHARD_PATTERN.format(index=i), "rows": e["rows"], "points": e["points"]}
                    for i, e in enumerate(self.entries[s])] for s in self.entries}

    def paths_by_split(self) -> dict[str, list[str]]:
        return {s: [e["path"] for e in self.entries[s]] for s in self.entries}

    def refuse_empty(self, fs: pafs.FileSystem, out_path: str) -> None:
        """An empty result never replaces a published output, and is never a success."""
        rows = self.rows
        if not rows[TRAIN_DIR]:
            kept = "was left as it was" if exists(fs, join(out_path, MANIFEST_FILE)) else "was not written"
            raise PreprocessError(f"nothing to publish: {empty_result_reason(self.acc, rows[VAL_DIR])}; "
                                  f"--output {self.config.output} {kept}")


def build_manifest(config: PreprocessConfig, shards: ShardPlan, rep: dict[str, Any]) -> dict[str, Any]:
    """``manifest.json``: the schema version, the shards per split in order, and what produced them."""
    window_length = config.pack.window_length
    fingerprints = input_fingerprints(config.inputs) if config.inputs else []
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "window_length": window_length,
        "width": window_length + 1,
        "config": config.to_dict(),
        "inputs": fingerprints,
        "counts": {"total": rep["totals"], "domains": rep["domain_counts"], "datasets": rep["dataset_counts"]},
        "packing_efficiency": shards.efficiency,
        "mixture_weights": shards.mixture,
        "shards": shards.manifest_entries,
        "rows": shards.rows,
    }
    manifest["inputs_digest"] = hashlib.sha256(json.dumps(manifest["inputs"], sort_keys=True).encode()).hexdigest()
    return manifest


def log_warnings(rep: dict[str, Any]) -> None:
    for line in rep["warnings"][:MAX_WARNINGS_LOGGED]:
        log.warning("%s", line)
    if len(rep["warnings"]) > MAX_WARNINGS_LOGGED:
        log.warning("... and %d more warnings in report.json", len(rep["warnings"]) - MAX_WARNINGS_LOGGED)
