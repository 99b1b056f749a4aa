"""Per-layer routing balance during training, from ``train_distributed.py`` results: the mean
over layers of (tokens of the busiest expert / mean tokens per expert) per step. 4.0 = every
token of a layer goes to the same 2 of 8 experts; 1.0 = perfectly balanced. At ep = 8 (one
expert per GPU) this is how much more expert work the busiest GPU does than the average.

    python benchmarks/plot_routing.py OUT.png RESULTS.json [RESULTS.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = Path(sys.argv[1]), sys.argv[2:]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for f in files:
        for row in json.loads(Path(f).read_text())["rows"]:
            traj = row.get("expert_imbalance_by_step")
            if not traj or row.get("steps", 0) < 100:
                continue
            scope = "per-layer aux loss" if any("per_layer" in o for o in row.get("overrides", [])) else "pooled aux loss (spec)"
            style = "-" if "per-layer" in scope else "--"
            ax.plot([p["step"] for p in traj], [p["mean"] for p in traj], style, marker="o", ms=3,
                    label=f"{row['preset']}, {scope}, {row['steps']}-step run")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("busiest expert / mean (mean over layers)")
    ax.set_ylim(0.8, 4.2)
    ax.set_title("Per-layer expert load while training on real series (H200, window 1024)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
