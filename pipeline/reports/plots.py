"""The pictures of a training run, from plain records (the loop's ``metrics.jsonl`` and
``expert_load.jsonl``, or MLflow's metric history): loss against training FLOPs, throughput,
expert load per layer over training, and zero-shot MSE beside the baselines.

Each function takes data, returns a matplotlib figure (Agg) and touches no tracking system;
``save`` writes one. Axes are fitted to the data they show (no bar or curve ends on the frame).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: pictures are drawn where no display exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, the last one per ``step`` kept (a resumed run redoes the
    steps after its checkpoint and appends them again), in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    p = Path(path)
    if not p.exists():
        return []
    for line in p.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _si(v: float, _pos: int | None = None) -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def plain_log_labels(axis: Any) -> None:
    """Tick labels of a log axis as 0.2, 0.09 (not 2x10^-1); matplotlib decides from the span
    shown which minor ticks get one, so they do not collide."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLog(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _ema(values: Sequence[float], span: int) -> list[float]:
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def loss_vs_flops(metrics: Sequence[dict[str, Any]]) -> Any:
    """Training loss (per step, faint, and smoothed) and held-out loss against cumulative
    training FLOPs (``train_flops``, from ``model.flops``), both axes logarithmic."""
    plt = pyplot()
    steps = [m for m in metrics if "loss" in m and "train_flops" in m]
    evals = [m for m in metrics if "eval_loss" in m and "train_flops" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        x = [m["train_flops"] for m in steps]
        y = [m["loss"] for m in steps]
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="training loss (per step)")
        ax.plot(x, _ema(y, max(3, len(y) // 20)), color="tab:blue", lw=1.8, label="training loss (smoothed)")
    if evals:
        ax.plot([m["train_flops"] for m in evals], [m["eval_loss"] for m in evals], "o-", color="tab:red",
                ms=4, label="held-out loss")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_labels(ax.yaxis)
    ax.set_xlabel("training FLOPs (model.flops.training_flops_per_point x points seen)")
    ax.set_ylabel("loss")
    ax.set_title("loss against training compute")
    if steps or evals:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def throughput(metrics: Sequence[dict[str, Any]]) -> Any:
    """Points per second and the time blocked on data, per step."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    steps = [m for m in metrics if "points_per_s" in m]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 4.2), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if steps:
        x = [m["step"] for m in steps]
        y = [m["points_per_s"] for m in steps]
        ax.plot(x, y, color="tab:green", alpha=0.3, lw=0.8, label="per step")
        ax.plot(x, _ema(y, max(3, len(y) // 20)), color="tab:green", lw=1.8, label="smoothed")
        ax.set_ylim(0, 1.1 * max(y))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        wait = [m.get("data_wait_ms", 0.0) for m in steps]
        ax2.plot(x, wait, color="tab:purple", lw=1)
        ax2.set_ylim(0, 1.1 * max(max(wait), 1e-3))
    ax.yaxis.set_major_formatter(FuncFormatter(_si))
    ax.set_ylabel("points / s")
    ax.set_title("training throughput")
    ax2.set_ylabel("data wait ms")
    ax2.set_xlabel("step")
    return fig


def expert_load_matrix(records: Sequence[dict[str, Any]]) -> tuple[list[int], Any]:
    """(steps, array [records, layers, experts]) of token shares relative to a balanced
    router: 1.0 = the expert got 1/E of its layer's tokens."""
    import numpy as np

    steps = [int(r["step"]) for r in records]
    counts = np.asarray([r["counts"] for r in records], dtype=np.float64)  # [R, L, E]
    if counts.size == 0:
        return steps, counts
    totals = counts.sum(axis=2, keepdims=True)
    return steps, counts / np.maximum(totals, 1e-12) * counts.shape[2]


def expert_load_heatmap(records: Sequence[dict[str, Any]]) -> Any:
    """One panel per layer: experts (rows) x logged steps (columns), colour = share of the
    layer's tokens relative to a balanced router (white = balanced, red = overloaded)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    plt = pyplot()
    steps, share = expert_load_matrix(records)
    n_layers = share.shape[1] if share.size else 0
    fig, axes = plt.subplots(max(n_layers, 1), 1, figsize=(8, 0.4 + 1.1 * max(n_layers, 1) + 0.05 * (share.shape[2] if share.size else 0) * max(n_layers, 1)),
                             squeeze=False, sharex=True)
    if not n_layers:
        axes[0, 0].text(0.5, 0.5, "no router: a dense model", ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    vmax = max(2.0, float(share.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    image = None
    for layer in range(n_layers):
        ax = axes[layer, 0]
        image = ax.imshow(share[:, layer, :].T, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                          extent=(-0.5, len(steps) - 0.5, share.shape[2] - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        ax.tick_params(labelsize=7)
    ticks = sorted({int(round(i)) for i in np.linspace(0, len(steps) - 1, min(8, len(steps)))}) if steps else []
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([str(steps[i]) for i in ticks])
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load: tokens routed to each expert / balanced share (1 = balanced)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.02, label="load / balanced")
    return fig


def zero_shot_comparison(table: Sequence[dict[str, Any]], model: str) -> Any:
    """Grouped bars of MSE per dataset (average over horizons): the model beside each baseline.
    ``table``: rows with ``dataset``, ``horizon`` and one MSE column per forecaster."""
    import numpy as np

    plt = pyplot()
    avg = [r for r in table if r["horizon"] == "avg"] or list(table)
    names = [k for k in avg[0] if k not in ("dataset", "horizon")] if avg else []
    names = [model] + [n for n in names if n != model]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 1.3 * len(avg)), 3.6))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(avg))
    tallest = 0.0
    # the model in a strong colour, each baseline in its own muted one
    colours = ["tab:blue"] + ["#f5a65b", "#9bc59d", "#b9a3d0", "#c7c7c7", "#e4a3a3"] * 2
    for i, name in enumerate(names):
        vals = [float(r.get(name, math.nan)) for r in avg]
        tallest = max([tallest] + [v for v in vals if math.isfinite(v)])
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name, color=colours[i],
                      edgecolor="k" if name == model else None)
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 1), textcoords="offset points")
    ax.set_ylim(0, 1.15 * max(tallest, 1e-9))  # room for the value labels
    ax.set_xticks(x)
    ax.set_xticklabels([r["dataset"] for r in avg], fontsize=8)
    ax.set_ylabel("MSE (lower is better)")
    ax.set_title("zero-shot MSE: model beside the baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
