"""Multi-GPU training throughput of the REAL train loop (``pipeline.train.torchrun``): data
parallel vs expert parallel, 1 to 8 GPUs, with DeepSpeed ZeRO and bf16 on packed 4096-point
windows. Each run is ``torchrun -m pipeline.train.torchrun`` on a set of GPUs; runs on disjoint
GPU sets of one host go at the same time (a "wave") to use the machine's time well.

    python benchmarks/train_distributed.py data --out /tmp/packed            # synthetic packed shards
    python benchmarks/train_distributed.py run --data /tmp/packed --plan scaling --out results/

Per run it reads rank 0's ``metrics.jsonl`` (points/s, MFU, peak memory per GPU) and every rank's
``profile/rankR.json`` (``train.profile_steps``: all-to-all share of the step, kernel time by
category; ``pipeline.train.profiling``), and prints one table row. Weak scaling: every GPU gets the
same micro-batch, so the global batch grows with the GPU count (no gradient accumulation).
Scaling efficiency = points/s on G GPUs / (G x points/s on 1 GPU) for the same preset.

``--cpu`` runs a plan on gloo with the tiny preset: a smoke test of this script, no timing value.
Needs torch, pyarrow and deepspeed (no Ray, no MLflow).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------- data


def make_packed_shards(out: Path, rows: int, window_length: int, seed: int = 0, rows_per_shard: int = 128) -> dict:
    """Synthetic series (sines + trend + noise, lengths 256..window+1, ~4 per row), z-scored and
    packed by the data plane's own packer and shard writer into ``out/train/shard-*.parquet``."""
    import pyarrow.fs as pafs

    from preprocessing.config import OutputConfig
    from preprocessing.pack import assemble_rows
    from preprocessing.schema import MANIFEST_FILE, SHARD_PATTERN, TRAIN_DIR
    from preprocessing.writer import rows_table, write_shard

    width = window_length + 1
    rng = np.random.default_rng(seed)
    chunks, means, stds, keys = [], [], [], []
    total = 0
    while total < rows * width:
        n = int(np.exp(rng.uniform(np.log(256), np.log(width))))
        t = np.arange(n, dtype=np.float64)
        x = (np.sin(2 * np.pi * t / rng.uniform(12, 400)) + 1e-3 * rng.normal() * t
             + rng.uniform(0.05, 0.5) * rng.standard_normal(n))
        mu, sd = float(x.mean()), float(x.std() or 1.0)
        chunks.append(((x - mu) / sd).astype(np.float32))
        means.append(mu), stds.append(sd), keys.append(f"synthetic/bench/s{len(keys)}")
        total += n
    packed = assemble_rows(chunks, means, stds, keys, width, shuffle_seed=seed)
    fs = pafs.LocalFileSystem()
    (out / TRAIN_DIR).mkdir(parents=True, exist_ok=True)
    options = OutputConfig()
    n_rows = min(rows, packed.num_rows)
    for i, start in enumerate(range(0, n_rows, rows_per_shard)):
        end = min(start + rows_per_shard, n_rows)
        write_shard(fs, str(out / TRAIN_DIR / SHARD_PATTERN.format(index=i)),
                    rows_table(packed, start, end, window_length), options)
    eff = float(packed.loss_mask_RW[:n_rows].mean())
    info = {"window_length": window_length, "rows": n_rows, "packing_efficiency": eff,
            "series_per_row": float(np.mean([len(s) for s in packed.seg_lengths[:n_rows]]))}
    (out / MANIFEST_FILE).write_text(json.dumps({"benchmark_data": info}))
    return info


# ------------------------------------------------------------------------------------- plans


@dataclass
class RunSpec:
    name: str
    preset: str
    gpus: list[int]
    ep: int = 1
    zero: int = 2
    micro: int = 16  # windows per GPU per step
    steps: int = 14
    activation_checkpointing: bool = False
    overrides: list[str] = field(default_factory=list)
    reuse_export: bool = False  # skip the run if an earlier call on this machine left its final_model


