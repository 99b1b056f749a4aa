"""Full training-step throughput of Time-MoE on one GPU: our fast path vs a reference-style path.

A step is forward + backward + optimizer on bf16 windows of 4096 points. Variants, all in one
run so the ratios are measured on the same machine:

- ``reference``: the way the released Time-MoE code trains: one series per window (no packing,
  plain causal SDPA, i.e. the flash kernel), experts run by a per-expert Python loop
  (``torch.where`` per expert, host syncs), no compile, AdamW (foreach).
- ``grouped``: packed windows (several series per row, FlexAttention block mask from segment
  ids), experts as grouped GEMMs, no compile, fused AdamW on fp32 master weights.
- ``compiled``: ``grouped`` plus ``torch.compile`` of every decoder layer.
- ``compiled_full``: ``grouped`` plus ``torch.compile`` of the whole forward (embedding, layers,
  heads, loss) as one graph: fewer kernel launches for the same math.
- ``compiled_tiles``: ``compiled`` with FlexAttention's tuned tiles
  (``model.attention.TUNED_FLEX_TILES`` for the preset's head dim), to time them in the whole step.
- ``compiled_cg``: ``compiled`` with ``mode="reduce-overhead"``: each layer's forward and
  backward replayed as CUDA graphs, which removes the per-kernel launch cost from the host.
- ``compiled_fp32``, ``compiled_sdpa``: the paper's precision table on our stack: ``compiled``
  with fp32 weights (fused AdamW on them, no master copy, TF32 off, i.e. true fp32 matmuls) and
  SDPA with a dense segment mask; and with bf16 weights and the same SDPA attention. Against
  ``compiled`` (bf16 + FlexAttention, our fastest attention) they give the paper's rows: fp32,
  bf16, bf16 + fast attention.
- ``released``: the released Time-MoE code itself (``--reference-dir``, made by
  ``benchmarks/released_timemoe.sh``) on our weights: its own forward and loss (one series per
  window), backward, gradient clipping and torch AdamW, as its Hugging Face trainer steps. Its
  recipe uses FlashAttention-2; where ``flash_attn`` is not installed its FlashAttention-2 class
  runs on PyTorch's copy of the same kernels (SDPA's flash backend, ``flash_attention_2/sdpa``;
  without CUDA its eager attention), and the row says which (``attention``).

The released code's full-step rates measured earlier with FlashAttention-2 (``RELEASED_QUOTED``)
are printed beside ours for every (card, preset, windows) they cover, marked "quoted, not
re-measured", whenever the ``released`` row did not run in the same call with that attention.

``--inference`` also times each variant's forward alone (no grad, same batch): the inference
column of the precision table.

Points/s counts window slots (4096 per row); with packing >= 98% efficient those are real points.
MFU = ``model.flops.training_flops_per_point`` x points/s / 989e12 (H100 dense bf16 peak).

    python benchmarks/train_step.py --presets timemoe-50m timemoe-200m --windows 8 16 32 --out results.json \
        --variants released compiled --reference-dir .reference

Needs only torch (no Ray/DeepSpeed/MLflow), so it runs on the bare GPU image.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.released_code import FLASH_VIA_SDPA  # noqa: E402
from model import TimeMoeConfig, TimeMoeModel  # noqa: E402
from model.attention import TUNED_FLEX_TILES, Attention  # noqa: E402
from model.flops import count_parameters, mfu, training_flops_per_point  # noqa: E402
from model.moe import MoeFeedForward  # noqa: E402

# The released code's full step (bf16, 4096-point windows, its trainer path with FlashAttention-2),
# points/s, measured in the training-speed issue: (card, preset, windows) -> points/s
RELEASED_QUOTED = {
    ("H200", "timemoe-50m", 16): 307_848, ("H200", "timemoe-200m", 16): 176_489,
    ("H200", "timemoe-50m", 8): 219_651, ("H200", "timemoe-200m", 8): 148_931,
    ("H100", "timemoe-50m", 16): 210_329, ("H100", "timemoe-200m", 16): 154_196,
}


def card_of(device_name: str) -> str:
    return next((c for c in ("H200", "H100") if c in device_name), device_name)


class ExpertLoopDispatcher:
    """The released code's MoE: a Python loop over experts, ``torch.where`` per expert."""

    def __call__(self, x_TD, topk_idx_TK, topk_weight_TK, experts, concurrent_branch=None):
        y_TD = torch.zeros_like(x_TD)
        for e in range(experts.gate_proj.shape[0]):
            tok, slot = torch.where(topk_idx_TK == e)
            if tok.numel() == 0:  # a host sync per expert, as in the released code
                continue
            x = x_TD[tok]
            h = F.silu(x @ experts.gate_proj[e].T) * (x @ experts.up_proj[e].T)
            out = (h @ experts.down_proj[e].T) * topk_weight_TK[tok, slot, None].to(x.dtype)
            y_TD.index_add_(0, tok, out)
        return y_TD if concurrent_branch is None else y_TD + concurrent_branch()


