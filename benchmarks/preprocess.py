"""End-to-end preprocessing throughput (read, dedup, clean, normalise, pack, write Parquet) on a
synthetic corpus in Time-300B layout: Ray Data pipeline (``run_preprocess``) next to a
single-process loop over the SAME pure functions, plus peak memory at 1x and 10x corpus size.

    .venv/bin/python benchmarks/preprocess.py --points 100000000 --rss-base 10000000 --scale-rss 10

Environment knobs: BENCH_READER=builtin (Ray path reads with this script's memmap reader instead
of preprocessing.ingest.read_series), BENCH_BLOCK_ELEMENTS (ingest read-task size),
BENCH_OBJECT_STORE_BYTES (Ray object-store budget, default 1 GiB), BENCH_COMPRESSION (shard codec,
e.g. lz4, instead of the product default), TIMEMOE_DATA_STATS=1 (log Ray Data's per-operator stats).

``--ray-warm`` adds a "ray-warm" row: the same Ray measurement after an UNTIMED 2M-point run on the
same Ray instance (a long-running cluster taking ``ray job submit`` jobs: Ray Data's per-cluster
singleton actors already exist). The headline per-core figure stays the cold "ray" row.

"Mpts/s/core" = points / wall seconds / the cores Ray was given (``--cpus``). "Mpts/cpu-s" divides
by the CPU seconds of the worker's whole process tree over its lifetime (Ray start-up, and for
ray-warm the warm-up run, included); "run cpu-s" is the CPU the tree burnt inside the timed
interval only.

Prints a table and writes ``benchmarks/results/preprocess.json``. Each measurement runs in a
fresh subprocess; peak memory is the sampled sum of PSS (proportional set size, so shared
object-store pages are not double counted) over that process and all its descendants (the
Ray head, raylet and workers it starts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocessing.synthetic import generate_benchmark_corpus  # noqa: E402

# ------------------------------------------------------------------------------ the corpus


def generate_corpus(out: Path, total_points: int, seed: int = 0) -> Path:
    """Time-300B layout (``<domain>/<dataset>/meta.json + data-1-of-1.bin``), random-walk plus
    seasonal series of 2k..60k points, ~1% of them with a NaN gap or a dead (zero) stretch
    (``preprocessing.synthetic.generate_benchmark_corpus``)."""
    generate_benchmark_corpus(str(out), total_points, seed)
    return out


def _tasks(root: Path, points_per_task: int = 4_000_000) -> list[dict]:
    """Read tasks: ranges of sequences of one dataset, ~points_per_task points each."""
    tasks = []
    for meta_path in sorted(root.glob("*/*/meta.json")):
        meta = json.loads(meta_path.read_text())
        scales = meta["scales"]
        start, acc = 0, 0
        for i, sc in enumerate(scales):
            acc += sc["length"]
            if acc >= points_per_task or i == len(scales) - 1:
                tasks.append({"folder": str(meta_path.parent), "first": start, "last": i + 1})
                start, acc = i + 1, 0
    return tasks


def read_task(task: dict) -> "pa.Table":
    """One read task -> series table (preprocessing/series.py format), from a memmap."""
    import pyarrow as pa

    from preprocessing.series import SERIES_SCHEMA

    folder = Path(task["folder"])
    meta = json.loads((folder / "meta.json").read_text())
    scales = meta["scales"][task["first"]:task["last"]]
    mm = np.memmap(folder / "data-1-of-1.bin", dtype=np.float32, mode="r")
    a, b = scales[0]["offset"], scales[-1]["offset"] + scales[-1]["length"]
    flat = np.array(mm[a:b])
    offsets = np.array([s["offset"] - a for s in scales] + [b - a], dtype=np.int64)
    n = len(scales)
    domain, dataset = folder.parent.name, folder.name
    return pa.Table.from_arrays([
        pa.array([domain] * n), pa.array([dataset] * n),
        pa.array([str(task["first"] + i) for i in range(n)]), pa.array([str(folder)] * n),
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        pa.array([""] * n), pa.array([""] * n), pa.array([s["length"] for s in scales], pa.int64()),
    ], schema=SERIES_SCHEMA)


def ray_series(root: Path):
    import ray

    if os.environ.get("BENCH_READER", "ingest") == "ingest":
        try:
            from preprocessing.ingest import (
                IngestConfig,
                read_series,  # the product's reader when present
            )

            block = int(os.environ.get("BENCH_BLOCK_ELEMENTS", 32 * 2**20))
            return read_series([str(root)], config=IngestConfig(block_elements=block)), "preprocessing.ingest.read_series"
        except ImportError:
            pass
    tasks = _tasks(root)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    return ds.map_batches(lambda b: read_task({k: b[k][0].item() if hasattr(b[k][0], "item") else b[k][0] for k in b}),
                          batch_size=1, batch_format="numpy"), "benchmark memmap reader"


# ------------------------------------------------------------------------------ the workers


def bench_config(corpus: Path, out: Path) -> "PreprocessConfig":
    from preprocessing.config import PreprocessConfig

    cfg = PreprocessConfig(inputs=[str(corpus)], output=str(out))
    if os.environ.get("BENCH_COMPRESSION"):
        cfg.output_options.compression = os.environ["BENCH_COMPRESSION"]
        cfg.output_options.compression_level = None
    return cfg


def worker_ray(corpus: Path, out: Path, cpus: int, warm_corpus: Path | None = None) -> dict:
    import ray

    from preprocessing.job import run_preprocess

    # A fixed object-store budget (Ray's default is 30% of RAM): Ray Data's backpressure then
    # bounds the memory of the streaming pipeline whatever the corpus size.
    store = int(os.environ.get("BENCH_OBJECT_STORE_BYTES", 1 << 30))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING", object_store_memory=store)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if warm_corpus is not None:
        # "Long-running cluster" figure: one small run first on the same Ray instance, so that
        # Ray Data's per-cluster singletons (stats and autoscaling-coordinator actors) exist,
        # as they do on a cluster that takes `ray job submit` jobs. NOT timed.
        import shutil

        warm_out = out.parent / (out.name + "-warm")
        warm_series, _ = ray_series(warm_corpus)
        run_preprocess(bench_config(warm_corpus, warm_out), series=warm_series)
        shutil.rmtree(warm_out, ignore_errors=True)
    series, reader = ray_series(corpus)
    cfg = bench_config(corpus, out)
    cpu0 = _tree_cpu_now()
    t0 = time.perf_counter()
    result = run_preprocess(cfg, series=series)
    dt = time.perf_counter() - t0
    cpu_run = _tree_cpu_now(cpu0)
    ray.shutdown()
    return {"seconds": dt, "cpu_seconds_run": cpu_run, "points_in": result.report["points_in"], "points_kept": result.report["points_kept"],
            "efficiency": result.efficiency, "reader": reader}


def _tree_cpu_now(before: dict[int, float] | None = None):
    """CPU seconds (user+sys) per process of this process tree; with ``before``, the total
    burnt since then (processes born since count whole)."""
    import psutil

    now = {}
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            now[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    if before is None:
        return now
    return sum(v - before.get(pid, 0.0) for pid, v in now.items())


def worker_single(corpus: Path, out: Path) -> dict:
    """The same pure functions in one process: no Ray, no object store, no actor."""
    import pyarrow as pa

    from preprocessing.accounting import Accounting, check_invariant
    from preprocessing.job import StageContext, clean_batch, duplicate_losers, fingerprint_batch, pack_and_write

    cfg = bench_config(corpus, out)
    tasks = _tasks(corpus)
    import pandas  # noqa: F401  (pyarrow imports it lazily on first use; keep that out of the timing)

    t0 = time.perf_counter()
    vh, kh = [], []
    for task in tasks:
        fp = fingerprint_batch(read_task(task))
        vh.append(fp.column("value_hash").to_numpy())
        kh.append(fp.column("key_hash").to_numpy())
    ctx = StageContext(cfg, drop_key_hashes=duplicate_losers(np.concatenate(vh), np.concatenate(kh)))
    acc, pending, pending_rows = Accounting(), [], 0
    points = rows = 0

    def flush(tables):
        nonlocal points, rows
        meta = pack_and_write(pa.concat_tables(tables), cfg.pack.window_length, str(out), "_tmp", cfg.output_options, cfg.seed)
        points += sum(meta.column("points").to_pylist())
        rows += sum(meta.column("rows").to_pylist())

    for task in tasks:
        chunks, part = clean_batch(read_task(task), ctx)
        acc.merge(part)
        for start in range(0, chunks.num_rows, cfg.pack.pack_batch_chunks):
            piece = chunks.slice(start, cfg.pack.pack_batch_chunks)
            pending.append(piece)
            pending_rows += piece.num_rows
            if pending_rows >= cfg.pack.pack_batch_chunks:
                flush(pending)
                pending, pending_rows = [], 0
    if pending:
        flush(pending)
    slots = rows * (cfg.pack.window_length + 1)
    check_invariant(acc)
    dt = time.perf_counter() - t0
    total = acc.totals()
    return {"seconds": dt, "points_in": total.points_in, "points_kept": total.points_kept,
            "efficiency": points / slots if slots else 1.0, "reader": "benchmark memmap reader"}


# ------------------------------------------------------------------------------ measuring


def _tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """PSS of the process tree; updates ``cpu`` (pid -> user+sys seconds, last seen)."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(mode: str, corpus: Path, cpus: int, warm_corpus: Path | None = None) -> dict:
    """Run one worker in a subprocess, sampling the PSS of its process tree."""
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", mode, "--corpus", str(corpus), "--out", out, "--cpus", str(cpus)]
        if warm_corpus is not None:
            cmd += ["--warm-corpus", str(warm_corpus)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
        peak = 0
        cpu: dict[int, float] = {}
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_sample(proc.pid, cpu))
                stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        stdout, _ = proc.communicate()
        stop.set()
        th.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed with code {proc.returncode}")
        result = json.loads(stdout.strip().splitlines()[-1])
        result["peak_pss_mb"] = peak / 2**20
        # CPU seconds of the whole tree (sampled every 0.25 s: the last fraction of a second of
        # each process may be missed), the fair measure on a machine shared with other work.
        result["cpu_seconds_tree"] = sum(cpu.values())
        return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", type=int, default=100_000_000)
    p.add_argument("--scale-rss", type=int, default=10, help="also run the Ray pipeline at this multiple (0 = skip)")
    p.add_argument("--rss-base", type=int, default=20_000_000, help="points of the 1x corpus of the memory check")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", choices=["ray", "single"])
    p.add_argument("--corpus")
    p.add_argument("--out")
    p.add_argument("--warm-corpus")
    p.add_argument("--ray-warm", action="store_true",
                   help="also time the Ray pipeline after an untimed small run on the same Ray instance "
                        "(a long-running cluster: Ray Data's singleton actors already up)")
    args = p.parse_args()
    if args.worker:
        if args.worker == "ray":
            res = worker_ray(Path(args.corpus), Path(args.out), args.cpus,
                             Path(args.warm_corpus) if args.warm_corpus else None)
        else:
            res = worker_single(Path(args.corpus), Path(args.out))
        print(json.dumps(res))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    rows = []
    t = time.perf_counter()
    main_corpus = generate_corpus(work / f"corpus-{args.points}", args.points)
    print(f"generated {args.points:,} points in {time.perf_counter() - t:.1f}s under {work}", flush=True)
    modes = [("single", 1), ("ray", args.cpus)] + ([("ray-warm", args.cpus)] if args.ray_warm else [])
    warm = generate_corpus(work / "corpus-2000000", 2_000_000) if args.ray_warm else None
    for mode, cpus in modes:
        r = measure("ray" if mode == "ray-warm" else mode, main_corpus, cpus, warm if mode == "ray-warm" else None)
        r.update(mode=mode, cores=cpus, corpus_points=args.points,
                 points_per_s=r["points_in"] / r["seconds"], points_per_s_per_core=r["points_in"] / r["seconds"] / cpus,
                 points_per_cpu_s=r["points_in"] / max(r["cpu_seconds_tree"], 1e-9))
        rows.append(r)
        print(f"{mode}: {r['points_per_s_per_core'] / 1e6:.2f}M points/s/core", flush=True)
    if args.scale_rss:
        for mult in (1, args.scale_rss):
            n = args.rss_base * mult
            if n == args.points:  # the main Ray run already measured this size
                r = dict(next(x for x in rows if x["mode"] == "ray"))
            else:
                r = measure("ray", generate_corpus(work / f"corpus-{n}", n), args.cpus)
            r.update(mode=f"ray-rss-{mult}x", cores=args.cpus, corpus_points=n,
                     points_per_s=r["points_in"] / r["seconds"], points_per_s_per_core=r["points_in"] / r["seconds"] / args.cpus,
                     points_per_cpu_s=r["points_in"] / max(r["cpu_seconds_tree"], 1e-9))
            rows.append(r)
    print()
    print(f"{'mode':<14}{'cores':>6}{'points in':>14}{'seconds':>9}{'Mpts/s':>9}{'Mpts/s/core':>13}{'Mpts/cpu-s':>12}"
          f"{'run cpu-s':>10}{'efficiency':>12}{'peak PSS MB':>13}")
    for r in rows:
        print(f"{r['mode']:<14}{r['cores']:>6}{r['points_in']:>14,}{r['seconds']:>9.2f}{r['points_per_s'] / 1e6:>9.2f}"
              f"{r['points_per_s_per_core'] / 1e6:>13.2f}{r['points_per_cpu_s'] / 1e6:>12.2f}"
              f"{r.get('cpu_seconds_run', float('nan')):>10.2f}{r['efficiency']:>12.4f}"
              f"{r['peak_pss_mb']:>13.0f}")
    ray_rate = next(r for r in rows if r["mode"] == "ray")["points_per_s_per_core"]
    single_rate = next(r for r in rows if r["mode"] == "single")["points_per_s_per_core"]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "command": "python " + " ".join(sys.argv),
        "ray_over_single_per_core": ray_rate / single_rate,
        "load_average_1min_at_end": os.getloadavg()[0],
        "compression": os.environ.get("BENCH_COMPRESSION") or "zstd (product default)",
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / "preprocess.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nRay per-core / single-process per-core = {ray_rate / single_rate:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