def _r(preset: str, gpus: list[int], ep: int, micro: int, tag: str = "", **kw) -> RunSpec:
    short = {"timemoe-50m": "50m", "timemoe-200m": "200m", "timemoe-ultra": "ultra", "tiny": "tiny"}[preset]
    return RunSpec(f"{short}-g{len(gpus)}-ep{ep}{tag}", preset, gpus, ep, micro=micro, **kw)


ALL8 = list(range(8))
REAL_DATA = "data.path=.gpudata/sweep-1024"
PER_LAYER = "model.overrides.router_aux_loss_scope=per_layer"
GENTLE = ["optim.warmup_steps=50"]  # the 2-step warm-up of the throughput runs spikes the loss
RUNS_DIR = "/tmp/td/runs"  # where benchmarks/gpu_host_runs.sh has `run --out /tmp/td` put each run


def _init(run_name: str) -> str:
    return f"model.init_from={RUNS_DIR}/{run_name}/final_model"


BAL_200M = [REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"]
BAL_ULTRA = [REAL_DATA, PER_LAYER, _init("ultra-g1-ep1-pl"), "optim.lr=1e-4"]
PLANS: dict[str, list[list[RunSpec]]] = {
    # waves: runs inside a wave use disjoint GPUs and run at the same time
    "scaling": [
        [_r("timemoe-200m", [0], 1, 16), _r("timemoe-ultra", [1], 1, 4), _r("timemoe-200m", [2, 3], 1, 16),
         _r("timemoe-200m", [4, 5], 2, 16), _r("timemoe-50m", [6, 7], 2, 16)],
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 16), _r("timemoe-200m", [4, 5, 6, 7], 4, 16)],
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 16), _r("timemoe-50m", [4, 5], 1, 16), _r("timemoe-50m", [6], 1, 16)],
        [_r("timemoe-200m", ALL8, 1, 16)],
        [_r("timemoe-200m", ALL8, 8, 16)],
        [_r("timemoe-200m", ALL8, 2, 16)],
        [_r("timemoe-200m", ALL8, 4, 16)],
    ],
    # the same runs without the 1-GPU baselines (measured before), most wanted first
    "multi": [
        [_r("timemoe-200m", [0, 1], 1, 16), _r("timemoe-200m", [2, 3], 2, 16),
         _r("timemoe-50m", [4, 5], 1, 16), _r("timemoe-50m", [6, 7], 2, 16)],
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 16), _r("timemoe-200m", [4, 5, 6, 7], 4, 16)],
        [_r("timemoe-200m", ALL8, 1, 16)],
        [_r("timemoe-200m", ALL8, 8, 16)],
        [_r("timemoe-ultra", ALL8, 8, 4)],
        [_r("timemoe-ultra", ALL8, 1, 4)],
        [_r("timemoe-200m", ALL8, 2, 16)],
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 16)],
        [_r("timemoe-200m", ALL8, 4, 16)],
    ],
    # what the budget of the "multi" call left out
    "rest": [
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 16, steps=10)],
        [_r("timemoe-200m", ALL8, 2, 16, steps=10)],
        [_r("timemoe-200m", ALL8, 4, 16, steps=10)],
    ],
    "rest4": [  # on a 4-GPU machine: ep = 2 against ep = 1 measured in the same call
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 16, steps=10)],
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 16, steps=10)],
    ],
    # a 4-GPU machine: every ep degree it allows, both presets, the overlapped dispatcher
    "ep4": [
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 16, steps=10)],
        [_r("timemoe-200m", [0, 1, 2, 3], 4, 16, steps=10)],
        [_r("timemoe-ultra", [0, 1, 2, 3], 1, 4, steps=10)],
        [_r("timemoe-ultra", [0, 1, 2, 3], 4, 4, steps=10)],
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 16, steps=10)],
    ],
    # does per-layer routing balance during training? (the spec's aux loss pools all layers)
    # Real series: the packed window-1024 shards of benchmarks/prepare_sweep_data.sh (.gpudata/).
    "routing": [[_r("timemoe-200m", [0], 1, 16, steps=400, overrides=[REAL_DATA]),
                 _r("timemoe-50m", [1], 1, 16, steps=400, overrides=[REAL_DATA]),
                 _r("timemoe-ultra", [2, 3], 1, 8, steps=200, overrides=[REAL_DATA])]],
    # EP on routers trained to balance per layer: train with the per-layer aux loss on real
    # series (exported), then ep = 1 vs 4 starting from those weights (model.init_from)
    "balanced": [
        [_r("timemoe-200m", [0], 1, 16, "-pl", steps=600, overrides=[REAL_DATA, PER_LAYER, "train.export=true"] + GENTLE),
         _r("timemoe-ultra", [1, 2, 3], 1, 8, "-pl", steps=300, overrides=[REAL_DATA, PER_LAYER] + GENTLE)],
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
        [_r("timemoe-200m", [0, 1, 2, 3], 4, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
    ],
    # the same, 200M only, most wanted first (a short device budget)
    "balanced200m": [
        [_r("timemoe-200m", [0], 1, 16, "-pl", steps=600, overrides=[REAL_DATA, PER_LAYER, "train.export=true"] + GENTLE)],
        [_r("timemoe-200m", [0, 1, 2, 3], 4, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
        [_r("timemoe-200m", [0, 1, 2, 3], 1, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
        [_r("timemoe-200m", [0, 1, 2, 3], 2, 64, "-bal", steps=10, overrides=[REAL_DATA, PER_LAYER, _init("200m-g1-ep1-pl"), "optim.lr=1e-4"])],
    ],
    # a 2-GPU machine: EP on balanced routers, ep = 1 vs 2, and the dispatcher pipelined in 2
    # chunks (parallel.ep_chunks). Two calls, each under the 600 s limit; the first
    # also trains ultra's per-layer weights, which the second reuses if the machine is still warm.
    "x2_200m": [
        [_r("timemoe-200m", [0], 1, 16, "-pl", steps=600, overrides=[REAL_DATA, PER_LAYER, "train.export=true"] + GENTLE),
         _r("timemoe-ultra", [1], 1, 8, "-pl", steps=300, reuse_export=True,
            overrides=[REAL_DATA, PER_LAYER, "train.export=true"] + GENTLE)],
        [_r("timemoe-200m", [0, 1], 2, 64, "-bal", steps=10, overrides=BAL_200M)],
        [_r("timemoe-200m", [0, 1], 1, 64, "-bal", steps=10, overrides=BAL_200M)],
        [_r("timemoe-200m", [0, 1], 2, 64, "-bal-c2", steps=10, overrides=BAL_200M + ["parallel.ep_chunks=2"])],
    ],
    "x2_ultra": [
        [_r("timemoe-ultra", [1], 1, 8, "-pl", steps=300, reuse_export=True,
            overrides=[REAL_DATA, PER_LAYER, "train.export=true"] + GENTLE)],
        [_r("timemoe-ultra", [0, 1], 2, 32, "-bal", steps=10, overrides=BAL_ULTRA)],
        [_r("timemoe-ultra", [0, 1], 1, 32, "-bal", steps=10, overrides=BAL_ULTRA)],
        [_r("timemoe-ultra", [0, 1], 2, 32, "-bal-c2", steps=10, overrides=BAL_ULTRA + ["parallel.ep_chunks=2"])],
    ],
    # a 1-GPU host: the 1-GPU baselines of the scaling table on a quiet host (the 8-GPU run had
    # them next to other runs); two groups, each under a 10-minute job limit
    "single_200m": [[_r("timemoe-200m", [0], 1, 16)]],
    "single_rest": [[_r("timemoe-ultra", [0], 1, 4)], [_r("timemoe-50m", [0], 1, 16)]],
    "smoke": [[_r("timemoe-50m", [0, 1], 2, 4, steps=4)]],
    "cpu": [[_r("tiny", [0], 1, 4, steps=6), _r("tiny", [1, 2], 2, 4, steps=6)],
            [_r("tiny", [1, 2], 2, 4, "-c2", steps=6, overrides=["parallel.ep_chunks=2"])]],
}


# ------------------------------------------------------------------------------------- running


def profile_window(spec: RunSpec) -> tuple[int, int]:
    """Two profiled steps, late enough to be steady, early enough to leave steady steps after."""
    first = max(3, spec.steps - 5)
    return first, first + 1


def _command(spec: RunSpec, data: str, out_dir: Path, port: int, cpu: bool) -> list[str]:
    world = len(spec.gpus)
    first, last = profile_window(spec)
    overrides = [
        f"model.preset={spec.preset}", f"data.path={data}", "data.loader=plain", "data.prefetch_batches=4",
        f"parallel.zero_stage={spec.zero}", f"parallel.ep_size={spec.ep}",
        f"parallel.activation_checkpointing={str(spec.activation_checkpointing).lower()}",
        f"parallel.compile={'false' if cpu else 'true'}", f"parallel.precision={'fp32' if cpu else 'bf16'}",
        f"train.max_steps={spec.steps}", f"train.micro_batch_size={spec.micro}",
        f"train.global_batch_size={spec.micro * world}", "train.log_every=1", "train.eval_every=0",
        "train.export=false", "train.checkpoint_at_end=false", f"train.output_dir={out_dir}",
        f"train.profile_steps=[{first},{last}]", "optim.warmup_steps=2",
        f"scaling.num_workers={world}", f"scaling.use_gpu={'false' if cpu else 'true'}", "tracking.enabled=false",
    ] + spec.overrides
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={port}",
            "-m", "pipeline.train.torchrun", "--config", str(REPO / "configs/timemoe-200m.yaml")] + overrides


def summarize_run(spec: RunSpec, out_dir: Path, rc: int, seconds: float, log_tail: str) -> dict:
    from model import TimeMoeConfig
    from model.flops import count_parameters

    row = {**asdict(spec), "world": len(spec.gpus), "rc": rc, "wall_s": seconds}
    metrics = []
    mfile = out_dir / "metrics.jsonl"
    if mfile.exists():
        metrics = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    profiles = [json.loads(p.read_text()) for p in sorted((out_dir / "profile").glob("rank*.json"))]
    prof_steps = set(profile_window(spec))
    # steady state: skip the first steps (compile, warm-up, allocator growth) and the profiled ones
    steady = [m for m in metrics if m["step"] > 3 and m["step"] not in prof_steps]
    if rc != 0 or not steady:
        row["error"] = log_tail[-1500:]
        return row
    pps = [m["points_per_s"] for m in steady]
    row.update(
        steps_measured=len(steady), points_per_s=statistics.median(pps), points_per_s_min=min(pps),
        step_ms=1e3 * statistics.median(m["step_time_s"] for m in steady),
        mfu=statistics.median(m["mfu"] for m in steady) if "mfu" in steady[0] else None,
        peak_mem_gb=max(m.get("peak_mem_gb", 0.0) for m in metrics), final_loss=metrics[-1]["loss"],
        params_total=count_parameters(TimeMoeConfig.preset(spec.preset)).total,
    )
    layer_keys = sorted((k for k in metrics[-1] if k.startswith("expert_imbalance/layer")), key=lambda k: int(k[22:]))
    if layer_keys:  # max/mean tokens per expert (rank 0's tokens): the hot-rank factor at ep = E
        every = max(1, len(metrics) // 20)
        row["expert_imbalance_by_step"] = [
            {"step": m["step"], "mean": statistics.mean(m[k] for k in layer_keys), "max": max(m[k] for k in layer_keys)}
            for m in metrics[::every] + metrics[-1:]]
        row["expert_imbalance_final"] = [metrics[-1][k] for k in layer_keys]
    if profiles:
        row["all_to_all_share"] = statistics.mean(p["all_to_all_share"] for p in profiles)
        cats = sorted({k for p in profiles for k in p["kernel_ms_per_step"]})
        row["kernel_ms_per_step"] = {c: statistics.mean(p["kernel_ms_per_step"].get(c, 0.0) for p in profiles) for c in cats}
        row["profiled_ms_per_step"] = statistics.mean(p["wall_ms_per_step"] for p in profiles)
    return row


def run_wave(wave: list[RunSpec], data: str, out: Path, cpu: bool, timeout: float, log) -> list[dict]:
    procs, rows = [], []
    for i, spec in enumerate(wave):
        run_dir = out / "runs" / spec.name
        if spec.reuse_export and (run_dir / "final_model").is_dir():
            rows.append({**asdict(spec), "world": len(spec.gpus), "skipped": "reused the final_model of an earlier call"})
            log(f"{spec.name:18s} reused {run_dir / 'final_model'}")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        if cpu:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
        logf = open(run_dir / "log.txt", "w")
        cmd = _command(spec, data, run_dir, 29600 + 10 * i, cpu)
        procs.append((spec, run_dir, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                                      cwd=REPO, start_new_session=True), time.time(), logf))
    for spec, run_dir, proc, t0, logf in procs:
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = -9
        logf.close()
        tail = (run_dir / "log.txt").read_text(errors="replace")[-4000:]
        row = summarize_run(spec, run_dir, rc, time.time() - t0, tail)
        rows.append(row)
        log(format_row(row))
    return rows


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:18s} rc={r['rc']} ERROR: {r['error'][-300:]!r}"
    a2a = f"{100 * r['all_to_all_share']:5.1f}%" if r.get("all_to_all_share") is not None else "   -  "
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   -  "
    return (f"{r['name']:18s} {r['world']:3d} {r['ep']:3d} {r['micro']:4d} {r['step_ms']:9.1f} {r['points_per_s']:12,.0f} "
            f"{mfu} {a2a} {r['peak_mem_gb']:8.1f}")


def add_scaling(rows: list[dict]) -> None:
    base = {r["preset"]: r["points_per_s"] for r in rows if "points_per_s" in r and r["world"] == 1}
    for r in rows:
        if "points_per_s" in r and r["preset"] in base:
            r["speedup_vs_1gpu"] = r["points_per_s"] / base[r["preset"]]
            r["scaling_efficiency"] = r["speedup_vs_1gpu"] / r["world"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--rows", type=int, default=512)
    d.add_argument("--window-length", type=int, default=4096)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--plan", nargs="+", default=["scaling"], choices=sorted(PLANS))
    r.add_argument("--out", required=True)
    r.add_argument("--json", default=None, help="results file (default OUT/train_distributed.json)")
    r.add_argument("--wave-timeout", type=float, default=240)
    r.add_argument("--budget", type=float, default=1e9,
                   help="seconds for the whole plan: a wave is cut at the budget, and none starts with < 60 s left")
    r.add_argument("--cpu", action="store_true", help="gloo + tiny preset smoke test")
    r.add_argument("--keep-going", action="store_true", help="go on after a wave whose multi-GPU runs all failed")
    args = ap.parse_args()

    if args.cmd == "data":
        print(json.dumps(make_packed_shards(Path(args.out), args.rows, args.window_length)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "train_distributed.json"
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    meta = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch

        meta.update(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    gpus=torch.cuda.device_count())
    except Exception as err:  # the table is still useful without it
        meta["torch_error"] = str(err)
    rows: list[dict] = []
    log(f"{'run':18s} {'gpu':>3s} {'ep':>3s} {'mb':>4s} {'step ms':>9s} {'points/s':>12s} {'MFU':>6s} {'a2a':>6s} {'peak GB':>8s}")
    for plan in args.plan:
        for wave in PLANS[plan]:
            left = args.budget - (time.time() - t_start)
            if left < 60:
                log(f"budget spent: skipped {[s.name for s in wave]}")
                rows += [{**asdict(s), "world": len(s.gpus), "skipped": "budget"} for s in wave]
                continue
            wave_rows = run_wave(wave, args.data, out, args.cpu, min(args.wave_timeout, left - 5), log)
            rows += wave_rows
            multi = [r for r in wave_rows if r["world"] > 1]
            if multi and all("error" in r for r in multi) and not args.keep_going:
                log("every multi-GPU run of this wave failed: stopping here (see the logs; --keep-going to go on)")
                args.budget = 0
            add_scaling(rows)
            json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    add_scaling(rows)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log("scaling efficiency (points/s on G GPUs / (G x 1 GPU)):")
    for r in rows:
        if "skipped" in r:
            log(f"  {r['name']:18s} not run ({r['skipped']})")
        if "scaling_efficiency" in r:
            log(f"  {r['name']:18s} x{r['speedup_vs_1gpu']:.2f}  eff {100 * r['scaling_efficiency']:.1f}%")


if __name__ == "__main__":
    main()
