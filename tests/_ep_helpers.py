"""Helpers for tests/test_expert_parallel.py: a 2-process gloo launcher and the worker bodies.

Workers run in fresh processes (torch.multiprocessing.spawn), so everything they need lives at
module level here. Results come back through torch.save files written by each rank.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from tests._train_helpers import _entry, free_port  # one 2-rank launcher for the suite


def run_two_ranks(fn: Callable, out_dir: Path, *args, timeout_s: float = 240.0) -> list:
    """Run ``fn(rank, world, *args)`` on 2 gloo ranks; return each rank's result. A collective
    that deadlocks fails after ``timeout_s`` instead of hanging the suite."""
    import time

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        ctx = mp.spawn(_entry, args=(2, free_port(), fn, str(out_dir), args), nprocs=2, join=False)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"2-rank run of {fn.__name__} exceeded {timeout_s}s (deadlocked collective?)")
    except Exception as exc:  # surface the worker's traceback, not only "process 1 terminated"
        errs = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.err")))
        raise AssertionError(f"worker failed:\n{errs or exc}") from exc
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def init_deepspeed_gloo() -> None:
    """The training code's own process-group set-up (gloo, shared-memory op build skipped)."""
    from pipeline.parallel.parallelize import init_distributed

    init_distributed(use_gpu=False)


# ---------------------------------------------------------------------------- models


def tiny_config():
    from model import TimeMoeConfig

    cfg = TimeMoeConfig.preset("tiny")
    # small enough for 4 engines x 5 steps on 2 cores; 8 experts so ep=2 keeps 4 per rank
    return cfg


def make_model(seed: int):
    from model import TimeMoeModel

    torch.manual_seed(seed)
    return TimeMoeModel(tiny_config()).float()


