"""Interim demo: train the ``tiny`` Time-MoE on synthetic series on CPU, then forecast.

    python -m jobs.demo                       # ~1 minute on 2 CPU cores
    python -m jobs.demo --steps 100 --out outputs/demo

Synthetic series (deterministic seed): a random mix of seasonalities, trend and noise. The job
prints a step log (step, loss, points/s), a forecast vs the truth of a held-out series (never
trained on), and writes ``forecast.png``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from model import TimeMoeConfig, TimeMoeModel


def synthetic_series(rng: np.random.Generator, length: int) -> np.ndarray:
    """Seasonal (1-2 periods) + linear trend + AR(1)-ish noise, random level and scale."""
    t = np.arange(length)
    y = np.zeros(length)
    for _ in range(rng.integers(1, 3)):
        period = rng.choice([12, 24, 48, 96, 168]) * rng.uniform(0.8, 1.2)
        y += rng.uniform(0.5, 2.0) * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi))
    y += rng.uniform(-3, 3) * t / length
    y += 0.15 * np.convolve(rng.standard_normal(length), [1.0, 0.5, 0.25], mode="same")
    return rng.uniform(-10, 10) + rng.uniform(0.5, 5) * y


def make_windows(rng: np.random.Generator, n: int, window: int) -> np.ndarray:
    """``n`` windows of ``window + 1`` points, each z-scored (as the pretraining data is)."""
    w = np.stack([synthetic_series(rng, window + 1) for _ in range(n)])
    return ((w - w.mean(1, keepdims=True)) / w.std(1, keepdims=True)).astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--horizon", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = TimeMoeConfig.preset("tiny")
    model = TimeMoeModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] tiny Time-MoE: {n_params/1e3:.0f}k params, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}, heads {list(cfg.horizon_lengths)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))

    losses, t0, t_log, pts = [], time.perf_counter(), time.perf_counter(), 0
    model.train()
    for step in range(1, args.steps + 1):
        w = torch.from_numpy(make_windows(rng, args.batch, args.window))
        out = model(w[:, :-1], labels=w[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        pts += args.batch * args.window
        if step % 25 == 0 or step == 1:
            now = time.perf_counter()
            print(f"[demo] step {step:4d}/{args.steps} | loss {np.mean(losses[-25:]):.4f} | "
                  f"aux {out.aux_loss.item():.3f} | {pts / (now - t_log):,.0f} points/s", flush=True)
            t_log, pts = now, 0
    train_s = time.perf_counter() - t0

    # held-out series: a different seed stream, never seen in training
    model.eval()
    test_rng = np.random.default_rng(10_000 + args.seed)
    series = synthetic_series(test_rng, 512 + args.horizon)
    context, truth = series[:512], series[512:]
    pred = model.forecast([context], args.horizon)[0]
    naive = np.full(args.horizon, context[-1])
    mse, mse_naive = float(np.mean((pred - truth) ** 2)), float(np.mean((naive - truth) ** 2))
    print(f"[demo] trained {args.steps} steps in {train_s:.1f}s; loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    print(f"[demo] held-out forecast, horizon {args.horizon}: MSE {mse:.4f} (last-value baseline {mse_naive:.4f})")
    print("[demo]   t  truth   forecast")
    for i in range(0, args.horizon, max(1, args.horizon // 8)):
        print(f"[demo] {i:3d} {truth[i]:7.3f} {pred[i]:9.3f}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    tc = np.arange(len(context))
    th = np.arange(len(context), len(series))
    ax.plot(tc[-192:], context[-192:], color="0.3", label="context")
    ax.plot(th, truth, color="tab:green", label="truth")
    ax.plot(th, pred, color="tab:red", label=f"tiny Time-MoE (MSE {mse:.3f})")
    ax.axvline(len(context), color="0.6", ls="--")
    ax.set_title(f"held-out synthetic series after {args.steps} CPU steps")
    ax.legend(loc="upper left")
    fig.tight_layout()
    png = out_dir / "forecast.png"
    fig.savefig(png, dpi=100)
    print(f"[demo] wrote {png}")
    return {"losses": losses, "mse": mse, "mse_naive": mse_naive, "png": str(png)}


if __name__ == "__main__":
    main()
