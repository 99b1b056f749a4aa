"""Where a training step's GPU time goes: phase timings (forward / backward / optimizer) and the
top kernels from torch.profiler, for one preset and variant of ``benchmarks/train_step.py``.

    python benchmarks/profile_step.py --preset timemoe-50m --variant compiled --windows 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import build, make_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="timemoe-50m")
    ap.add_argument("--variant", default="compiled")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=35)
    ap.add_argument("--stack", action="store_true", help="group kernels by Python call site")
    args = ap.parse_args()
    cfg, model, opt = build(args.preset, args.variant, "cuda")
    batch = make_batch(args.windows, args.length, packed=args.variant != "reference", device="cuda", seed=1)
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731

    def step(times=None):
        e = [ev() for _ in range(4)]
        e[0].record()
        out = model(**batch)
        e[1].record()
        out.loss.backward()
        e[2].record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        e[3].record()
        torch.cuda.synchronize()
        if times is not None:
            times.append([e[i].elapsed_time(e[i + 1]) for i in range(3)])

    for _ in range(4):
        step()
    times = []
    for _ in range(5):
        step(times)
    med = sorted(times, key=sum)[len(times) // 2]
    print(f"phases ms: forward {med[0]:.1f}  backward {med[1]:.1f}  clip+optimizer {med[2]:.1f}  total {sum(med):.1f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU],
                                with_stack=args.stack) as prof:
        for _ in range(2):
            step()
    if args.stack:
        print(prof.key_averages(group_by_stack_n=6).table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                          max_name_column_width=60))
    else:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