def make_batches(rank: int, steps: int, batch: int, length: int) -> list[dict]:
    """Different data per rank (as data parallelism gives), identical across runs."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps):
        t = torch.linspace(0, 12, length + 1)
        phase = torch.rand(batch, 1, generator=g) * 6
        w = torch.sin(t[None] + phase) + 0.3 * torch.randn(batch, length + 1, generator=g)
        out.append({"inputs_BL": w[:, :-1].contiguous(), "labels_BL": w[:, 1:].contiguous(),
                    "loss_mask_BL": torch.ones(batch, length)})
    return out


# ---------------------------------------------------------------------------- workers


class _LoggedWork:
    def __init__(self, work, events: list[str]) -> None:
        self._work, self._events = work, events

    def wait(self, *args, **kwargs):
        self._events.append("a2a_wait")
        return self._work.wait(*args, **kwargs)


@contextlib.contextmanager
def _logged_all_to_all(events: list[str]):
    """Record every all_to_all_single issued inside (``a2a`` blocking, ``a2a_start`` asynchronous,
    ``a2a_wait`` when its handle is waited on), passing the calls through to the real collective."""
    import torch.distributed as dist

    real = dist.all_to_all_single

    def logged(*args, async_op: bool = False, **kwargs):
        work = real(*args, async_op=async_op, **kwargs)
        events.append("a2a_start" if async_op else "a2a")
        return _LoggedWork(work, events) if async_op else work

    dist.all_to_all_single = logged
    try:
        yield
    finally:
        dist.all_to_all_single = real


def dispatcher_worker(rank: int, world: int, num_experts: int, tokens: int, dim: int, ffn: int) -> dict:
    """Real AllToAllDispatcher on 2 gloo ranks vs LocalDispatcher on the concatenated tokens.

    Scenario "mixed": rank 1 routes every token to experts owned by rank 1 (it sends zero rows
    to rank 0) and expert 0 gets no token from anyone. Scenario "starve0": every token of both
    ranks goes to rank 1's experts, so rank 0 receives no row at all."""
    import torch.distributed as dist

    from model.moe import GroupedExperts, LocalDispatcher
    from pipeline.parallel.ep_dispatch import AllToAllDispatcher

    dist.init_process_group("gloo", rank=rank, world_size=world)
    half, k = num_experts // 2, 2
    out = {}
    # "+shared": the layer's shared expert handed over as the concurrent branch, overlapped with
    # the row exchange in both passes; "-chunks3" pipelines the layer in 3 chunks of tokens
    for scenario, chunks, with_shared in (
            ("mixed", 1, False), ("starve0", 1, False), ("mixed+shared", 1, True),
            ("mixed+shared-chunks3", 3, True), ("starve0-chunks3", 3, False)):
        torch.manual_seed(0)
        experts_full = GroupedExperts(num_experts, dim, ffn)
        shared_proj = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            for p in experts_full.parameters():
                p.normal_(0, 0.5)
        x_all = torch.randn(world * tokens, dim)
        if scenario.startswith("mixed"):
            idx_all = torch.stack([torch.randperm(num_experts - 1)[:k] + 1 for _ in range(world * tokens)])
            idx_all[tokens:] = torch.stack([torch.randperm(half)[:k] + half for _ in range(tokens)])
        else:
            idx_all = torch.stack([torch.randperm(half)[:k] + half for _ in range(world * tokens)])
        w_all = torch.rand(world * tokens, k)
        probe = torch.arange(x_all.numel()).view_as(x_all).sin()  # a non-uniform upstream gradient

        def branch_of(x):
            return (lambda: torch.tanh(shared_proj(x))) if with_shared else None

        x_ref = x_all.clone().requires_grad_()
        w_ref = w_all.clone().requires_grad_()
        y_ref = LocalDispatcher()(x_ref, idx_all, w_ref, experts_full, branch_of(x_ref))
        (y_ref * probe).sum().backward()
        g_shared_ref = shared_proj.weight.grad.clone() if with_shared else None
        shared_proj.weight.grad = None

        sl = slice(rank * tokens, (rank + 1) * tokens)
        local = slice(rank * half, (rank + 1) * half)
        experts_local = GroupedExperts(half, dim, ffn)
        with torch.no_grad():
            for name, p in experts_local.named_parameters():
                p.copy_(getattr(experts_full, name)[local])
        x = x_all[sl].clone().requires_grad_()
        w = w_all[sl].clone().requires_grad_()
        dispatcher = AllToAllDispatcher(dist.group.WORLD, world, num_experts, chunks=chunks)
        y = dispatcher(x, idx_all[sl], w, experts_local, branch_of(x))
        backward_events: list[str] = []  # the order the exchanges and the shared expert's backward were issued in
        if with_shared:
            shared_proj.weight.register_hook(lambda g: backward_events.append("shared_bwd"))
        with _logged_all_to_all(backward_events):
            (y * probe[sl]).sum().backward()
        g_shared = None
        if with_shared:  # the reference's gradient sums over both ranks' tokens
            g_shared = shared_proj.weight.grad.clone()
            dist.all_reduce(g_shared)
        out[scenario] = {
            "y": y.detach(), "y_ref": y_ref[sl].detach(),
            "gx": x.grad, "gx_ref": x_ref.grad[sl], "gw": w.grad, "gw_ref": w_ref.grad[sl],
            "gexp": {n: p.grad for n, p in experts_local.named_parameters()},
            "gexp_ref": {n: p.grad[local] for n, p in experts_full.named_parameters()},
            "g_shared": g_shared, "g_shared_ref": g_shared_ref,
            "rows_received": dispatcher.last_rows_received, "backward_events": backward_events,
            "rows_expected": int(((idx_all >= rank * half) & (idx_all < (rank + 1) * half)).sum()),
        }
    dist.barrier()
    dist.destroy_process_group()
    return out


def ds_config(stage: int, clip: float) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if clip:
        cfg["gradient_clipping"] = clip
    return cfg


