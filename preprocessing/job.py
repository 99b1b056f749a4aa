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

import dataclasses
import hashlib
import json
import logging
import base64
import math
import os
import pickle
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from preprocessing import report as report_mod
from preprocessing.accounting import Accounting, AccountingError, check_invariant, length_bin
from preprocessing.clean import clean_series
from preprocessing.config import OutputConfig, PreprocessConfig, validate
from preprocessing.contamination import ContaminationIndex
from preprocessing.normalize import apply_stats, normalize_run
from preprocessing.pack import REASON_SHORT_TAIL, assemble_rows, chunk_bounds
from preprocessing.schema import MANIFEST_FILE, SCHEMA_VERSION, SHARD_PATTERN, TRAIN_DIR, VAL_DIR
from preprocessing.writer import join, publish, resolve, write_packed

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
    cfg = ctx.config
    width = cfg.pack.window_length + 1
    acc = Accounting()
    flat, offsets = _values_of(table)
    cols = {c: table.column(c).to_pylist() for c in ("domain", "dataset", "series", "source", "quarantine_reason")}
    messages = table.column("quarantine_message").to_pylist()
    claimed = table.column("claimed_points").to_numpy()
    out_split, out_key, out_vals, out_mean, out_std = [], [], [], [], []
    for i in range(table.num_rows):
        domain, dataset, name = cols["domain"][i], cols["dataset"][i], cols["series"][i]
        tally = acc.tally(domain, dataset)
        if cols["quarantine_reason"][i]:
            reason = cols["quarantine_reason"][i]
            if reason == "skipped_column":  # not a series (a label, index or covariate column): listed, not counted
                pass
            elif reason == "duplicate_timestamps":  # points of real series, dropped by the reader
                tally.add_dropped_points(int(claimed[i]), reason)
            else:
                tally.add_series(int(claimed[i]), {f"quarantine:{reason}": int(claimed[i])}, 0)
            acc.quarantine.append({"domain": domain, "dataset": dataset, "series": name, "source": cols["source"][i],
                                   "reason": reason, "message": messages[i], "claimed_points": int(claimed[i])})
            continue
        x = flat[offsets[i]:offsets[i + 1]]
        n = len(x)
        key = f"{domain}/{dataset}/{name}"
        tally.add_values(x)
        if len(ctx.drop_key_hashes):
            kh = np.uint64(hash64(key))
            pos = np.searchsorted(ctx.drop_key_hashes, kh)
            if pos < len(ctx.drop_key_hashes) and ctx.drop_key_hashes[pos] == kh:
                tally.add_series(n, {"duplicate": n}, 0)
                continue
        if ctx.contamination is not None:
            hit = ctx.contamination.find(x)
            if hit is not None:
                tally.add_series(n, {f"contamination:{hit}": n}, 0)
                continue
        cleaned = clean_series(x, cfg.clean)
        dropped = dict(cleaned.dropped)
        is_val = unit_hash("val|" + key) < cfg.pack.val_fraction
        weight = 1.0 if is_val else cfg.mixture.weight(domain)
        reps_base, frac = int(math.floor(weight)), weight - math.floor(weight)
        if cfg.normalize.scope == "series" and cleaned.runs:
            _, s_mean, s_std = normalize_run(np.concatenate([x[s:e] for s, e in cleaned.runs]), cfg.normalize.method)
        kept = 0
        chunk_index = 0
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
                values = run_values[cs - s:ce - s]
                kept += ce - cs
                tally.points_repeated += (reps - 1) * (ce - cs)
                for _ in range(reps):
                    out_split.append(VAL_DIR if is_val else TRAIN_DIR)
                    out_key.append(key)
                    out_vals.append(values)
                    out_mean.append(mean)
                    out_std.append(std)
        if is_val and kept:
            tally.points_val += kept
            tally.series_val += 1
        tally.add_series(n, dropped, kept)
    lengths = np.array([len(v) for v in out_vals], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_out = np.concatenate(out_vals) if out_vals else np.zeros(0, np.float32)
    chunks_tbl = pa.Table.from_arrays(
        [pa.array(out_split, pa.string()), pa.array(out_key, pa.string()),
         pa.LargeListArray.from_arrays(pa.array(offs), pa.array(flat_out)),
         pa.array(out_mean, pa.float64()), pa.array(out_std, pa.float64())],
        schema=CHUNK_SCHEMA,
    )
    return chunks_tbl, acc


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
    fs, out_path = resolve(output)
    meta: dict[str, list] = {"split": [], "path": [], "rows": [], "points": [], "dataset_points": []}
    for i in np.flatnonzero(pc.equal(split_col, ACCOUNTING_SPLIT).to_numpy(zero_copy_only=False)):
        meta["split"].append(ACCOUNTING_SPLIT)  # a clean block's tally, passed through (see CHUNK_SCHEMA)
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


def accounting_row(acc: Accounting) -> pa.Table:
    """A clean block's tally as one carrier row of CHUNK_SCHEMA (split ACCOUNTING_SPLIT)."""
    blob = base64.b64encode(pickle.dumps(acc, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")
    return pa.Table.from_arrays(
        [pa.array([ACCOUNTING_SPLIT]), pa.array([blob]),
         pa.LargeListArray.from_arrays(pa.array([0, 0], pa.int64()), pa.array([], pa.float32())),
         pa.array([0.0]), pa.array([1.0])], schema=CHUNK_SCHEMA)


def decode_accounting(blob: str) -> Accounting:
    return pickle.loads(base64.b64decode(blob))


# ----------------------------------------------------------------------------------- driver


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
        fs, path = resolve(url)
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


def _read(config: PreprocessConfig):
    from preprocessing import ingest  # the ingest engineer's readers

    kwargs: dict[str, Any] = {}
    if hasattr(ingest, "IngestConfig"):
        fields = {f.name for f in dataclasses.fields(ingest.IngestConfig)}
        kwargs["config"] = ingest.IngestConfig(**({"fail_fast": True} if config.fail_fast and "fail_fast" in fields else {}))
    catalog = config.catalog
    if catalog and hasattr(ingest, "load_catalog"):
        catalog = ingest.load_catalog(catalog)
    elif catalog:
        from preprocessing import catalog as catalog_mod

        catalog = catalog_mod.load_catalog(catalog) if hasattr(catalog_mod, "load_catalog") else catalog
    if task_remote_args(config):
        kwargs["ray_remote_args"] = task_remote_args(config)
    return ingest.read_series(config.inputs, catalog=catalog, **kwargs)


def run_preprocess(config: PreprocessConfig, series=None) -> PreprocessResult:
    """Run the whole pipeline for ``config``; ``series`` (a Ray Dataset in the series format of
    ``preprocessing/series.py``) replaces reading ``config.inputs`` (tests, custom readers)."""
    import ray

    if series is None:
        validate(config)
    if not config.output:
        raise ValueError("config.output is empty: give --output")
    t0 = time.time()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True  # fixed row order -> byte-identical shards
    data_ctx.enable_progress_bars = True
    if series is None:
        series = _read(config)

    ctx = StageContext(config=config)
    if config.contamination.benchmarks:
        ctx.contamination = ContaminationIndex.from_files(config.contamination.benchmarks, config.contamination.min_match)
        log.info("contamination guard: %d benchmark windows indexed", len(ctx.contamination.hashes))
    fingerprints = input_fingerprints(config.inputs) if config.inputs else []
    if config.clean.dedup:
        # Dedup needs a pass over all series before the main pass. Small inputs are read once
        # and cached in the object store; big ones are read twice (RAM stays bounded either way,
        # but caching a huge corpus would spill it all to local disk).
        if sum(f["size"] for f in fingerprints) <= config.clean.dedup_cache_max_bytes:
            series = series.materialize()
        vh, kh = [], []
        for b in series.map_batches(fingerprint_batch, batch_format="pyarrow", zero_copy_batch=True, **task_remote_args(config)).iter_batches(batch_format="numpy", batch_size=None):
            vh.append(b["value_hash"].astype(np.uint64))
            kh.append(b["key_hash"].astype(np.uint64))
        ctx.drop_key_hashes = duplicate_losers(np.concatenate(vh) if vh else np.zeros(0, np.uint64),
                                               np.concatenate(kh) if kh else np.zeros(0, np.uint64))
        log.info("dedup: %d duplicate series to drop (%.1fs)", len(ctx.drop_key_hashes), time.time() - t0)
    t_main = time.time()

    def clean_udf(table: pa.Table) -> pa.Table:
        chunks, acc = clean_batch(table, ctx)
        return pa.concat_tables([chunks, accounting_row(acc)])

    window_length = config.pack.window_length

    fs, out_path = resolve(config.output)
    tmp_name = f"_tmp-{uuid.uuid4().hex[:12]}"
    tmp = join(out_path, tmp_name)
    files_meta = (
        series.map_batches(clean_udf, batch_format="pyarrow", zero_copy_batch=True, **task_remote_args(config))
        # A streaming re-block into pack batches: with ``batch_size`` on the pack map instead,
        # Ray fuses read->clean->pack and bundles that many INPUT rows (series) into one task,
        # which ran a whole 100M-point corpus in a single task on one core.
        .repartition(target_num_rows_per_block=config.pack.pack_batch_chunks, strict=True)
        .map_batches(pack_and_write, batch_format="pyarrow", batch_size=None,
                     fn_kwargs={"window_length": window_length, "output": config.output, "tmp_name": tmp_name,
                                "options": config.output_options, "seed": config.seed},
                     **task_remote_args(config))
    )
    acc = Accounting()
    written_by_dataset: dict[str, int] = {}
    entries: dict[str, list[dict[str, Any]]] = {TRAIN_DIR: [], VAL_DIR: []}
    try:
        for batch in files_meta.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                if row["split"] == ACCOUNTING_SPLIT:
                    acc.merge(decode_accounting(row["path"]))
                    continue
                entries[row["split"]].append(row)
                for k, v in json.loads(row["dataset_points"]).items():
                    written_by_dataset[k] = written_by_dataset.get(k, 0) + v
        # Shard order: a seeded permutation of the (deterministically ordered) files, so that
        # consecutive shards come from different parts of the corpus.
        for k, split in enumerate((TRAIN_DIR, VAL_DIR)):
            perm = np.random.default_rng([config.seed, k]).permutation(len(entries[split]))
            entries[split] = [entries[split][i] for i in perm]
        shards = {s: [{"file": SHARD_PATTERN.format(index=i), "rows": e["rows"], "points": e["points"]}
                      for i, e in enumerate(entries[s])] for s in entries}
        width = window_length + 1
        points = {s: sum(e["points"] for e in entries[s]) for s in entries}
        slots = {s: sum(e["rows"] for e in entries[s]) * width for s in entries}

        log.info("clean/pack/write pass: %.1fs", time.time() - t_main)
        if os.environ.get("TIMEMOE_DATA_STATS"):
            log.warning("Ray Data stats:\n%s", files_meta.stats())
        t_publish = time.time()
        check_invariant(acc)
        expected = {k: t.points_kept + t.points_repeated for k, t in acc.datasets.items()}
        got = written_by_dataset
        bad = {k: (expected.get(k, 0), got.get(k, 0)) for k in set(expected) | set(got) if expected.get(k, 0) != got.get(k, 0)}
        if bad:
            raise AccountingError(f"points written to shards differ from points kept (+repeats): {bad}")

        efficiency = {s: (points[s] / slots[s] if slots[s] else 1.0) for s in slots}
        mixture = {d: config.mixture.weight(d) for d in acc.domains()}
        rep = report_mod.build_report(acc, config, efficiency, shards, mixture)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "window_length": window_length,
            "width": window_length + 1,
            "config": config.to_dict(),
            "inputs": fingerprints,
            "counts": {"total": rep["totals"], "domains": rep["domain_counts"], "datasets": rep["dataset_counts"]},
            "packing_efficiency": efficiency,
            "mixture_weights": mixture,
            "shards": shards,
            "rows": {s: sum(x["rows"] for x in v) for s, v in shards.items()},
        }
        manifest["inputs_digest"] = hashlib.sha256(json.dumps(manifest["inputs"], sort_keys=True).encode()).hexdigest()
        files = {
            "report.json": json.dumps(rep, indent=2, sort_keys=True, default=float).encode(),
            "report.html": report_mod.render_html(rep).encode(),
        }
        publish(fs, out_path, tmp, {s: [e["path"] for e in entries[s]] for s in entries}, files, manifest)
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
             time.time() - t_publish, seconds, efficiency[TRAIN_DIR])
    return PreprocessResult(config.output, manifest, rep, acc, efficiency[TRAIN_DIR], seconds)


def manifest_url(output: str) -> str:
    return output.rstrip("/") + "/" + MANIFEST_FILE
