"""Ingest: inputs (Time-300B roots, dataset folders, raw files, folders, globs; local or s3://)
into a Ray Data dataset of SERIES_SCHEMA blocks (preprocessing/series.py).

    ds = read_series(["s3://bucket/time300b", "/data/corpus/*/*.csv.gz"], catalog=load_catalog("cat.yaml"))

:func:`plan_inputs` expands the inputs into read units (:class:`InputSpec`) ONCE, on the
driver: a Time-300B ``meta.json`` is parsed there and each unit carries only its own slice of
offsets/lengths/scales. :func:`iter_series_tables` reads one unit without Ray (tests,
single-process benchmarks); :func:`read_series` runs the units as parallel Ray Data tasks.
Bad inputs become quarantine rows (reason + message naming the file) unless ``fail_fast``.
"""
from __future__ import annotations

import dataclasses
import glob as globmod
import gzip
import logging
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from preprocessing import storage, time300b
from preprocessing.accounting import first_quarantine
from preprocessing.catalog import SourceCatalog, load_catalog  # noqa: F401  (re-exported for the job)
from preprocessing.formats import FileContext, TableOverrides, parse_csv
from preprocessing.formats_table import IngestError, concat, quarantine_table
from preprocessing.formats_text import parse_arrow_ipc, parse_jsonl, parse_npy, parse_parquet, parse_ts, parse_tsf
from preprocessing.series import SERIES_SCHEMA
from preprocessing.storage import StorageOptions

log = logging.getLogger(__name__)

PARSERS: dict[str, Callable] = {
    ".csv": parse_csv, ".tsv": parse_csv, ".tab": parse_csv, ".txt": parse_csv,
    ".jsonl": parse_jsonl, ".json": parse_jsonl, ".npy": parse_npy,
    ".parquet": parse_parquet, ".arrow": parse_arrow_ipc, ".feather": parse_arrow_ipc, ".ipc": parse_arrow_ipc,
    ".ts": parse_ts, ".tsf": parse_tsf,
}
_IGNORED = ("manifest.csv", "MANIFEST.md", "README.md", ".md")


@dataclass
class IngestConfig:
    fail_fast: bool = False                 # raise on the first bad input instead of quarantining it
    storage: StorageOptions = field(default_factory=StorageOptions)
    block_elements: int = 32 * 2**20        # Time-300B points per read task (one ranged read per file)
    check_bin_sizes: bool = True            # stat every .bin against meta.json in the planner


@dataclass
class InputSpec:
    """One read unit: a Time-300B chunk, one raw file, or an input already known to be bad."""

    kind: str                               # "time300b" | "file" | "bad"
    url: str
    domain: str
    dataset: str
    chunk: time300b.Time300BChunk | None = None
    overrides: TableOverrides = field(default_factory=TableOverrides)
    error: IngestError | None = None

    @property
    def points(self) -> int:
        return self.chunk.points if self.chunk is not None else 0


# ------------------------------------------------------------------------------ planning


def _stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".gz"):
        name = name[:-3]
    return name.rsplit(".", 1)[0] if "." in name else name


