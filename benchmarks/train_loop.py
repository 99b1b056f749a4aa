"""The real training loop against the benchmark's step, at the same batch, in ONE process.

Three rows per (preset, windows), same model, same windows of 4096 points, same precision:

- ``step``: ``benchmarks/train_step.py``'s fast step (per-layer compile, FlexAttention on packed
  rows, grouped-GEMM experts, fused AdamW on fp32 master weights, gradient clipping), timed with
  a device sync after every step.
- ``engine``: the same compiled model stepped by the project's DeepSpeed engine
  (``pipeline.parallel.parallelize``: ZeRO-1, bf16, DeepSpeed's optimizer path and gradient
  clipping), on the same batch, timed the same way: DeepSpeed's step against the plain one.
  ``--engine-variants`` adds rows ``engine:NAME`` with DeepSpeed settings laid over the
  project's (:data:`ENGINE_VARIANTS`); ``--profile-engine`` profiles two steps of each engine
  row: device busy share, kernel time by family and the host ops that take the most time.
- ``loop``: the real training loop (``pipeline.train.loop.run_training`` through the torchrun
  runtime, no Ray) on packed shards written by the preprocessing job's writer with the same row
  layout: data reading and prefetch, the per-step metrics, the step log. Its points/s are the
  median of the loop's own ``points_per_s`` after the first ``--skip`` steps, and its largest
  data wait after them is reported against the 50 ms target. Its last two steps run under the
  loop's own profiler (``train.profile_steps``): the share of the wall time the device was busy
  and the kernel time by family, i.e. how much of the gap is the device waiting for the host.

    python benchmarks/train_loop.py --presets timemoe-50m timemoe-200m --windows 16 --steps 60 --json OUT.json

Needs torch and DeepSpeed (the ``engine`` and ``loop`` rows), not Ray or MLflow. ``--device cpu``
runs the same code uncompiled in fp32 on the tiny preset, as a smoke test.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import make_batch, run_variant  # noqa: E402
from model.flops import mfu  # noqa: E402
from pipeline.config import TrainConfig, load_config  # noqa: E402
from pipeline.parallel.parallelize import build_model, init_distributed, model_config, parallelize  # noqa: E402
from pipeline.train.loop import run_training  # noqa: E402
from pipeline.train.profiling import profile_calls  # noqa: E402
from pipeline.train.torchrun import TorchrunRuntime  # noqa: E402
from preprocessing.config import OutputConfig  # noqa: E402
from preprocessing.pack import PackedRows  # noqa: E402
from preprocessing.schema import MANIFEST_FILE, TRAIN_DIR, minimal_manifest  # noqa: E402
from preprocessing.storage import resolve_filesystem  # noqa: E402
from preprocessing.writer import write_named_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed settings compared with the project's (``zero1``), laid over its generated config
ENGINE_VARIANTS: dict[str, dict] = {
    "zero1": {},
    # DeepSpeed's bf16 overflow check (an inf/nan test per gradient tensor, its flag read on the
    # host) on top of the optimizer's own device-side skip
    "zero1-check": {"bf16": {"check_grad_overflow": True}},
    # gradients copied into reduce buckets by per-parameter hooks during backward
    "zero1-overlap": {"zero_optimization": {"overlap_comm": True, "contiguous_gradients": True}},
    # both: the project's DeepSpeed settings before the loop-against-step measurement
    "zero1-check-overlap": {"bf16": {"check_grad_overflow": True},
                            "zero_optimization": {"overlap_comm": True, "contiguous_gradients": True}},
    # no ZeRO: DeepSpeed's bf16 optimizer (fp32 master weights, its own gradient hooks)
    "zero0": {"zero_optimization": {"stage": 0}},
}


def write_packed_shards(out: Path, rows: int, length: int, seed: int, rows_per_shard: int = 256) -> Path:
    """``rows`` packed rows in the layout ``train_step.make_batch`` builds (sine + noise, four
    series per row on average, every slot used), as a preprocessing output folder."""
    batch = make_batch(rows, length, packed=True, device="cpu", seed=seed)
    width = length + 1
    values = torch.cat([batch["inputs"], batch["labels"][:, -1:]], dim=1).numpy().astype(np.float32)
    seg = torch.cat([batch["segment_ids"], batch["segment_ids"][:, -1:]], dim=1).numpy().astype(np.int32)
    lengths = [[int(n) for n in np.bincount(r)[1:] if n] for r in seg]
    packed = PackedRows(values_RW=values, segment_ids_RW=seg, loss_mask_RW=np.ones((rows, width), np.uint8),
                        seg_mean=[[0.0] * len(n) for n in lengths], seg_std=[[1.0] * len(n) for n in lengths],
                        seg_series=[[f"bench/{r}/{k}" for k in range(len(n))] for r, n in enumerate(lengths)],
                        seg_lengths=lengths)
    fs, root = resolve_filesystem(str(out / TRAIN_DIR))
    entries = write_named_shards(fs, root, packed, length, OutputConfig(rows_per_shard=rows_per_shard))
    (out / MANIFEST_FILE).write_text(json.dumps(minimal_manifest(length, {TRAIN_DIR: entries},
                                                                 source={"benchmark": "train_loop"})))
    return out


def loop_config(preset: str, windows: int, steps: int, data: Path, output: Path, cuda: bool) -> TrainConfig:
    """The preset's recipe at ``windows`` per step on one device, nothing saved, no tracking."""
    base = ROOT / "configs" / (f"{preset}.yaml" if (ROOT / "configs" / f"{preset}.yaml").exists() else "tiny-cpu.yaml")
    overrides = [f"model.preset={preset}", f"data.path={data}", "data.loader=plain", f"train.max_steps={steps}",
                 f"train.global_batch_size={windows}", f"train.micro_batch_size={windows}", "train.log_every=10",
                 "train.eval_every=0", "train.checkpoint_every=0", "train.checkpoint_at_end=false",
                 "train.export=false", f"train.output_dir={output}", "scaling.num_workers=1",
                 f"scaling.use_gpu={str(cuda).lower()}", "tracking.enabled=false", "optim.warmup_steps=10",
                 "parallel.zero_stage=1", "parallel.ep_size=1", f"parallel.precision={'bf16' if cuda else 'fp32'}",
                 f"parallel.compile={str(cuda).lower()}", f"train.profile_steps=[{steps - 1},{steps}]"]
    cfg = load_config(str(base), overrides)
    cfg.validate()
    return cfg


