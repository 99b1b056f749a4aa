"""FlexAttention's tile settings at the training step's shapes: forward + backward time of the
segment-causal attention over packed rows, for the default kernel options, a few fixed tilings,
the mask-property flags, and inductor's own autotuning (``max-autotune``), each checked against
the default's output and gradients.

    python3 benchmarks/flex_tiles.py --json OUT.json [--presets timemoe-50m timemoe-200m] [--windows 16]

Rows that differ from the default by more than bf16 rounding are flagged, not dropped. Only the
attention call is timed (q, k, v as the layer makes them, the block mask built once), so the gain
of a row is an upper bound of its gain in the full step. CUDA only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import packed_segment_ids  # noqa: E402

from model import TimeMoeConfig  # noqa: E402
from model.attention import TUNED_FLEX_TILES, flex_block_mask  # noqa: E402

# name -> (kernel_options, compile mode); the tilings are the ones Triton's flex templates list
# for head dims <= 64 on Hopper; the mask flags rows show what skipping the kernel's safety checks
# would save, and whether its output still matches (the flags' premises must hold for the mask).
# ROWS_GUARANTEED_SAFE holds (every query sees at least itself). BLOCKS_ARE_CONTIGUOUS does not:
# a query block that starts inside a series has two partial key blocks (the series' first and
# the diagonal) with full blocks between them (``mask_premises`` counts them).
SETTINGS: dict[str, tuple[dict, str | None]] = {
    "default": ({}, None),
    "mask-flags": ({"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}, None),
    "rows-safe": ({"ROWS_GUARANTEED_SAFE": True}, None),
    "fwd-128x64-w4-s3": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}, None),
    "fwd-128x128-w8-s2": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}, None),
    "bwd-64x128-w8-s3": ({"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                          "bwd_num_warps": 8, "bwd_num_stages": 3}, None),
    "bwd-32x64-w4-s3": ({"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                         "bwd_num_warps": 4, "bwd_num_stages": 3}, None),
    "max-autotune": ({}, "max-autotune-no-cudagraphs"),
    "tuned": ({}, None),  # the model's TUNED_FLEX_TILES for the preset's head dim (filled in run_preset)
}


def mask_premises(block_mask) -> dict[str, float]:
    """Share of query blocks whose partial (masked) key blocks are not one contiguous run, and
    the same for full blocks: BLOCKS_ARE_CONTIGUOUS assumes both are 0."""
    def share(num_BHQ: torch.Tensor, idx_BHQK: torch.Tensor) -> float:
        n = num_BHQ[:, 0].reshape(-1).tolist()
        idx = idx_BHQK[:, 0].reshape(len(n), -1)
        broken = sum(1 for i, k in enumerate(n) if k > 1 and int(idx[i, :k].max() - idx[i, :k].min()) + 1 != k)
        return broken / max(len(n), 1)

    return {"partial_kv_not_contiguous": share(block_mask.kv_num_blocks, block_mask.kv_indices),
            "full_kv_not_contiguous": share(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)}


def time_attention(fn, q, k, v, grad, block_mask, iters: int) -> tuple[float, list[torch.Tensor]]:
    """Median ms of forward + backward, and the output with the q/k/v gradients of the last run."""
    times = []
    for _ in range(iters + 2):
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(q, k, v, block_mask)
        out.backward(grad)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return 1e3 * times[len(times) // 2], [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]


def run_preset(preset: str, windows: int, length: int, iters: int, settings: list[str], deadline: float) -> list[dict]:
    cfg = TimeMoeConfig.preset(preset)
    H, hd = cfg.num_attention_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    seg = packed_segment_ids(windows, length, 4, g).cuda()
    block_mask = flex_block_mask(seg, seg)
    premises = mask_premises(block_mask)
    q, k, v = (torch.randn(windows, H, length, hd, generator=g).cuda().bfloat16().requires_grad_(True) for _ in range(3))
    grad = torch.randn(windows, H, length, hd, generator=g).cuda().bfloat16()
    rows, reference = [], None
    for name in settings:
        if time.time() > deadline:
            rows.append(dict(preset=preset, setting=name, error="not run: budget"))
            continue
        options, mode = SETTINGS[name]
        if name == "tuned":
            options = TUNED_FLEX_TILES.get(hd, {})
        compiled = torch.compile(flex_attention, dynamic=False, mode=mode)

        def call(q, k, v, bm, compiled=compiled, options=options):
            return compiled(q, k, v, block_mask=bm, kernel_options=options or None)

        t0 = time.time()
        try:
            ms, outs = time_attention(call, q, k, v, grad, block_mask, iters)
        except Exception as e:  # a tiling the card cannot hold (shared memory) fails here
            rows.append(dict(preset=preset, setting=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        if reference is None:
            reference = (ms, outs)
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(outs, reference[1])]
        rows.append(dict(preset=preset, setting=name, options=options, mode=mode, ms=ms, mask_premises=premises,
                         x_default=reference[0] / ms, max_abs_diff=max(diffs),
                         matches=max(diffs) <= 0.05, first_call_s=time.time() - t0, heads=H, head_dim=hd,
                         windows=windows, length=length))
        torch._dynamo.reset()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["timemoe-50m", "timemoe-200m"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--budget-s", type=float, default=300.0, help="settings not started after this are listed as such")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flex_tiles.py times CUDA kernels: no CUDA device is visible")
    deadline = time.time() + args.budget_s
    rows = []
    for preset in args.presets:
        rows += run_preset(preset, args.windows, args.length, args.iters, args.settings, deadline)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.windows} x {args.length}, bf16, fwd+bwd")
    print(f"{'preset':<14} {'setting':<20} {'ms':>8} {'x default':>9} {'max|diff|':>10} {'first call s':>12}")
    for preset in args.presets:
        premises = next((r["mask_premises"] for r in rows if r["preset"] == preset and "mask_premises" in r), None)
        if premises:
            print(f"{preset}: query blocks whose partial key blocks are not contiguous: "
                  f"{100 * premises['partial_kv_not_contiguous']:.0f}% (BLOCKS_ARE_CONTIGUOUS assumes 0%)")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<14} {r['setting']:<20} {r['error']}")
            continue
        flag = "" if r["matches"] else "  DIFFERS"
        print(f"{r['preset']:<14} {r['setting']:<20} {r['ms']:>8.2f} {r['x_default']:>9.3f} {r['max_abs_diff']:>10.4f} "
              f"{r['first_call_s']:>12.1f}{flag}")
    args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
