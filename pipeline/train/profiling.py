"""Where a training step's time goes, per rank: ``train.profile_steps = [first, last]``.

A :class:`StepProfiler` runs ``torch.profiler`` over optimizer steps ``first..last`` (1-based)
and writes ``<output_dir>/profile/rank<R>.json``: the profiled wall time and the GPU (or CPU)
kernel time by category. The category that matters for expert parallelism is ``all_to_all``:
NCCL runs ``all_to_all_single`` as grouped send/recv, so its kernels are ``ncclDevKernel_SendRecv``
(our dispatcher is the only point-to-point traffic in a step), while ZeRO's gradient reduction
shows up as ``ReduceScatter``/``AllReduce`` and parameter gathers as ``AllGather``. On CPU
(gloo) the same categories are read from the collective ops' names.

``all_to_all_share`` = all-to-all kernel time / profiled wall time: the share of the step that
the dispatcher's exchange occupies on the GPU. It is an upper bound on what overlap could hide.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

CATEGORIES = (  # (category, substrings of a kernel/op name, lower case), first match wins
    ("all_to_all", ("sendrecv", "all_to_all", "alltoall")),
    ("reduce_scatter", ("reducescatter", "reduce_scatter")),
    ("all_reduce", ("allreduce", "all_reduce")),
    ("all_gather", ("allgather", "all_gather")),
    ("other_comm", ("nccl", "gloo", "broadcast")),
    ("gemm", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "grouped_mm")),
    ("attention", ("flex_attention", "flash", "fmha", "attention")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other_compute"


def summarize(kernels: list[tuple[str, float]], wall_us: float, steps: int) -> dict[str, Any]:
    """``kernels``: (name, microseconds) of every device kernel in the window."""
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, us in kernels:
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
        by_name[name] = by_name.get(name, 0.0) + us
    busy = sum(by_cat.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "steps": steps,
        "wall_ms_per_step": wall_us / 1e3 / max(steps, 1),
        "kernel_ms_per_step": {k: v / 1e3 / max(steps, 1) for k, v in sorted(by_cat.items())},
        "busy_share": busy / wall_us if wall_us else 0.0,
        "all_to_all_share": by_cat.get("all_to_all", 0.0) / wall_us if wall_us else 0.0,
        "top_kernels_ms_per_step": [(n[:120], us / 1e3 / max(steps, 1)) for n, us in top],
    }


def profile_calls(fn: Callable[[], Any], calls: int, cuda: bool) -> dict[str, Any]:
    """Profile ``calls`` calls of ``fn``: :func:`summarize` of the device kernels (per call) plus
    the host ops with the most self time. Without CUDA only the wall time and host ops."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_us = (time.perf_counter() - t) * 1e6
    kernels = [(e.name, float(e.time_range.elapsed_us())) for e in prof.events()
               if e.device_type != torch.autograd.DeviceType.CPU]
    summary = summarize(kernels, wall_us, calls) if cuda else {"wall_ms_per_step": wall_us / 1e3 / calls}
    host = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:20]
    summary["host_ops_ms_per_step"] = [(a.key[:80], a.self_cpu_time_total / 1e3 / calls, a.count // calls) for a in host]
    return summary


class StepProfiler:
    """``before_step(step)`` / ``after_step(step)`` around each optimizer step (1-based)."""

    def __init__(self, profile_steps: tuple[int, ...], out_dir: Path, rank: int, use_gpu: bool):
        self.first, self.last = (profile_steps or (0, -1))[:2]
        self.out_file = Path(out_dir) / "profile" / f"rank{rank}.json"
        self.use_gpu = use_gpu
        self._prof: Any = None
        self._t0 = 0.0

    @property
    def enabled(self) -> bool:
        return self.first >= 1

    def _sync(self) -> None:
        if self.use_gpu:
            torch.cuda.synchronize()

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_gpu else [])
        self._sync()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> dict[str, Any] | None:
        if self._prof is None or step != self.last:
            return None
        self._sync()
        wall_us = (time.perf_counter() - self._t0) * 1e6
        self._prof.__exit__(None, None, None)
        kernels = []
        for evt in self._prof.events():
            on_device = evt.device_type != torch.autograd.DeviceType.CPU
            if self.use_gpu and on_device:
                kernels.append((evt.name, float(evt.time_range.elapsed_us())))
            elif not self.use_gpu and evt.name.startswith("gloo:"):  # not c10d::*: it wraps the same op
                kernels.append((evt.name, float(evt.time_range.elapsed_us())))
        self._prof = None
        summary = summarize(kernels, wall_us, self.last - self.first + 1)
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.out_file.write_text(json.dumps(summary, indent=1))
        return summary