def _ext(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def _parent(url: str) -> str:
    parts = url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else "other"


def _bad(url: str, domain: str, dataset: str, err: IngestError, config: IngestConfig) -> InputSpec:
    if config.fail_fast:
        raise err
    log.warning("quarantined %s: %s", url, err.message)
    return InputSpec("bad", url, domain, dataset, error=err)


def _plan_dataset(folder: str, catalog: SourceCatalog | None, config: IngestConfig) -> list[InputSpec]:
    entry = catalog.lookup(folder) if catalog else None
    domain = (entry and entry.domain) or _parent(folder)
    dataset = (entry and entry.dataset) or folder.rstrip("/").rsplit("/", 1)[-1]
    try:
        meta = time300b.load_meta(folder, config.storage, check_files=config.check_bin_sizes)
    except IngestError as e:
        return [_bad(folder, domain, dataset, e, config)]
    bad_offsets = time300b.offset_error(meta)
    if bad_offsets is not None:
        if config.fail_fast:
            raise bad_offsets
        log.warning("%s: %d sequence(s) with bad offsets quarantined, e.g. %s", folder,
                    int(np.count_nonzero(meta.problems)), bad_offsets.message)
    chunks = time300b.plan_chunks(meta, domain, dataset, config.block_elements)
    log.info("%s: %d sequences, %d points, %d read tasks", folder, len(meta.lengths), meta.total_points, len(chunks))
    return [InputSpec("time300b", folder, domain, dataset, chunk=c) for c in chunks]


def _plan_file(url: str, catalog: SourceCatalog | None, config: IngestConfig) -> list[InputSpec]:
    entry = catalog.lookup(url) if catalog else None
    domain = (entry and entry.domain) or _parent(url)
    dataset = (entry and entry.dataset) or _stem(url)
    if _ext(url) not in PARSERS:
        return [_bad(url, domain, dataset, IngestError(
            "unsupported_format", f"{url}: unsupported file type {_ext(url) or '(none)'!r} "
                                  f"(known: {sorted(PARSERS)})"), config)]
    return [InputSpec("file", url, domain, dataset, overrides=entry.overrides() if entry else TableOverrides())]


def _expand_glob(pattern: str, options: StorageOptions) -> list[str]:
    if not storage.is_s3(pattern):
        return sorted(globmod.glob(pattern, recursive=True))
    import fnmatch

    head = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
    found = set()
    for url in storage.list_files(head, options):
        if fnmatch.fnmatch(url, pattern):
            found.add(url)
        # a glob can also name dataset folders: keep the folder of a matching meta.json
        folder = url.rsplit("/", 1)[0]
        if url.endswith("/meta.json") and fnmatch.fnmatch(folder, pattern):
            found.add(folder)
    return sorted(found)


def _plan_one(url: str, catalog: SourceCatalog | None, config: IngestConfig) -> list[InputSpec]:
    opts = config.storage
    try:
        info = storage.file_info(url, opts)
    except OSError as e:
        return [_bad(url, _parent(url), _stem(url),
                     IngestError("missing_file", f"{url}: cannot be opened ({type(e).__name__})"), config)]
    if info.type.name == "File":
        return _plan_file(url, catalog, config)
    if info.type.name != "Directory":
        return [_bad(url, _parent(url), _stem(url), IngestError("missing_file", f"{url}: no such file or directory"),
                     config)]
    if time300b.is_dataset_folder(url, opts):
        return _plan_dataset(url, catalog, config)
    files = storage.list_files(url, opts)
    if not files:
        return [_bad(url, _parent(url), _stem(url), IngestError("empty_input", f"{url}: folder holds no files"), config)]
    dataset_dirs = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/meta.json")})
    specs: list[InputSpec] = []
    # meta.json files are independent: fetch/parse them concurrently (S3 latency dominates there)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(dataset_dirs)))) as pool:
        for planned in pool.map(lambda d: _plan_dataset(d, catalog, config), dataset_dirs):
            specs += planned
    inside = tuple(d + "/" for d in dataset_dirs)
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if f.startswith(inside) and (name == "meta.json" or name.endswith(".bin")):
            continue
        if name in _IGNORED or name.endswith(".md"):
            continue
        specs += _plan_file(f, catalog, config)
    return specs


def plan_inputs(inputs: list[str], catalog: SourceCatalog | None = None,
                config: IngestConfig | None = None) -> list[InputSpec]:
    """Expand inputs into read units with domain, dataset and layout resolved."""
    config = config or IngestConfig()
    if isinstance(inputs, str):
        inputs = [inputs]
    specs: list[InputSpec] = []
    for raw in inputs:
        url = str(raw)
        if any(c in url for c in "*?["):
            matches = _expand_glob(url, config.storage)
            if not matches:
                specs.append(_bad(url, "other", _stem(url), IngestError("missing_file", f"{url}: glob matches nothing"), config))
            for m in matches:
                specs += _plan_one(m, catalog, config)
        else:
            specs += _plan_one(url.rstrip("/") if len(url) > 1 else url, catalog, config)
    return specs


# ------------------------------------------------------------------------------ reading


def _decompress(data: bytes, url: str) -> bytes:
    if not url.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise IngestError("unreadable_gzip", f"{url}: unreadable gzip ({e})") from None


def _read_file(spec: InputSpec, config: IngestConfig) -> pa.Table:
    raw = storage.read_bytes(spec.url, config.storage, decompress=False)
    if not raw:
        raise IngestError("empty_file", f"{spec.url}: empty file (0 bytes)")
    data = _decompress(raw, spec.url)
    ctx = FileContext(spec.domain, spec.dataset, spec.url, spec.overrides)
    return PARSERS[_ext(spec.url)](data, ctx, config.fail_fast)


def iter_series_tables(spec: InputSpec, config: IngestConfig | None = None) -> Iterator[pa.Table]:
    """SERIES_SCHEMA tables for one read unit, without Ray."""
    config = config or IngestConfig()
    try:
        if spec.kind == "bad":
            raise spec.error
        if spec.kind == "time300b":
            yield time300b.read_chunk(spec.chunk, config.storage)
        else:
            yield _read_file(spec, config)
    except IngestError as e:
        if config.fail_fast:
            raise
        claimed = e.claimed_points or spec.points
        yield quarantine_table([(spec.domain, spec.dataset, "*", spec.url, e.reason, e.message, claimed)])
    except Exception as e:  # noqa: BLE001 - any other failure still names the file
        if config.fail_fast:
            raise IngestError("unreadable", f"{spec.url}: {type(e).__name__}: {e}") from e
        yield quarantine_table([(spec.domain, spec.dataset, "*", spec.url, "unreadable",
                                 f"{spec.url}: {type(e).__name__}: {str(e)[:200]}", spec.points)])


def _read_batch(batch: pa.Table, config: IngestConfig) -> pa.Table:
    tables = []
    for blob in batch.column("spec").to_pylist():
        tables += list(iter_series_tables(pickle.loads(blob), config))
    return concat(tables)


def read_series(inputs: list[str], catalog: SourceCatalog | None = None,
                config: IngestConfig | None = None,
                ray_remote_args: dict[str, Any] | None = None) -> "ray.data.Dataset":  # noqa: F821
    """A Ray Data dataset of SERIES_SCHEMA blocks; one read task per read unit.
    ``ray_remote_args`` go to the read tasks (e.g. ``{"resources": {"data": 1}}`` for placement).

    Under ``config.fail_fast`` the read runs here (the dataset comes back materialized) and the
    first quarantined input is raised from this process. The read tasks themselves never raise:
    a task error makes Ray Data cancel the tasks still running, and Ray 2.60's core worker can
    abort the whole driver process when a cancelled task completes at that moment."""
    import ray

    config = config or IngestConfig()
    specs = plan_inputs(inputs, catalog, config)
    if not specs:
        raise IngestError("empty_input", f"{inputs}: nothing to read")
    # each row carries its own pickled read unit, so a task ships only its slice of meta.json
    # one block per read unit (no repartition shuffle): Ray Data runs them as parallel tasks
    blocks = [pa.table({"spec": pa.array([pickle.dumps(s)], pa.binary())}) for s in specs]
    log.info("ingest: %d read units from %d inputs", len(specs), len(inputs))
    ds = ray.data.from_arrow(blocks)
    task_config = dataclasses.replace(config, fail_fast=False)
    ds = ds.map_batches(_read_batch, fn_kwargs={"config": task_config}, batch_size=1, batch_format="pyarrow",
                        zero_copy_batch=True, **(ray_remote_args or {}))
    if not config.fail_fast:
        return ds
    ds = ds.materialize()
    columns = ["quarantine_reason", "quarantine_message", "claimed_points"]
    rows = (dict(zip(("reason", "message", "claimed_points"), row))
            for batch in ds.select_columns(columns).iter_batches(batch_format="pyarrow", batch_size=None)
            for row in zip(*(batch.column(c).to_pylist() for c in columns)))
    problem = first_quarantine(rows)
    if problem is not None:
        raise problem
    return ds


def read_series_local(inputs: list[str], catalog: SourceCatalog | None = None,
                      config: IngestConfig | None = None) -> pa.Table:
    """Everything in one process (small inputs, tests)."""
    config = config or IngestConfig()
    return concat([t for s in plan_inputs(inputs, catalog, config) for t in iter_series_tables(s, config)]) \
        if inputs else SERIES_SCHEMA.empty_table()


def main(argv: list[str] | None = None) -> int:
    """``python -m preprocessing.ingest INPUT... [--catalog C] [--block-elements N]``: read in one
    process and print what each input became (the inference log) and the read throughput."""
    import argparse
    import collections
    import time

    import pyarrow.compute as pc

    p = argparse.ArgumentParser(prog="python -m preprocessing.ingest", description=main.__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--catalog")
    p.add_argument("--block-elements", type=int, default=IngestConfig.block_elements)
    p.add_argument("--quiet", action="store_true", help="only the totals")
    args = p.parse_args(argv)
    config = IngestConfig(block_elements=args.block_elements)
    t0 = time.perf_counter()
    specs = plan_inputs(args.inputs, load_catalog(args.catalog) if args.catalog else None, config)
    t_plan = time.perf_counter() - t0
    points = series = 0
    per_source: dict[str, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    t1 = time.perf_counter()
    for spec in specs:
        for table in iter_series_tables(spec, config):
            lengths = pc.list_value_length(table.column("values")).to_numpy(zero_copy_only=False)
            for src, reason, n in zip(table.column("source").to_pylist(), table.column("quarantine_reason").to_pylist(),
                                      lengths):
                row = per_source[src]
                if reason:
                    row[2][reason] += 1
                else:
                    row[0] += 1
                    row[1] += int(n)
            points += int(lengths.sum())
            series += int(pc.sum(pc.equal(table.column("quarantine_reason"), "")).as_py() or 0)
    t_read = time.perf_counter() - t1
    if not args.quiet:
        print(f"{'source':70s} {'series':>7s} {'points':>11s}  reported")
        for src, (n, pts, reasons) in sorted(per_source.items()):
            print(f"{src[-70:]:70s} {n:7d} {pts:11d}  {dict(reasons) or ''}")
    print(f"{len(specs)} read units, {series} series, {points} points; plan {t_plan:.2f}s, read {t_read:.2f}s "
          f"({points / max(t_read, 1e-9) / 1e6:.1f}M points/s in one process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
