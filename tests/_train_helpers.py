"""Helpers for tests/test_train_*.py: small packed shards, a 2-process gloo launcher, configs.

Shards are written with the real schema (``preprocessing.schema.window_schema``): synthetic
series (sines + noise) packed two segments per row with some padding, z-scored per segment.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model import TimeMoeConfig, TimeMoeModel
from preprocessing.schema import MANIFEST_FILE, SCHEMA_VERSION, SHARD_PATTERN, window_schema


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``tiny`` model saved in the published layout at ``path``."""
    torch.manual_seed(seed)
    TimeMoeModel(TimeMoeConfig.preset("tiny")).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(n: int, window_length: int, rng: np.random.Generator) -> dict[str, list]:
    width = window_length + 1
    out: dict[str, list] = {k: [] for k in ("values", "segment_ids", "loss_mask", "seg_mean", "seg_std", "seg_series")}
    for i in range(n):
        split = int(rng.integers(width // 3, width - 4))
        pad = int(rng.integers(0, 4))
        vals = np.zeros(width, np.float32)
        seg = np.zeros(width, np.int32)
        means, stds, names = [], [], []
        for s, (a, b) in enumerate([(0, split), (split, width - pad)], start=1):
            t = np.arange(b - a)
            x = np.sin(2 * np.pi * t / rng.uniform(6, 30) + rng.uniform(0, 6)) + 0.1 * rng.standard_normal(b - a)
            mu, sd = float(x.mean()), float(x.std() or 1.0)
            vals[a:b] = (x - mu) / sd
            seg[a:b] = s
            means.append(mu), stds.append(sd), names.append(f"synthetic/test/s{i}_{s}")
        mask = (seg > 0).astype(np.uint8)
        for k, v in zip(out, (vals, seg, mask, means, stds, names)):
            out[k].append(v)
    return out


def write_shards(root: Path, window_length: int = 32, train_rows: int = 64, val_rows: int = 16,
                 rows_per_shard: int = 16, seed: int = 0, nan_train_shard: int | None = None) -> Path:
    """A packed dataset at ``root`` (train/, val/, manifest.json); returns ``root``. With
    ``nan_train_shard`` every value of that training shard is 3e38 (finite, but the forward overflows: a broken input the model cannot refuse up front)."""
    rng = np.random.default_rng(seed)
    schema = window_schema(window_length)
    counts = {}
    for split, total in (("train", train_rows), ("val", val_rows)):
        (root / split).mkdir(parents=True, exist_ok=True)
        n_shards = 0
        for start in range(0, total, rows_per_shard):
            rows = _rows(min(rows_per_shard, total - start), window_length, rng)
            if split == "train" and n_shards == nan_train_shard:
                rows["values"] = [np.full_like(v, 3e38) for v in rows["values"]]
            table = pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in rows.items()}, schema=schema)
            pq.write_table(table, root / split / SHARD_PATTERN.format(index=n_shards))
            n_shards += 1
        counts[split] = {"windows": total, "shards": n_shards}
    shards = {split: [{"file": SHARD_PATTERN.format(index=i), "rows": min(rows_per_shard, c["windows"] - i * rows_per_shard)}
                      for i in range(c["shards"])] for split, c in counts.items()}
    (root / MANIFEST_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "window_length": window_length,
                                                  "shards": shards, "rows": {k: c["windows"] for k, c in counts.items()}}))
    return root


def tiny_config(data_path: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a few-step tiny run; ``sections`` override keys per section."""
    cfg: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data_path), "loader": "plain", "prefetch_batches": 2},
        "optim": {"warmup_steps": 2, "lr": 1e-3},
        "parallel": {"zero_stage": 1, "precision": "fp32"},
        "train": {"max_steps": 5, "global_batch_size": 8, "micro_batch_size": 4, "seed": 7,
                  "log_every": 1, "eval_batches": 2, "output_dir": str(out_dir), "export": False},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def _entry(rank: int, world: int, port: int, fn: Callable, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        shutdown_process_groups()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def shutdown_process_groups() -> None:
    """Every rank leaves together and tears its process groups down before exiting: a gloo group
    left to the interpreter's exit can abort the process ("terminate called without an active
    exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn: Callable, out_dir: Path, world: int, *args: Any) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return each rank's result."""
    import torch
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world, join=True)
    except Exception as exc:
        errs = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.err")))
        raise AssertionError(f"worker failed:\n{errs or exc}") from exc
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def probe_inputs(window_length: int = 32):
    import torch

    g = torch.Generator().manual_seed(3)
    return torch.randn(2, window_length, generator=g)


def torchrun_worker(rank: int, world: int, cfg_dicts: list[dict], resume: bool = False) -> list[dict]:
    """Body of one rank: the real loop under the torchrun runtime, once per config (one
    process group for all, to pay start-up once). Returns per config: the history and the
    trained module's 1-step predictions on :func:`probe_inputs`."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.train.loop import run_training
    from pipeline.train.torchrun import TorchrunRuntime

    out = []
    for cfg_dict in cfg_dicts:
        cfg = config_from_dict(cfg_dict)
        result = run_training(cfg, TorchrunRuntime(cfg, resume))
        pred = None
        if cfg.parallel.zero_stage != 3:
            with torch.no_grad():
                result.engine.module.eval()
                pred = result.engine.module(probe_inputs()).predictions[1].float()
        dispatchers = [repr(m.dispatcher) for m in result.engine.module.modules() if hasattr(m, "dispatcher")]
        out.append({"history": result.history, "pred": pred, "run_id": result.run_id, "dispatchers": dispatchers})
    return out


def start_mlflow_server(root: Path):
    """Our own ``mlflow server`` (for tests that kill it); returns ``(process, uri)``."""
    import subprocess
    import sys
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early; see {root / 'server.log'}")
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return proc, uri
        except Exception:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError("mlflow server did not answer within 120 s")


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(out_dir: Path, step: int, timeout: float = 300.0) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(m["step"] >= step for m in read_metrics(out_dir)):
                return
        except ValueError:  # a line being written
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{out_dir}: step {step} not reached in {timeout} s")
