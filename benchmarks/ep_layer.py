"""One MoE layer, forward + backward, data parallel (ep = 1) vs expert parallel (ep = 2, 4, ...),
on NCCL, under two routing regimes. Isolates what the dispatcher costs from everything else in a
training step (no DeepSpeed, no attention, no optimizer).

    torchrun --nproc-per-node 4 benchmarks/ep_layer.py --out ep_layer.json

Routing regimes (the router is bypassed; the expert ids are prescribed):

- ``balanced``: copy k of token t goes to expert (t*K + k) mod E: every expert, hence every EP
  rank, gets the same number of rows. What a perfectly load-balanced router gives.
- ``collapsed``: every token picks experts 0 and 1. What a Time-MoE layer does at
  initialisation (measured: every layer of an untrained 200M model sends all tokens to the same
  two experts), and what the pooled aux loss of the spec allows to persist per layer.

Dispatchers: ``serial`` runs the shared expert after the combine, ``overlap-fwd`` during the
forward row exchange, ``overlap`` (the default) also runs its backward during the backward
exchange of the row gradients, ``overlap-cN`` additionally pipelines the layer in N chunks of
tokens (``parallel.ep_chunks``).

Per (preset, regime, ep, dispatcher) it prints the slowest rank's median ms per layer step and
the slowdown against ep = 1, checks the EP output and input gradient against ep = 1 on the same
tokens (bf16 tolerance), and measures the plain all-to-all bandwidth for the same row count.
Needs CUDA and >= 2 GPUs; with ``--cpu`` it runs on gloo as a smoke test (no timing value).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
# (name, overlap, overlap_backward, chunks): where the shared expert runs relative to the row
# exchange, and how many token chunks the layer is pipelined in
DISPATCHERS = (("serial", False, False, 1), ("overlap-fwd", True, False, 1), ("overlap", True, True, 1),
               ("overlap-c2", True, True, 2), ("overlap-c4", True, True, 4))
sys.path.insert(0, str(REPO))

from model import TimeMoeConfig  # noqa: E402
from model.moe import LocalDispatcher, MoeFeedForward  # noqa: E402
from pipeline.ep_dispatch import AllToAllDispatcher  # noqa: E402


def prescribed_routing(regime: str, tokens: int, k: int, num_experts: int, offset: int, device) -> torch.Tensor:
    if regime == "balanced":
        t = torch.arange(offset, offset + tokens, device=device)[:, None]
        return (t * k + torch.arange(k, device=device)[None]) % num_experts
    if regime == "collapsed":
        return torch.arange(k, device=device).expand(tokens, k).contiguous()
    raise ValueError(f"unknown routing regime {regime!r}")


def make_layer(preset: str, dtype, device) -> MoeFeedForward:
    torch.manual_seed(0)  # same weights on every rank
    layer = MoeFeedForward(TimeMoeConfig.preset(preset))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return layer.to(device=device, dtype=dtype)


def shard_experts(layer: MoeFeedForward, ep_rank: int, ep: int) -> None:
    n = layer.experts.gate_proj.shape[0] // ep
    for w in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(layer.experts, w)
        setattr(layer.experts, w, torch.nn.Parameter(full.detach()[ep_rank * n:(ep_rank + 1) * n].clone()))


def step_fn(layer: MoeFeedForward, dispatcher, x_TD, idx_TK, w_TK, probe_TD):
    def shared() -> torch.Tensor:
        return torch.sigmoid(layer.shared_expert_gate(x_TD)) * layer.shared_expert(x_TD)

    y = dispatcher(x_TD, idx_TK, w_TK, layer.experts, shared)
    (y.float() * probe_TD).sum().backward()
    return y


def timed(fn, iters: int, warmup: int, cuda: bool, group=None) -> float:
    """Slowest rank's median milliseconds per call."""
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return float(med.item())


