"""The zero-shot protocol where the GPUs are: (dataset, horizon, channel) work spread over Ray
actors, one GPU each, merged into the rows one process would compute.

``evaluate_model`` is what the jobs call. ``workers``:
- an integer N > 0: N actors (``num_gpus=1`` each when the cluster has GPUs and the device is
  not ``cpu``, else ``num_cpus=1``: the CPU path of the same code, used by the tests);
- 0: in this process;
- ``auto``: with Ray running or ``RAY_ADDRESS`` set (``ray job submit``, a cluster), one actor per
  GPU of the cluster, so the work runs on the GPU nodes, not on the head's CPU; with no Ray, one
  actor per local GPU when there are several; otherwise in this process.

Actors receive the benchmark data and, for a checkpoint folder, the checkpoint's files through
Ray's object store, so GPU nodes need no shared file system; ``models:/`` and ``runs:/`` URIs are
loaded by each actor from the tracking server. Each actor returns ``ErrorSums`` per work item;
sums of squared and absolute errors add exactly, so the merged MSE/MAE equal the single-process
run's up to float summation order (tested).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from model import TimeMoeModel
from pipeline.evaluation.benchmark_data import BenchmarkDataset
from pipeline.evaluation.inference import InferenceOptions, ModelForecaster, is_model_uri, max_context_of
from pipeline.evaluation.protocol import (
    ErrorSums,
    EvalConfig,
    EvalResult,
    check_context,
    error_sums,
    evaluate,
    load_forecaster,
    protocol_plan,
)

CHECKPOINT_FILES = ("config.json", "model.safetensors")


def _ray_up() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)


def plan_workers(workers: int | str, options: InferenceOptions) -> tuple[int, bool]:
    """(number of actors, whether each takes a GPU); 0 actors = in this process."""
    on_cpu = (options.device or "auto").lower() == "cpu"
    if workers != "auto":
        n = int(workers)
        if n < 0:
            raise ValueError(f"--eval-workers {workers}: must be >= 0 or auto")
        if n == 0:
            return 0, False
        _ray_up()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return n, gpus > 0 and not on_cpu
    if on_cpu:
        return 0, False
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        _ray_up()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return (gpus, True) if gpus > 0 else (0, False)
    local = torch.cuda.device_count()
    if local > 1:
        _ray_up()
        return local, True
    return 0, False


class _EvalWorker:
    """Loads the model once; evaluates work items."""

    def __init__(self, source: dict[str, Any], options: InferenceOptions, tracking_uri: str | None) -> None:
        if source["kind"] == "uri":
            self.forecaster, _ = load_forecaster(source["spec"], tracking_uri, options)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for name, blob in source["files"].items():
                    (Path(tmp) / name).write_bytes(blob)
                model = TimeMoeModel.from_pretrained(tmp)
            self.forecaster = ModelForecaster(model, options, name=source["name"])

    def describe(self) -> dict[str, Any]:
        return self.forecaster.describe() | {"node": ray.util.get_node_ip_address()}

    def run(self, ds: BenchmarkDataset, horizon: int, channel: int, cfg: EvalConfig) -> tuple[str, int, int, ErrorSums]:
        return ds.name, horizon, channel, error_sums(self.forecaster, ds, horizon, cfg, channels=[channel])


def _source(spec: str) -> dict[str, Any]:
    if is_model_uri(spec):
        return {"kind": "uri", "spec": spec}
    path = Path(spec)
    missing = [n for n in CHECKPOINT_FILES if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"{spec}: missing {', '.join(missing)} (expected a save_pretrained checkpoint)")
    return {"kind": "files", "name": path.name, "files": {n: (path / n).read_bytes() for n in CHECKPOINT_FILES}}


def evaluate_model(spec: str, benchmarks_dir: str | Path, cfg: EvalConfig | None = None,
                   options: InferenceOptions | None = None, workers: int | str = "auto",
                   tracking_uri: str | None = None, model_name: str | None = None) -> EvalResult:
    """The protocol for the model at ``spec`` (checkpoint folder or MLflow URI), in this process
    or on Ray actors (module doc). The result states the device, dtype and worker count."""
    cfg = cfg or EvalConfig()
    options = options or InferenceOptions()
    check_context(cfg, max_context_of(spec))  # before any worker starts
    n, use_gpu = plan_workers(workers, options)
    if n == 0:
        fc, name = load_forecaster(spec, tracking_uri, options)
        result = evaluate(fc, benchmarks_dir, cfg, model_name=model_name or name)
        result.inference["workers"] = 0
        return result

    plan = protocol_plan(benchmarks_dir, cfg)
    source_ref = ray.put(_source(spec))
    cfg_ref = ray.put(cfg)
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    actor_cls = ray.remote(**resources)(_EvalWorker)
    # inside an actor Ray sets CUDA_VISIBLE_DEVICES to its one GPU: "cuda" is that GPU
    actor_opts = dataclasses.replace(options, device="cuda" if use_gpu and options.device.startswith("cuda") else options.device)
    actors = [actor_cls.remote(source_ref, actor_opts, tracking_uri) for _ in range(n)]
    described = ray.get([a.describe.remote() for a in actors])
    items = [(ds, h, c) for ds, hs in plan for h in hs for c in range(ds.values_TC.shape[1])]
    ds_refs = {ds.name: ray.put(ds) for ds, _ in plan}
    t0 = time.perf_counter()
    pending, results = {}, []
    queue = list(items)
    # one item in flight per actor, the next sent when one returns: balances uneven item costs
    free = list(actors)
    while queue or pending:
        while queue and free:
            ds, h, c = queue.pop(0)
            a = free.pop()
            pending[a.run.remote(ds_refs[ds.name], h, c, cfg_ref)] = a
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            free.append(pending.pop(ref))
            results.append(ray.get(ref))
        if cfg.progress and results and len(results) % max(1, len(items) // 10) == 0:
            print(f"[eval] {len(results)}/{len(items)} work items on {n} worker(s), "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    for a in actors:
        # a graceful exit queued behind the actor's finished tasks: ray.kill raced with the
        # actor's own teardown and made the core worker log a "Mismatched ActorID" error line
        a.__ray_terminate__.remote()
    merged: dict[tuple[str, int], ErrorSums] = {}
    for name, h, _, sums in results:
        merged[(name, h)] = merged.get((name, h), ErrorSums()).add(sums)
    rows = [merged[(ds.name, h)].row(ds.name, h, cfg.context_for(h)) for ds, hs in plan for h in hs]
    first = described[0]
    inference = {k: v for k, v in first.items() if k != "node"} | {
        "workers": n, "nodes": sorted({d["node"] for d in described}), "wall_seconds": round(time.perf_counter() - t0, 2)}
    name = model_name or (spec if is_model_uri(spec) else Path(spec).name)
    if cfg.progress:
        for r in rows:
            print(f"[eval] {name} {r.dataset} H={r.horizon} ctx={r.context}: mse {r.mse:.4f} mae {r.mae:.4f} "
                  f"({r.windows} windows)", flush=True)
    return EvalResult(model=name, config=cfg, rows=rows, inference=inference)
