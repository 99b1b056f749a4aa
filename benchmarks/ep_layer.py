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

Dispatchers: ``overlap`` runs the shared expert during the forward row exchange and its
backward during the backward exchange of the row gradients (the dispatcher the train loop
uses), ``overlap-cN`` additionally pipelines the layer in N chunks of tokens
(``parallel.ep_chunks``); ``-ce`` runs the routed experts compiled with dynamic rows.
On CUDA the EP rows compile the shared expert on its own, as the train loop does under EP
(``pipeline.parallel.parallelize.compile_expert_parallel_parts``); ``local`` (the reference of the
``vs ep1`` column) is the eager ep = 1 layer, ``local-compiled`` the compiled one.

Per (preset, regime, ep, dispatcher) it prints the slowest rank's median ms per layer step and
the slowdown against ep = 1, checks the EP output and input gradient against ep = 1 on the same
tokens (bf16 tolerance), and measures the plain all-to-all bandwidth for the same row count.
Needs CUDA; with ``--cpu`` it runs on gloo as a smoke test (no timing value). On ONE GPU it runs
every dispatcher at ep = 1 over a group of one rank ("self-exchange": each all-to-all is a local
copy), which measures the dispatcher's own cost (count exchange, host wait, copies, regroup,
chunking) apart from the wire and from load imbalance; ``local-compiled`` adds the ep = 1 layer
under torch.compile, as the train loop runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
# (name, chunks, compiled routed experts): how many token chunks the layer is pipelined in, and
# whether the routed experts run compiled with dynamic rows (as the train loop runs them under EP)
DISPATCHERS = (("overlap", 1, False), ("overlap-ce", 1, True), ("overlap-c2", 2, False),
               ("overlap-c2-ce", 2, True), ("overlap-c4-ce", 4, True))
sys.path.insert(0, str(REPO))

from model import TimeMoeConfig  # noqa: E402
from model.moe import LocalDispatcher, MoeFeedForward  # noqa: E402
from pipeline.parallel.ep_dispatch import AllToAllDispatcher  # noqa: E402
from pipeline.parallel.parallelize import compile_expert_parallel_parts  # noqa: E402


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
    y = dispatcher(x_TD, idx_TK, w_TK, layer.experts, lambda: layer.shared_branch(x_TD))
    (y.float() * probe_TD).sum().backward()
    return y


def max_rel_err(y, ref_y, gx, ref_gx) -> float:
    """The larger of the output's and the input gradient's max error relative to the reference's max."""
    return max(float((y.float() - ref_y.float()).abs().max() / ref_y.float().abs().max().clamp_min(1e-6)),
               float((gx.float() - ref_gx.float()).abs().max() / ref_gx.float().abs().max().clamp_min(1e-6)))


def compiled_local(layer: MoeFeedForward, x, idx_TK, w_TK, probe_TD, ref_y, ref_gx, iters: int
                   ) -> tuple[float, float, Callable[[], torch.Tensor]]:
    """ep = 1 as the train loop runs it: the dispatcher and the shared expert under torch.compile
    (the train loop compiles each decoder block whole). Returns (ms, max rel err vs eager, the
    timed step for profiling)."""
    dispatcher = LocalDispatcher()

    def forward(x_TD, idx, w):
        return dispatcher(x_TD, idx, w, layer.experts, lambda: layer.shared_branch(x_TD))

    compiled = torch.compile(forward, dynamic=False)

    def run():
        x.grad = None
        y = compiled(x, idx_TK, w_TK)
        (y.float() * probe_TD).sum().backward()
        return y

    y = run().detach()
    err = max_rel_err(y, ref_y, x.grad, ref_gx)
    return timed(run, iters, 3, True), err, run


