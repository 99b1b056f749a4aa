"""CPU time per training step of the `tiny` preset on 2 gloo processes, ZeRO-1/2/3 and EP 1/2,
through the real loop (torchrun runtime, plain reader); also draws the ZeRO-1 loss curve.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_cpu.py --steps 30 --json benchmarks/train_cpu.json

Time per step is the median of ``step_time_s`` over the steps after the first two (warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._train_helpers import run_ranks, tiny_config, torchrun_worker, write_shards  # noqa: E402

CASES = [("zero1", 1, 1), ("zero2", 2, 1), ("zero3", 3, 1), ("zero1-ep2", 1, 2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--json", default="benchmarks/train_cpu.json")
    p.add_argument("--png", default="docs/img/tiny_loss.png")
    p.add_argument("--cases", default=",".join(c[0] for c in CASES))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train_cpu-"))
    data = write_shards(tmp / "data", window_length=args.window, train_rows=512, val_rows=32, rows_per_shard=64)
    cfgs, names = [], []
    for name, stage, ep in CASES:
        if name not in args.cases.split(","):
            continue
        names.append(name)
        cfgs.append(tiny_config(data, tmp / name, parallel={"zero_stage": stage, "ep_size": ep},
                                optim={"warmup_steps": 5}, train={"max_steps": args.steps, "log_every": 10}))
    results = run_ranks(torchrun_worker, tmp / "results", 2, cfgs)[0]
    rows = []
    for name, res in zip(names, results):
        hist = [h for h in res["history"] if "loss" in h]
        step_s = statistics.median(h["step_time_s"] for h in hist[2:])
        rows.append({"case": name, "workers": 2, "window": args.window, "global_batch_windows": 8,
                     "step_s": step_s, "points_per_s": 8 * args.window / step_s,
                     "data_wait_ms": statistics.median(h["data_wait_ms"] for h in hist[2:]),
                     "final_loss": hist[-1]["loss"], "losses": [h["loss"] for h in hist]})
    print(f"{'case':<12}{'step ms':>10}{'points/s':>12}{'wait ms':>10}{'final loss':>12}")
    for r in rows:
        print(f"{r['case']:<12}{r['step_s'] * 1e3:>10.1f}{r['points_per_s']:>12.0f}{r['data_wait_ms']:>10.2f}{r['final_loss']:>12.4f}")
    Path(args.json).write_text(json.dumps(rows, indent=2))
    if rows and args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in rows:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["case"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (heads + 0.02 aux)")
        ax.set_title(f"tiny preset, CPU, 2 gloo workers, 8 x {args.window}-point windows/step")
        ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