class MasterWeightAdamW:
    """bf16 model weights with fp32 master copies (what DeepSpeed's bf16 mode does):
    grads are upcast, fused AdamW updates the masters, the bf16 weights are refreshed."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)

    def step(self):
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float() if p.grad is not None else None
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def packed_segment_ids(batch: int, length: int, mean_series: int, generator: torch.Generator) -> torch.Tensor:
    """Rows holding several series of random lengths (a packed shard's shape), fully used."""
    seg = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        cuts = torch.randperm(length - 1, generator=generator)[: max(mean_series - 1, 0)] + 1
        bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([length])])
        for i in range(len(bounds) - 1):
            seg[b, bounds[i] : bounds[i + 1]] = i + 1
    return seg


def make_batch(batch: int, length: int, packed: bool, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length + 1, dtype=torch.float32)
    values = torch.sin(t[None] / (5 + 20 * torch.rand(batch, 1, generator=g))) + 0.3 * torch.randn(batch, length + 1, generator=g)
    inputs, labels = values[:, :-1], values[:, 1:]
    if packed:
        seg = packed_segment_ids(batch, length + 1, 4, g)
        seg_in = seg[:, :-1]
        loss_mask = seg[:, 1:] == seg_in
        return {k: v.to(device) for k, v in dict(inputs=inputs, labels=labels, segment_ids=seg_in, loss_mask=loss_mask).items()}
    return {k: v.to(device) for k, v in dict(inputs=inputs, labels=labels).items()}


class ReleasedStep(torch.nn.Module):
    """The released model's training forward on our batch layout: ``inputs``/``labels`` -> a
    ``.loss`` (its multi-horizon Huber loss plus its router aux loss)."""

    def __init__(self, released: torch.nn.Module) -> None:
        super().__init__()
        self.released = released

    def forward(self, inputs, labels, **_):
        out = self.released(input_ids=inputs.to(torch.bfloat16), labels=labels.to(torch.bfloat16),
                            loss_masks=torch.ones_like(labels, dtype=torch.bfloat16), use_cache=False, return_dict=True)
        return out


def build(preset: str, variant: str, device: str, released_classes=None):
    cfg = TimeMoeConfig.preset(preset)
    if variant == "released":
        from benchmarks.released_code import build_released, released_attention

        torch.manual_seed(0)
        ours = TimeMoeModel(cfg)
        attention = released_attention()
        model = ReleasedStep(build_released(released_classes, ours, torch.bfloat16, device, attention, train=True))
        model.attention = attention
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        return cfg, model, opt
    sdpa = variant in ("reference", "compiled_fp32", "compiled_sdpa") or device == "cpu"
    cfg.attn_implementation = "sdpa" if sdpa else "flex"
    torch.manual_seed(0)
    fp32 = variant == "compiled_fp32"
    model = TimeMoeModel(cfg).to(device=device, dtype=torch.float32 if fp32 else torch.bfloat16)
    if variant == "reference":
        for m in model.modules():
            if isinstance(m, MoeFeedForward):
                m.dispatcher = ExpertLoopDispatcher()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    elif fp32:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    else:
        opt = MasterWeightAdamW(model.parameters())
    if variant == "compiled_tiles":
        for m in model.modules():
            if isinstance(m, Attention):
                m.flex_kernel_options = TUNED_FLEX_TILES.get(m.head_dim)
    if variant in ("compiled", "compiled_tiles", "compiled_cg", "compiled_fp32", "compiled_sdpa"):
        mode = "reduce-overhead" if variant == "compiled_cg" else None
        for layer in model.model.layers:
            layer.compile(dynamic=False, mode=mode)
    elif variant == "compiled_full":  # the whole forward, loss included, as one graph
        model.compile(dynamic=False)
    return cfg, model, opt