def timed(step, steps: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def engine_row(cfg: TrainConfig, windows: int, length: int, steps: int, warmup: int, cuda: bool,
               variant: str = "zero1", profile: bool = False) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    gc.collect()  # an earlier engine holds reference cycles (and device memory)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    init_distributed(cuda)
    overrides = ENGINE_VARIANTS[variant]
    if not cuda:  # bf16 settings do not apply to the fp32 smoke test
        overrides = {k: v for k, v in overrides.items() if k != "bf16"}
    engine, _ = parallelize(build_model(cfg.model, cfg.train.seed), cfg, 1, cuda, deepspeed_overrides=overrides)
    batch = make_batch(windows, length, packed=True, device=str(device.type), seed=1)

    def step():
        out = engine(batch["inputs"], segment_ids=batch["segment_ids"], labels=batch["labels"],
                     loss_mask=batch["loss_mask"])
        engine.backward(out.loss)
        engine.step()

    times = timed(step, steps, warmup, cuda)
    median = statistics.median(times)
    row = dict(variant="engine" if variant == "zero1" else f"engine:{variant}", step_s_median=median,
               points_per_s=windows * length / median,
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
    if profile:
        row["profile"] = profile_calls(step, 2, cuda)
    del engine
    return row


def loop_row(cfg: TrainConfig, skip: int) -> dict:
    gc.collect()  # the engine row's DeepSpeed engine holds reference cycles (and device memory)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t = time.perf_counter()
    run_training(cfg, TorchrunRuntime(cfg, resume=False))
    wall_s = time.perf_counter() - t
    out = Path(cfg.train.output_dir)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_profiled = cfg.train.profile_steps[0] if cfg.train.profile_steps else len(metrics) + 1
    after = [m for m in metrics if skip < m["step"] < first_profiled] or metrics
    profile = json.loads((out / "profile" / "rank0.json").read_text()) if (out / "profile" / "rank0.json").exists() else {}
    return dict(variant="loop",
                step_s_median=statistics.median(m["step_time_s"] for m in after), wall_s=wall_s,
                # the pace between step ends (logging, metrics files and checkpoints included):
                # what the run's wall clock sees, against the per-step time above
                interval_s_median=statistics.median(m["step_interval_s"] for m in after),
                interval_s_sum_measured=sum(m["step_interval_s"] for m in after),
                step_s_sum_all=sum(m["step_time_s"] for m in metrics),
                profile={k: profile[k] for k in ("wall_ms_per_step", "busy_share", "kernel_ms_per_step",
                                                 "top_kernels_ms_per_step") if k in profile},
                points_per_s=statistics.median(m["points_per_s"] for m in after),
                data_wait_ms_max=max(m["data_wait_ms"] for m in after),
                data_wait_ms_max_all=max(m["data_wait_ms"] for m in metrics),
                steps_measured=len(after), peak_mem_gb=max(m.get("peak_mem_gb", float("nan")) for m in metrics))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["timemoe-50m"])
    ap.add_argument("--windows", type=int, nargs="+", default=[16])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60, help="loop steps; the step and engine rows time steps // 3")
    ap.add_argument("--skip", type=int, default=20, help="loop steps left out of its medians (compile, warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=0, help="rows of packed data (default: one epoch = steps x windows)")
    ap.add_argument("--engine-variants", nargs="+", default=["zero1"], choices=sorted(ENGINE_VARIANTS),
                    help="DeepSpeed settings to time (zero1 is the project's)")
    ap.add_argument("--profile-engine", action="store_true", help="profile two steps of each engine row")
    ap.add_argument("--json", default="benchmarks/results/train_loop.json")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test (tiny preset, fp32, no compile)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("train_loop.py needs a CUDA GPU (or --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        for preset in args.presets:
            for windows in args.windows:
                data = write_packed_shards(Path(tmp) / f"data-{preset}-{windows}",
                                           args.rows or args.steps * windows, args.length, seed=2)
                cfg = loop_config(preset, windows, args.steps, data, Path(tmp) / f"run-{preset}-{windows}", cuda)
                # the loop rows run before the engine rows: each engine left behind (compiled
                # graphs, allocator state) could only slow what comes after it
                mcfg = model_config(cfg.model)
                timed_steps = max(3, args.steps // 3)
                found = []
                makers = [("step", lambda: dict(run_variant(preset, "compiled" if cuda else "grouped", windows,
                                                            args.length, timed_steps, args.warmup, args.device),
                                                variant="step"))]
                makers.append(("loop", lambda: loop_row(cfg, args.skip)))
                makers += [(f"engine:{v}", functools.partial(engine_row, cfg, windows, args.length, timed_steps,
                                                             args.warmup, cuda, v, args.profile_engine))
                           for v in args.engine_variants]
                for name, make in makers:
                    try:
                        row = make()
                    except Exception as exc:  # keep the other rows
                        row = dict(variant=name, error=f"{type(exc).__name__}: {exc}"[:500])
                    row.update(preset=preset, windows=windows)
                    if "points_per_s" in row:
                        row["mfu"] = mfu(row["points_per_s"], mcfg, args.length) if cuda else float("nan")
                    found.append(row)
                    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}), flush=True)
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # a run cut short keeps its rows
                    Path(args.json).write_text(json.dumps(dict(partial=True, rows=rows + found), indent=2, default=str))
                base = next((r for r in found if r["variant"] == "step" and "error" not in r), None)
                for r in found:
                    r["x_step"] = r["points_per_s"] / base["points_per_s"] if base and "points_per_s" in r else float("nan")
                rows += found
    print(f"\n{'preset':14s} {'row':24s} {'win':>4s} {'step ms':>9s} {'points/s':>11s} {'MFU':>6s} {'peak GB':>8s} "
          f"{'x step':>7s} {'data wait max (after skip / all)':>34s}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:14s} {r['variant']:24s} {r['windows']:4d}  ERROR {r['error'][:90]}")
            continue
        wait = (f"{r['data_wait_ms_max']:.1f} / {r['data_wait_ms_max_all']:.1f} ms" if "data_wait_ms_max" in r else "-")
        print(f"{r['preset']:14s} {r['variant']:24s} {r['windows']:4d} {1e3 * r['step_s_median']:9.1f} "
              f"{r['points_per_s']:11,.0f} {100 * r['mfu']:5.1f}% {r['peak_mem_gb']:8.1f} {r['x_step']:7.2f} {wait:>34s}")
        if "interval_s_median" in r:
            print(f"{'':14s} between step ends: {1e3 * r['interval_s_median']:.1f} ms median "
                  f"({r['interval_s_median'] / r['step_s_median']:.3f}x the step time)")
        if r.get("profile"):
            pr = r["profile"]
            kernels = ", ".join(f"{k} {v:.1f}" for k, v in pr.get("kernel_ms_per_step", {}).items())
            print(f"{'':14s} profiled: {pr.get('wall_ms_per_step', 0):.1f} ms/step, device busy "
                  f"{100 * pr.get('busy_share', 0):.0f}%, kernels (ms/step) {kernels}")
            if pr.get("host_ops_ms_per_step"):
                print(f"{'':14s} host ops (self ms/step, calls/step): " + "; ".join(
                    f"{n} {ms:.1f} x{c}" for n, ms, c in pr["host_ops_ms_per_step"][:12]))
    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor(), torch=torch.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"), argv=sys.argv)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2, default=str))


if __name__ == "__main__":
    main()
