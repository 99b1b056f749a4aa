"""Zero-shot evaluation speed on CPU: the paper's protocol on one benchmark at one horizon,
for the baselines and a randomly initialised model preset (speed only; the weights are random).

    .venv/bin/python benchmarks/evaluate_cpu.py --benchmarks ../shared/data/benchmarks \\
        --dataset ETTh1 --horizon 96 --stride 1 --preset tiny --batch-size 256

Prints a table and writes ``benchmarks/results/evaluate_cpu.json``: windows, wall seconds and
windows/s per forecaster, plus the projected time of the full stride-1 run when ``--stride`` > 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--benchmarks", required=True)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--preset", default="tiny", help="model preset; 'none' to time baselines only")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "evaluate_cpu.json"))
    args = p.parse_args(argv)

    import torch

    from pipeline.evaluation.baselines import LastValue, SeasonalNaive, TrainMean
    from pipeline.evaluation.benchmark_data import load_benchmark, split_borders
    from pipeline.evaluation.protocol import EvalConfig, evaluate, window_starts

    torch.set_num_threads(args.threads)
    cfg = EvalConfig(datasets=[args.dataset], horizons=[args.horizon], context=args.context,
                     stride=args.stride, batch_size=args.batch_size)
    forecasters: dict = {"naive": LastValue(), "seasonal_naive": SeasonalNaive(), "mean": TrainMean()}
    if args.preset != "none":
        from model import TimeMoeConfig, TimeMoeModel

        torch.manual_seed(0)
        m = TimeMoeModel(TimeMoeConfig.preset(args.preset)).eval()
        m.name = f"{args.preset} (random init)"
        forecasters[m.name] = m
    ds = load_benchmark(args.benchmarks, args.dataset)
    full = len(window_starts(split_borders(ds.name, ds.num_rows).test, args.horizon)) * ds.values_TC.shape[1]
    rows = []
    for name, f in forecasters.items():
        t0 = time.perf_counter()
        r = evaluate(f, args.benchmarks, cfg, model_name=name).rows[0]
        wall = time.perf_counter() - t0
        rows.append({"forecaster": name, "windows": r.windows, "seconds": round(wall, 3),
                     "windows_per_s": round(r.windows / wall, 1),
                     "projected_stride1_s": round(wall * full / r.windows, 1), "mse": r.mse, "mae": r.mae})
    print(f"\n{args.dataset} H={args.horizon} ctx={cfg.context_for(args.horizon)} stride={args.stride} "
          f"batch={args.batch_size} threads={args.threads}")
    print(f"{'forecaster':<26}{'windows':>9}{'sec':>9}{'win/s':>10}{'stride-1 s':>12}{'MSE':>9}{'MAE':>9}")
    for r in rows:
        print(f"{r['forecaster']:<26}{r['windows']:>9}{r['seconds']:>9.2f}{r['windows_per_s']:>10.0f}"
              f"{r['projected_stride1_s']:>12.1f}{r['mse']:>9.4f}{r['mae']:>9.4f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "config": vars(args), "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