def run_variant(preset: str, variant: str, windows: int, length: int, steps: int, warmup: int, device: str,
                released_classes=None, inference: bool = False) -> dict:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 and variant != "compiled_fp32"
    try:
        return _run_variant(preset, variant, windows, length, steps, warmup, device, released_classes, inference)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _run_variant(preset: str, variant: str, windows: int, length: int, steps: int, warmup: int, device: str,
                 released_classes, inference: bool) -> dict:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg, model, opt = build(preset, variant, device, released_classes)
    batch = make_batch(windows, length, packed=variant not in ("reference", "released"), device=device, seed=1)

    def step():
        if variant == "compiled_cg":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay may be overwritten
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return out.loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()  # wall time of a whole step, host syncs included, as a training loop sees it
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    points = windows * length
    pps = points / median
    counts = count_parameters(cfg)
    row = dict(
        preset=preset, variant=variant, windows=windows, window_length=length,
        step_s_median=median, step_s_min=times[0], step_s_max=times[-1], warmup_s=warm_s,
        points_per_s=pps, mfu=mfu(pps, cfg, length),
        flops_per_point=training_flops_per_point(cfg, length),
        params_total=counts.total, params_active=counts.active,
        peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), final_loss=float(loss.detach()),
    )
    if variant == "released":
        row["attention"] = model.attention
    if inference:
        row.update(forward_only(model, batch, variant, steps, warmup, cuda))
    del model, opt, batch
    return row