def bandwidth_gbps(rows: int, dim: int, dtype, device, cuda: bool, iters: int) -> float:
    """Bus bandwidth of a balanced all_to_all_single of ``rows`` rows per rank (GB/s per rank,
    counting only the bytes that leave the rank)."""
    world = dist.get_world_size()
    x = torch.randn(rows, dim, device=device).to(dtype)
    out = torch.empty_like(x)
    ms = timed(lambda: dist.all_to_all_single(out, x), iters, 3, cuda)
    return x.numel() * x.element_size() * (world - 1) / world / (ms / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["timemoe-200m:16", "timemoe-ultra:4"],
                    help="preset:windows_per_gpu (tokens per rank = windows x window length)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--regimes", nargs="+", default=["balanced", "collapsed"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default="ep_layer.json")
    a = ap.parse_args()

    cuda = not a.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    ep_sizes = [e for e in (2, 4, 8) if e <= world and world % e == 0]
    groups = {}
    for ep in ep_sizes:  # every rank must create every group, in the same order
        for start in range(0, world, ep):
            g = dist.new_group(list(range(start, start + ep)))
            if start <= rank < start + ep:
                groups[ep] = g

    rows_out = []

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    log(f"{'preset':14s} {'regime':9s} {'ep':>3s} {'dispatch':10s} {'ms/layer':>9s} {'vs ep1':>7s} {'hot rows':>9s} {'max rel err':>11s}")
    for spec in a.presets:
        preset, windows = spec.split(":")
        tokens = int(windows) * a.window
        cfg = TimeMoeConfig.preset(preset)
        E, K, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
        gen = torch.Generator(device=device).manual_seed(1234)
        # every rank draws all ranks' tokens (same seed), so any rank can compute a reference
        x_all = torch.randn(world * tokens, D, device=device, generator=gen).to(dtype)
        w_all = torch.rand(world * tokens, K, device=device, generator=gen)
        probe_all = torch.randn(world * tokens, D, device=device, generator=gen)
        mine = slice(rank * tokens, (rank + 1) * tokens)
        for regime in a.regimes:
            idx_all = prescribed_routing(regime, world * tokens, K, E, 0, device)
            full = make_layer(preset, dtype, device)
            x = x_all[mine].clone().requires_grad_()
            w = w_all[mine].clone().requires_grad_()
            ref_y = step_fn(full, LocalDispatcher(), x, idx_all[mine], w, probe_all[mine]).detach()
            ref_gx = x.grad.detach().clone()

            def run_local():
                x.grad = None
                step_fn(full, LocalDispatcher(), x, idx_all[mine], w, probe_all[mine])

            base_ms = timed(run_local, a.iters, 3, cuda)
            row = dict(preset=preset, tokens_per_rank=tokens, regime=regime, ep=1, dispatcher="local",
                       ms=base_ms, slowdown=1.0, rows_received_max=tokens * K, max_rel_err=0.0)
            rows_out.append(row)
            log(f"{preset:14s} {regime:9s} {1:3d} {'local':10s} {base_ms:9.2f} {1.0:7.2f} {tokens * K:9d} {0.0:11.2e}")
            for ep in ep_sizes:
                group = groups[ep]
                ep_rank = dist.get_rank(group)
                for name, overlap, overlap_bwd, chunks in DISPATCHERS:
                    layer = make_layer(preset, dtype, device)
                    shard_experts(layer, ep_rank, ep)
                    disp = AllToAllDispatcher(group, ep, E, overlap=overlap, overlap_backward=overlap_bwd,
                                              chunks=chunks)
                    x.grad = None
                    y = step_fn(layer, disp, x, idx_all[mine], w, probe_all[mine]).detach()
                    scale_y = ref_y.float().abs().max().clamp_min(1e-6)
                    err = max(float((y.float() - ref_y.float()).abs().max() / scale_y),
                              float((x.grad.float() - ref_gx.float()).abs().max() / ref_gx.float().abs().max().clamp_min(1e-6)))

                    def run_ep():
                        x.grad = None
                        step_fn(layer, disp, x, idx_all[mine], w, probe_all[mine])

                    ms = timed(run_ep, a.iters, 3, cuda)
                    hot = torch.tensor([disp.last_rows_received], device=device)
                    dist.all_reduce(hot, op=dist.ReduceOp.MAX)
                    errt = torch.tensor([err], device=device, dtype=torch.float64)
                    dist.all_reduce(errt, op=dist.ReduceOp.MAX)
                    row = dict(preset=preset, tokens_per_rank=tokens, regime=regime, ep=ep, dispatcher=name, ms=ms,
                               slowdown=ms / base_ms, rows_received_max=int(hot.item()), max_rel_err=float(errt.item()))
                    rows_out.append(row)
                    log(f"{preset:14s} {regime:9s} {ep:3d} {name:10s} {ms:9.2f} {ms / base_ms:7.2f} {row['rows_received_max']:9d} "
                        f"{row['max_rel_err']:11.2e}")
                    del layer, disp
            del full
        bw = bandwidth_gbps(tokens * K, D, dtype, device, cuda, a.iters)
        rows_out.append(dict(preset=preset, tokens_per_rank=tokens, regime="all_to_all_bandwidth", ep=world,
                             gbps_per_rank=bw, ms_per_exchange=tokens * K * D * x_all.element_size() * (world - 1) / world / bw / 1e6))
        log(f"{preset:14s} plain all_to_all of {tokens * K} rows x {D}: {bw:.0f} GB/s per rank")
        del x_all, w_all, probe_all
        if cuda:
            torch.cuda.empty_cache()

    if rank == 0:
        meta = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if cuda else "cpu", "world": world}
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