def gpu_work(fn, iters: int) -> tuple[float, float]:
    """(GPU kernel milliseconds, kernel launches) per call, from torch.profiler: next to the wall
    time it tells device work from host overhead (launches, the host wait on the split sizes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / iters, len(kernels) / iters


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
    ap.add_argument("--dispatchers", nargs="+", default=None, choices=[d[0] for d in DISPATCHERS],
                    help="run only these EP dispatchers (default: all)")
    ap.add_argument("--gpu-work", action="store_true",
                    help="also profile each row: GPU kernel ms and kernel launches per call (CUDA)")
    ap.add_argument("--no-compiled-baseline", dest="compiled_baseline", action="store_false",
                    help="skip the torch.compile'd ep = 1 layer row (CUDA only)")
    ap.add_argument("--out", default="ep_layer.json")
    a = ap.parse_args()

    cuda = not a.cpu
    torch._dynamo.config.recompile_limit = 64  # a fresh layer per row; shapes differ per preset and chunk
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    ep_sizes = [e for e in (2, 4, 8) if e <= world and world % e == 0]
    groups = {}
    if world == 1:  # self-exchange: the dispatcher's cost without a wire (see the docstring)
        ep_sizes, groups[1] = [1], dist.group.WORLD
    for ep in ep_sizes:  # every rank must create every group, in the same order
        for start in range(0, world, ep):
            g = dist.new_group(list(range(start, start + ep)))
            if start <= rank < start + ep:
                groups[ep] = g

    rows_out = []

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    log(f"{'preset':14s} {'regime':9s} {'ep':>3s} {'dispatch':13s} {'ms/layer':>9s} {'vs ep1':>7s} {'vs comp':>7s} "
        f"{'hot rows':>9s} {'max rel err':>11s}")
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
            if cuda and a.gpu_work:
                row["gpu_ms"], row["kernels"] = gpu_work(run_local, 3)
            rows_out.append(row)
            compiled_ms = None
            if cuda and a.compiled_baseline:
                compiled_ms, compiled_err, run_compiled = compiled_local(full, x, idx_all[mine], w, probe_all[mine],
                                                                         ref_y, ref_gx, a.iters)
            vs_compiled = (lambda ms: ms / compiled_ms) if compiled_ms else (lambda ms: float("nan"))
            row["vs_compiled"] = vs_compiled(base_ms)
            log(f"{preset:14s} {regime:9s} {1:3d} {'local':13s} {base_ms:9.2f} {1.0:7.2f} {vs_compiled(base_ms):7.2f} "
                f"{tokens * K:9d} {0.0:11.2e}")
            if compiled_ms:
                rows_out.append(dict(row, dispatcher="local-compiled", ms=compiled_ms, slowdown=compiled_ms / base_ms,
                                     vs_compiled=1.0, max_rel_err=compiled_err))
                if a.gpu_work:
                    rows_out[-1]["gpu_ms"], rows_out[-1]["kernels"] = gpu_work(run_compiled, 3)
                log(f"{preset:14s} {regime:9s} {1:3d} {'local-compiled':13s} {compiled_ms:9.2f} {compiled_ms / base_ms:7.2f} "
                    f"{1.0:7.2f} {tokens * K:9d} {compiled_err:11.2e}")
            for ep in ep_sizes:
                group = groups[ep]
                ep_rank = dist.get_rank(group)
                for name, chunks, compiled_experts in DISPATCHERS:
                    if compiled_experts and not cuda or a.dispatchers and name not in a.dispatchers:
                        continue
                    layer = make_layer(preset, dtype, device)
                    shard_experts(layer, ep_rank, ep)
                    if cuda:
                        compile_expert_parallel_parts(layer, routed_experts=compiled_experts)
                    disp = AllToAllDispatcher(group, ep, E, chunks=chunks)
                    x.grad = None
                    y = step_fn(layer, disp, x, idx_all[mine], w, probe_all[mine]).detach()
                    err = max_rel_err(y, ref_y, x.grad, ref_gx)

                    def run_ep():
                        x.grad = None
                        step_fn(layer, disp, x, idx_all[mine], w, probe_all[mine])

                    ms = timed(run_ep, a.iters, 3, cuda)
                    hot = torch.tensor([disp.last_rows_received], device=device)
                    dist.all_reduce(hot, op=dist.ReduceOp.MAX)
                    errt = torch.tensor([err], device=device, dtype=torch.float64)
                    dist.all_reduce(errt, op=dist.ReduceOp.MAX)
                    row = dict(preset=preset, tokens_per_rank=tokens, regime=regime, ep=ep, dispatcher=name, ms=ms,
                               slowdown=ms / base_ms, vs_compiled=vs_compiled(ms), rows_received_max=int(hot.item()),
                               max_rel_err=float(errt.item()))
                    if cuda and a.gpu_work:
                        row["gpu_ms"], row["kernels"] = gpu_work(run_ep, 3)
                    rows_out.append(row)
                    log(f"{preset:14s} {regime:9s} {ep:3d} {name:13s} {ms:9.2f} {ms / base_ms:7.2f} {vs_compiled(ms):7.2f} "
                        f"{row['rows_received_max']:9d} {row['max_rel_err']:11.2e}")
                    del layer, disp
            del full
        if world == 1:  # nothing leaves a rank of one: no bandwidth to measure
            del x_all, w_all, probe_all
            continue
        bw = bandwidth_gbps(tokens * K, D, dtype, device, cuda, a.iters)
        rows_out.append(dict(preset=preset, tokens_per_rank=tokens, regime="all_to_all_bandwidth", ep=world,
                             gbps_per_rank=bw, ms_per_exchange=tokens * K * D * x_all.element_size() * (world - 1) / world / bw / 1e6))
        log(f"{preset:14s} plain all_to_all of {tokens * K} rows x {D}: {bw:.0f} GB/s per rank")
        del x_all, w_all, probe_all
        if cuda:
            torch.cuda.empty_cache()

    if a.gpu_work:
        log(f"\n{'preset':14s} {'regime':9s} {'ep':>3s} {'dispatch':13s} {'wall ms':>8s} {'GPU ms':>7s} {'idle':>6s} {'kernels':>8s}")
        for r in rows_out:
            if "gpu_ms" in r:
                log(f"{r['preset']:14s} {r['regime']:9s} {r['ep']:3d} {r['dispatcher']:13s} {r['ms']:8.2f} {r['gpu_ms']:7.2f} "
                    f"{1 - r['gpu_ms'] / r['ms']:6.0%} {r['kernels']:8.0f}")
    if rank == 0:
        meta = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if cuda else "cpu", "world": world}
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