def train_worker(rank: int, world: int, runs: list[tuple[int, int, float, str]], steps: int, length: int) -> dict:
    """For each (zero_stage, ep_size, clip, optimizer) run: fresh model (seed 0), EP, DeepSpeed
    engine, ``steps`` steps on fixed per-rank data. Returns losses and the full weights (experts
    gathered over the EP group) per run, and the ZeRO-3 refusal message.

    AdamW is nearly blind to a constant factor on a gradient (m / sqrt(v)); plain SGD is not,
    so the SGD runs are the ones that catch expert-gradient scaling mistakes."""
    import deepspeed

    from pipeline.parallel.expert_parallel import apply_expert_parallel, gather_expert_params, split_moe_param_groups
    from pipeline.parallel.optim import param_groups

    init_deepspeed_gloo()
    # one batch per rank, repeated: the loss must fall, so the comparison is not vacuous
    batches = make_batches(rank, 1, batch=2, length=length) * steps
    results = {}
    for stage, ep, clip, opt_name in runs:
        model = make_model(seed=0)
        info = apply_expert_parallel(model, ep_size=ep)
        groups = split_moe_param_groups(param_groups(model, 0.1))
        if opt_name == "sgd":
            opt = torch.optim.SGD(groups, lr=0.1)
        else:
            # eps 1e-6 (not 1e-8): the attention k-bias has a mathematically zero gradient, and
            # Adam with a tiny eps turns its ~1e-9 reduction-order noise into +-lr updates
            opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-6)
        cfg = ds_config(stage, clip)
        cfg["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        assert engine.has_moe_layers == (ep > 1)
        losses = []
        for b in batches:
            out = engine(b["inputs_BL"], labels=b["labels_BL"], loss_mask=b["loss_mask_BL"])
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        full = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        full.update(gather_expert_params(engine.module, info))
        results[(stage, ep, clip, opt_name)] = {"losses": losses, "weights": full}
        del engine, opt, model

    zero3_error = None
    model = make_model(seed=0)
    apply_expert_parallel(model, ep_size=2)
    opt = torch.optim.AdamW(split_moe_param_groups(param_groups(model, 0.1)), lr=1e-3)
    try:
        deepspeed.initialize(model=model, optimizer=opt, config=ds_config(3, 0.0))
    except Exception as exc:  # DeepSpeed refuses native-MoE groups under ZeRO-3
        zero3_error = f"{type(exc).__name__}: {exc}"
    results["zero3_error"] = zero3_error
    return results


def timing_worker(rank: int, world: int, ep: int, steps: int, batch: int, length: int) -> dict:
    """CPU seconds per training step (ZeRO-1, fp32) for one ep size; first step is warm-up."""
    import time

    import deepspeed

    from pipeline.parallel.expert_parallel import apply_expert_parallel, split_moe_param_groups
    from pipeline.parallel.optim import param_groups

    init_deepspeed_gloo()
    model = make_model(seed=0)
    apply_expert_parallel(model, ep_size=ep)
    opt = torch.optim.AdamW(split_moe_param_groups(param_groups(model, 0.1)), lr=1e-3)
    cfg = ds_config(1, 1.0)
    cfg["train_micro_batch_size_per_gpu"] = batch
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    batches = make_batches(rank, steps + 1, batch=batch, length=length)
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        out = engine(b["inputs_BL"], labels=b["labels_BL"], loss_mask=b["loss_mask_BL"])
        engine.backward(out.loss)
        engine.step()
        if i:
            times.append(time.perf_counter() - t0)
    return {"step_s": times}


def main() -> None:
    """CPU seconds per step, ep=1 vs ep=2, 2 gloo ranks, tiny model, ZeRO-1, fp32:
    ``python -m tests._ep_helpers [--steps 5 --batch 4 --length 256 --out ep_cpu_step.json]``."""
    import argparse
    import json
    import statistics
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", default="ep_cpu_step.json")
    a = ap.parse_args()
    rows = []
    for ep in (1, 2):
        res = run_two_ranks(timing_worker, Path(tempfile.mkdtemp()), ep, a.steps, a.batch, a.length)
        step = [max(t) for t in zip(*(r["step_s"] for r in res))]  # a step ends when the slower rank ends
        rows.append({"ep": ep, "median_step_s": statistics.median(step), "min_step_s": min(step),
                     "points_per_s": 2 * a.batch * a.length / statistics.median(step)})
    print(f"{'ep':>3} {'median s/step':>14} {'min s/step':>11} {'points/s':>10}")
    for r in rows:
        print(f"{r['ep']:>3} {r['median_step_s']:>14.4f} {r['min_step_s']:>11.4f} {r['points_per_s']:>10.0f}")
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
