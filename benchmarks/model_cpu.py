"""CPU timings of the ``tiny`` Time-MoE: forward, forward+backward (training step without the
optimizer) and ``generate``, at a few window lengths, fp32.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/model_cpu.py [--repeats 5] [--threads 2]

Prints a table and writes ``benchmarks/results/model_cpu.json``. Each number is the median of
``--repeats`` timed runs after one warm-up. Points/s counts input points (batch x window).
On a shared machine the spread is large: the JSON keeps min and median.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import TimeMoeConfig, TimeMoeModel  # noqa: E402
from model.flops import training_flops_per_point  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/model_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TimeMoeConfig.preset("tiny")
    model = TimeMoeModel(cfg)
    rows = []
    for L in args.windows:
        x = torch.randn(args.batch, L)
        y = torch.randn(args.batch, L)
        seg = torch.arange(L).div(L // 4, rounding_mode="floor").add(1).expand(args.batch, L)  # 4 series per row

        def fwd():
            with torch.no_grad():
                model(x, labels=y)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(x, labels=y).loss.backward()

        def fwd_bwd_packed():
            model.zero_grad(set_to_none=True)
            model(x, segment_ids=seg, labels=y).loss.backward()

        for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd), ("forward+backward packed(4)", fwd_bwd_packed)):
            t = timed(fn, args.repeats)
            med = statistics.median(t)
            rows.append({"op": name, "window": L, "batch": args.batch, "median_s": med, "min_s": min(t),
                         "points_per_s": args.batch * L / med,
                         "gflops_per_s": (training_flops_per_point(cfg, L) * args.batch * L / med / 1e9) if "backward" in name else None})
    model.eval()
    for ctx, horizon in ((512, 96), (2048, 336)):
        x = torch.randn(args.batch, ctx)
        for cache in (True, False):
            t = timed(lambda: model.generate(x, horizon, use_cache=cache), max(1, args.repeats // 2))
            med = statistics.median(t)
            rows.append({"op": f"generate {'kv-cache' if cache else 'no-cache'} h={horizon}", "window": ctx,
                         "batch": args.batch, "median_s": med, "min_s": min(t),
                         "points_per_s": args.batch * horizon / med, "gflops_per_s": None})

    print(f"tiny Time-MoE on CPU ({args.threads} threads, fp32, torch {torch.__version__})")
    print(f"{'op':<34}{'window':>8}{'batch':>7}{'median s':>11}{'points/s':>12}{'GFLOP/s':>10}")
    for r in rows:
        gf = f"{r['gflops_per_s']:.2f}" if r["gflops_per_s"] else "-"
        print(f"{r['op']:<34}{r['window']:>8}{r['batch']:>7}{r['median_s']:>11.4f}{r['points_per_s']:>12,.0f}{gf:>10}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "model_cpu", "preset": "tiny", "torch": torch.__version__, "threads": args.threads,
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "note": "points/s for generate = forecast points per second", "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