def forward_only(model, batch: dict, variant: str, steps: int, warmup: int, cuda: bool) -> dict:
    """The same batch through the forward alone (no grad): points/s and peak memory."""
    inputs_only = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    if variant == "released":
        inputs_only = {"inputs": batch["inputs"], "labels": batch["labels"]}  # its forward needs the labels
    del batch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            t = time.perf_counter()
            model(**inputs_only)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    points = inputs_only["inputs"].numel()
    return dict(infer_step_s_median=median, infer_points_per_s=points / median,
                infer_peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


PRECISION_LABELS = {"compiled_fp32": "fp32", "compiled_sdpa": "bf16", "compiled": "bf16 + FlexAttention",
                    "released": "released code"}


def print_precision_table(rows: list[dict]) -> None:
    """The paper's precision table: training and inference points/s and peak memory of each
    precision, and each against fp32 (the paper: bf16 ~12% faster with 20% less memory, bf16 with
    FlashAttention a further 23% in training and 19% in inference)."""
    print(f"\n{'preset':14s} {'precision':22s} {'win':>4s} {'train pts/s':>12s} {'GB':>6s} {'x fp32':>7s} "
          f"{'infer pts/s':>12s} {'GB':>6s} {'x fp32':>7s}")
    ok = [r for r in rows if "error" not in r and "infer_points_per_s" in r]
    for r in ok:
        if r["variant"] not in PRECISION_LABELS:
            continue
        fp32 = next((f for f in ok if f["variant"] == "compiled_fp32" and f["preset"] == r["preset"]
                     and f["windows"] == r["windows"]), None)
        x_train = r["points_per_s"] / fp32["points_per_s"] if fp32 else math.nan
        x_infer = r["infer_points_per_s"] / fp32["infer_points_per_s"] if fp32 else math.nan
        print(f"{r['preset']:14s} {PRECISION_LABELS[r['variant']]:22s} {r['windows']:4d} {r['points_per_s']:12,.0f} "
              f"{r['peak_mem_gb']:6.1f} {x_train:7.2f} {r['infer_points_per_s']:12,.0f} {r['infer_peak_mem_gb']:6.1f} "
              f"{x_infer:7.2f}")


def released_reference(rows: list[dict], card: str) -> dict[tuple[str, int], tuple[float, str]]:
    """Per (preset, windows): the released code's points/s and where it comes from: measured in
    this call with FlashAttention-2 (its recipe), else the quoted figure for this card."""
    ref = {(k[1], k[2]): (v, f"quoted ({card}, not re-measured)") for k, v in RELEASED_QUOTED.items() if k[0] == card}
    for r in rows:
        if r.get("variant") == "released" and "error" not in r and r.get("attention") in ("flash_attention_2",
                                                                                           FLASH_VIA_SDPA):
            ref[(r["preset"], r["windows"])] = (r["points_per_s"], "measured in this call")
    return ref


def write_rows(out: str, rows: list[dict], device: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(meta=dict(device=name, partial=True, argv=sys.argv), rows=rows), indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["timemoe-50m", "timemoe-200m"])
    ap.add_argument("--variants", nargs="+", default=["reference", "grouped", "compiled"])
    ap.add_argument("--windows", type=int, nargs="+", default=[8], help="windows (rows) per step; each is measured")
    ap.add_argument("--windows-per-preset", nargs="*", default=[], help="overrides like timemoe-ultra=2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reference-dir", default=None, help="folder made by benchmarks/released_timemoe.sh")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script")
    ap.add_argument("--inference", action="store_true", help="also time the forward alone (precision table)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step.py needs a CUDA GPU (or --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    released_classes, released_error = None, None
    if "released" in args.variants:
        try:
            from benchmarks.released_code import import_released

            if not args.reference_dir:
                raise FileNotFoundError("--reference-dir not given")
            released_classes = import_released(Path(args.reference_dir).resolve())
        except Exception as exc:  # the quoted figures stand in for it
            released_error = f"released code cannot run: {type(exc).__name__}: {exc}"[:300]
            print(released_error, flush=True)
    per_preset = dict(item.split("=") for item in args.windows_per_preset)
    rows = []
    for preset in args.presets:
        for windows in ([int(per_preset[preset])] if preset in per_preset else args.windows):
            for variant in args.variants:
                if variant == "released" and released_classes is None:
                    row = dict(preset=preset, variant=variant, windows=windows, error=released_error)
                else:
                    try:
                        row = run_variant(preset, variant, windows, args.length, args.steps, args.warmup, args.device,
                                          released_classes, args.inference)
                    except torch.OutOfMemoryError as exc:
                        row = dict(preset=preset, variant=variant, windows=windows, error=f"OOM: {exc}"[:300])
                    except Exception as exc:  # keep the other variants' numbers
                        row = dict(preset=preset, variant=variant, windows=windows,
                                   error=f"{type(exc).__name__}: {exc}"[:500])
                    if "error" in row and args.device == "cuda":
                        gc.collect()  # what the failed variant's frames held, before the next one builds
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_rows(args.out, rows, args.device)  # a run cut short keeps what it measured
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    card = card_of(device_name)
    released = released_reference(rows, card)
    ref = {(r["preset"], r["windows"]): r for r in rows if r.get("variant") == "reference" and "error" not in r}
    print(f"\n{'preset':14s} {'variant':16s} {'win':>4s} {'step ms':>9s} {'points/s':>11s} {'MFU':>6s} {'peak GB':>8s} "
          f"{'x ref':>6s} {'x released':>10s}  released from")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:14s} {r['variant']:16s} {r['windows']:4d}  ERROR {r['error'][:80]}")
            continue
        base = ref.get((r["preset"], r["windows"]))
        ratio = r["points_per_s"] / base["points_per_s"] if base else math.nan
        rel, source = released.get((r["preset"], r["windows"]), (math.nan, "-"))
        label = r["variant"] if r["variant"] != "released" else f"released/{r['attention']}"
        print(f"{r['preset']:14s} {label:16s} {r['windows']:4d} {1e3 * r['step_s_median']:9.1f} "
              f"{r['points_per_s']:11,.0f} {100 * r['mfu']:5.1f}% {r['peak_mem_gb']:8.1f} {ratio:6.2f} "
              f"{r['points_per_s'] / rel:10.2f}  {source}")
    for (preset, windows), (pps, source) in sorted(released.items()):
        if not any(r.get("preset") == preset and r.get("windows") == windows for r in rows if "error" not in r):
            continue
        if source.startswith("quoted"):
            print(f"{preset:14s} {'released':16s} {windows:4d} {'':>9s} {pps:11,.0f}  FlashAttention-2, {source}")
    if args.inference:
        print_precision_table(rows)
    meta = dict(device=device_name, card=card, torch=torch.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), argv=sys.argv, released_error=released_error,
                released_reference={f"{p}/{w}": dict(points_per_s=v, source=src) for (p, w), (v, src) in released.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
