"""The per-worker training loop, :func:`run_training`. Ray Train's TorchTrainer runs it on every
worker (``pipeline.train.ray_runtime``); ``python -m pipeline.train.torchrun`` runs it without Ray. What differs between the two (where batches come from, where
checkpoints go) is a :class:`Runtime`.

The loop reads like a table of contents: fetch micro-batches, step, then the components decide
whether to log, evaluate, checkpoint; at the end, export the model in the published layout.
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from model.flops import mfu, peak_flops, training_flops_per_point
from pipeline.config import TrainConfig
from pipeline.console import say
from pipeline.parallel.expert_parallel import gather_expert_params
from pipeline.parallel.parallelize import build_model, init_distributed, model_config, parallelize
from pipeline.reports.pictures import EXPERT_LOAD_FILE, TRAINING_DIR, training_pictures
from pipeline.tracking import Tracker
from pipeline.train import checkpoint
from pipeline.train.adapters import apply_finetune_method, merged_state_dict
from pipeline.train.checkpoint import ResumeState
from pipeline.train.data import DataPosition, prefetched
from pipeline.train.heldout import HeldOut
from pipeline.train.profiling import StepProfiler
from pipeline.train.stop_request import StopRequest, TrainingStopped, stop_on_signals


class Runtime(Protocol):
    """What the loop needs from its launcher (Ray Train or torchrun)."""

    rank: int
    world_size: int
    use_gpu: bool

    def train_epoch(self, epoch: int, skip_batches: int) -> Iterator[dict[str, torch.Tensor]]: ...
    def val_batches(self) -> Iterator[dict[str, torch.Tensor]] | None: ...
    def resume_dir(self) -> ContextManager[Path | None]: ...
    def save_and_report(self, engine: Any, state: ResumeState, metrics: dict[str, float]) -> None: ...


class BatchStream:
    """Micro-batches across epochs, with the position kept and the time blocked measured.

    With ``lookahead`` > 0 a background thread reads up to that many batches ahead, across epoch
    boundaries, so the start-up of the next epoch's reader overlaps the steps on the last
    batches of the current one; it stops after ``limit`` batches (what the run still needs), so
    no epoch is started that no step will read."""

    def __init__(self, runtime: Runtime, position: DataPosition, device: torch.device, lookahead: int = 0,
                 limit: int | None = None):
        self.rt, self.pos, self.device = runtime, DataPosition(**vars(position)), device
        self._it = prefetched(lambda: self._epochs(DataPosition(**vars(position)), limit), lookahead)
        self.wait_s = 0.0  # time blocked on the iterator since the last take_wait()

    def _epochs(self, start: DataPosition, limit: int | None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(epoch, batch)`` from ``start`` on, epoch after epoch, at most ``limit`` of them."""
        epoch, skip, given = start.epoch, start.batches, 0
        while limit is None or given < limit:
            n = 0
            for batch in self.rt.train_epoch(epoch, skip):
                n += 1
                given += 1
                yield epoch, batch
                if limit is not None and given >= limit:
                    return
            if n == 0 and skip == 0:
                raise RuntimeError(f"epoch {epoch} gave this worker no batch: the train split "
                                   "holds fewer windows than micro_batch_size x workers")
            epoch, skip = epoch + 1, 0

    def next(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            epoch, batch = next(self._it)
        except StopIteration:
            raise RuntimeError("the batch stream was asked for more batches than the run needs") from None
        if epoch != self.pos.epoch:
            self.pos = DataPosition(epoch, 0)
        self.pos.batches += 1
        self.wait_s += time.perf_counter() - t0
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w


@dataclass
class StepStats:
    """Sums over one optimizer step's micro-batches (this rank), reduced across ranks."""

    names: list[str] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def add(self, out: Any) -> None:
        vals = {"loss": out.loss.detach().float()}
        if out.aux_loss is not None:  # dense models have no router, hence no aux loss
            vals["aux_loss"] = out.aux_loss.detach().float()
        for h, l in sorted(out.head_losses.items()):
            vals[f"loss_h{h}"] = l.detach().float()
        if not self.names:
            self.names = list(vals)
            self.values = [v.clone() for v in vals.values()]
        else:
            self.values = [a + vals[n] for a, n in zip(self.values, self.names)]


def all_reduce_sum(vec: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Sum a small host tensor across ranks. NCCL reduces only device tensors, so the vector
    travels to ``device`` and back (gloo takes it as it is)."""
    if world > 1:
        moved = vec.to(device)
        dist.all_reduce(moved)
        vec = moved.cpu()
    return vec


def expert_imbalance(counts_LE: torch.Tensor, experts_per_group: int = 1) -> list[float]:
    """Per layer max/mean of tokens per expert: 1.0 is perfectly balanced. With
    ``experts_per_group`` = E / ep the groups are the EP ranks' expert blocks: how much more
    expert work the busiest GPU of an EP group does than the average (what EP waits for)."""
    counts = counts_LE.float()
    counts = counts.view(counts.shape[0], -1, experts_per_group).sum(dim=-1)
    return (counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)).tolist()


@torch.no_grad()
def evaluate(engine: Any, batches: Iterator[dict[str, torch.Tensor]] | None, max_batches: int, device: torch.device, world: int) -> dict[str, float]:
    """The held-out metrics (``pipeline.train.heldout``) over at most ``max_batches`` batches,
    reduced across ranks. Every rank sees the same number of batches (equal split, tail
    dropped), which ZeRO-3's gathers need."""
    if batches is None:
        return {}
    engine.eval()
    held = HeldOut()
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        b = {k: v.to(device) for k, v in batch.items()}
        out = engine(b["inputs"], segment_ids=b["segment_ids"], labels=b["labels"], loss_mask=b["loss_mask"])
        held.add(out, b["labels"], b["loss_mask"])
    engine.train()
    held.sums = all_reduce_sum(held.sums, world, device)
    return held.metrics()


def export_model(engine: Any, ep_info: Any, cfg: TrainConfig, out_dir: Path, rank: int) -> Path | None:
    """Collective: full weights into a fresh plain model, saved with ``save_pretrained``
    (config.json + model.safetensors) so it loads without Ray or DeepSpeed. Published with
    renames (:func:`publish_dir`): a job stopped or killed mid-export never leaves a
    half-written ``out_dir``."""
    from model import TimeMoeModel

    module = engine.module
    if cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if ep_info is not None:

        state.update({k: v.float().cpu() for k, v in gather_expert_params(module, ep_info).items()})
    if rank != 0:
        return None
    if cfg.finetune.method == "lora":  # the published layout: low-rank updates folded in
        state = merged_state_dict(state, cfg.finetune)
    fresh = TimeMoeModel(model_config(cfg.model))
    fresh.load_state_dict(state, strict=True)
    out_dir = Path(out_dir)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    fresh.save_pretrained(str(tmp))
    publish_dir(tmp, out_dir)
    return out_dir


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete directory ``tmp`` with renames only: readers see the
    previous complete directory, none, or the new complete one, never a partial one."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _peak_flops(use_gpu: bool) -> float | None:
    return peak_flops(torch.cuda.get_device_name()) if use_gpu and torch.cuda.is_available() else None


def drop_update(engine: Any) -> None:
    """Make the coming optimizer step leave every weight as it is (without ZeRO, where DeepSpeed
    has no overflow check): zero gradients at learning rate 0. Every rank does it alike, so the
    gradient all-reduce and the optimizer stay in step; Adam's moments decay as after a step with
    zero gradient, and the LR schedule moves on."""
    for p in engine.module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def nonfinite_on_any_rank(loss: torch.Tensor, world: int, device: torch.device) -> bool:
    flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], dtype=torch.float64)
    return bool(all_reduce_sum(flag, world, device)[0] > 0)


class EarlyStop:
    """Stop when the held-out loss has not improved for ``patience`` evaluations in a row (0: never).
    The loss is all-reduced, so every rank decides alike."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.since_best = patience, math.inf, 0

    def stop_after(self, eval_loss: float) -> bool:
        if eval_loss < self.best:
            self.best, self.since_best = eval_loss, 0
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience


class NonFiniteSteps:
    """Steps whose loss or gradient norm is not finite. Such a step is not applied (on GPU in bf16
    the optimizer skips it on the device, ``pipeline.parallel.optim.FiniteStepAdamW``; otherwise
    DeepSpeed's ZeRO optimizer's overflow check zeroes the gradients and keeps the weights; without
    ZeRO the loop drops the step's gradients itself); here each one is counted (metric ``nonfinite_steps``) and logged, and
    ``max_in_row`` of them in a row stop the run: the model or the data is broken, and going on
    would only burn GPU hours."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row, self.total, self.in_row = max_in_row, 0, 0

    def check(self, m: dict[str, float], step: int, rank: int) -> None:
        if math.isfinite(m["loss"]) and math.isfinite(m.get("grad_norm", 0.0)):
            self.in_row = 0
        else:
            self.total += 1
            self.in_row += 1
            if rank == 0:
                say(f"[train] step {step}: loss {m['loss']} grad norm {m.get('grad_norm')}: not finite, "
                    f"the update was skipped ({self.in_row} in a row, {self.total} in all)")
            if self.max_in_row and self.in_row >= self.max_in_row:
                raise FloatingPointError(
                    f"{self.in_row} training steps in a row had a non-finite loss or gradient norm (last: step {step}); "
                    "stopping (train.max_nonfinite_in_row). Check the data for NaN/inf and the learning rate.")
        m["nonfinite_steps"] = float(self.total)


class StepClock:
    """Time left from the median of the last ``window`` intervals between step ends (eval,
    logging and checkpoints included): with the mean since the start, the first steps
    (compilation, allocator and data warm-up) made the ETA several times too long for the first
    minutes of a run."""

    def __init__(self, window: int = 20, start: float | None = None) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self._last = time.perf_counter() if start is None else start

    def tick(self, now: float | None = None) -> float:
        """Marks a step's end; returns the time since the previous one."""
        now = time.perf_counter() if now is None else now
        interval = now - self._last
        self.recent.append(interval)
        self._last = now
        return interval

    def eta_s(self, steps_left: int) -> float:
        return statistics.median(self.recent) * steps_left if self.recent else float("nan")


def pace_since(history: list[dict[str, float]], since_step: int) -> tuple[float, float, float]:
    """Over the training steps after ``since_step``: the median points/s of a step's own work,
    the median step time and the median time between step ends (s). The step line shows all
    three: one step's rate is noisy, and where the GPU is shared or the host is slow the time
    between steps, the wall-clock pace, is longer than the step."""
    recent = []
    for h in reversed(history):  # the newest first: a log reads only its own steps
        if h["step"] <= since_step:
            break
        if "step_time_s" in h:  # not the final evaluation's entry
            recent.append(h)
    if not recent:
        return math.nan, math.nan, math.nan
    return (statistics.median(h["points_per_s"] for h in recent), statistics.median(h["step_time_s"] for h in recent),
            statistics.median(h["step_interval_s"] for h in recent))


def _fmt_eta(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_training_pictures(out_root: Path, tracker: Tracker) -> None:
    """Loss vs FLOPs, throughput and expert load as pictures on the run (``training/``); like
    the tracker, a failure here is reported and training's result stands."""
    try:
        for path in training_pictures(out_root):
            tracker.log_artifact(path, TRAINING_DIR)
    except Exception as err:  # noqa: BLE001 - an observer must not fail the run
        say(f"[train] training pictures not drawn ({type(err).__name__}: {err})")


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # per-step metrics (reduced across ranks), then final eval
    engine: Any  # the DeepSpeed engine (``engine.module`` is the trained model)
    ep_info: Any
    run_id: str | None


def run_training(cfg: TrainConfig, rt: Runtime) -> TrainResult:
    """Train to ``cfg.train.max_steps`` (or an early stop); return the history and the engine.
    Raises :class:`TrainingStopped` after a checkpoint when SIGTERM asked the run to stop."""
    with stop_on_signals() as stop:
        run = TrainingRun.start(cfg, rt, stop)  # seeds, process group, model, engine, resume, tracking
        while run.state.step < cfg.train.max_steps:
            stats, counts_LE, lr, t0 = run.step()       # micro-batches, one optimizer step
            m = run.metrics(stats, counts_LE, lr, t0)  # reduced over ranks; non-finite steps counted
            run.log(m)                                  # metrics.jsonl, MLflow, the step line
            if run.checkpoint_or_stop(m):               # checkpoints; early stopping; a stop request
                break
    return run.finish()                                 # final evaluation, export, pictures


@dataclass
class TrainingRun:
    """What one training run holds between its steps (:func:`run_training` is its table of contents)."""

    cfg: TrainConfig
    rt: Runtime
    device: torch.device
    mcfg: Any
    engine: Any
    ep_info: Any
    accum: int
    tracker: Tracker
    state: ResumeState
    batches: BatchStream
    out_root: Path
    profiler: StepProfiler
    peak: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    step_clock: StepClock = field(default_factory=StepClock)
    window_len: int = 0
    flops_pp: float = 0.0
    load_since_log: torch.Tensor | None = None  # rank 0's tokens per expert since the last log step
    logged_step: int = 0  # the step of the last step line
    nonfinite: NonFiniteSteps | None = None
    early_stop: EarlyStop | None = None
    stop: StopRequest = field(default_factory=StopRequest)  # set by a signal on this rank
    stop_now: bool = False  # a stop was asked for on some rank by the end of the last step

    @classmethod
    def start(cls, cfg: TrainConfig, rt: Runtime, stop: StopRequest) -> "TrainingRun":
        out_root = Path(cfg.train.output_dir)
        (out_root / "pids").mkdir(parents=True, exist_ok=True)
        (out_root / "pids" / f"rank{rt.rank}.pid").write_text(str(os.getpid()))  # for fault-injection tests
        device = torch.device("cuda", torch.cuda.current_device()) if rt.use_gpu else torch.device("cpu")
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        init_distributed(rt.use_gpu)
        model = build_model(cfg.model, cfg.train.seed)
        counts = apply_finetune_method(model, cfg.finetune)
        if rt.rank == 0 and cfg.finetune.method != "full":
            say(f"[train] finetune.method={cfg.finetune.method}: {counts['trainable']:,} trainable, "
                f"{counts['frozen']:,} frozen parameters")
        engine, ep_info = parallelize(model, cfg, rt.world_size, rt.use_gpu)
        tracker = Tracker(cfg.tracking, rt.rank)
        state = resume_state(engine, cfg, rt)
        open_tracking(tracker, state, cfg)
        return cls(cfg, rt, device, model_config(cfg.model), engine, ep_info, cfg.grad_accum_steps(rt.world_size),
                   tracker, state, BatchStream(rt, state.data, device, cfg.data.lookahead_batches,
                                               limit=(cfg.train.max_steps - state.step) * cfg.grad_accum_steps(rt.world_size)),
                   out_root,
                   StepProfiler(cfg.train.profile_steps, out_root, rt.rank, rt.use_gpu), _peak_flops(rt.use_gpu),
                   nonfinite=NonFiniteSteps(cfg.train.max_nonfinite_in_row),
                   early_stop=EarlyStop(cfg.train.early_stop_patience), stop=stop)

    def step(self) -> tuple[StepStats, torch.Tensor | None, float, float]:
        """One optimizer step over ``accum`` micro-batches. Without ZeRO a non-finite loss on any
        rank drops the step's update here (with ZeRO 1-3 the optimizer skips a step with a
        non-finite gradient norm: ``NonFiniteSteps``)."""
        engine, rt = self.engine, self.rt
        self.profiler.before_step(self.state.step + 1)
        t0 = time.perf_counter()
        stats, counts_LE = StepStats(), None
        lr = engine.optimizer.param_groups[0]["lr"]  # the lr this step uses
        skip_update = False
        for i in range(self.accum):
            b = self.batches.next()
            out = engine(b["inputs"], segment_ids=b["segment_ids"], labels=b["labels"], loss_mask=b["loss_mask"])
            if self.cfg.parallel.zero_stage == 0:
                skip_update |= nonfinite_on_any_rank(out.loss, rt.world_size, self.device)
            if not skip_update:
                engine.backward(out.loss)
            if skip_update and i == self.accum - 1:
                drop_update(engine)
            engine.step()
            stats.add(out)
            if getattr(out, "expert_counts", None) is not None:
                c = out.expert_counts.detach().float()  # read with the step's other metrics
                counts_LE = c if counts_LE is None else counts_LE + c
        if not self.window_len:
            self.window_len = b["inputs"].shape[1]
            self.flops_pp = training_flops_per_point(self.mcfg, self.window_len)
        self.state.step += 1
        self.state.data = DataPosition(**vars(self.batches.pos))
        self.state.points_seen += self.cfg.train.global_batch_size * self.window_len
        return stats, counts_LE, lr, t0

    def metrics(self, stats: StepStats, counts_LE: torch.Tensor | None, lr: float, t0: float) -> dict[str, float]:
        """The step's metrics, the same on every rank (reduced), with the held-out metrics every
        ``eval_every`` steps."""
        cfg, rt, state = self.cfg, self.rt, self.state
        points = cfg.train.global_batch_size * self.window_len
        # the stats, rank 0's expert counts and a device-side gradient norm in ONE copy to the
        # host: one wait per step instead of one per metric
        gn = self.engine.get_global_grad_norm()
        parts = [torch.stack(stats.values).double() / self.accum]
        if counts_LE is not None:
            parts.append(counts_LE.reshape(-1).double())
        if torch.is_tensor(gn):
            parts.append(gn.detach().reshape(1).to(parts[0]))
        host = torch.cat(parts).cpu()
        n = len(stats.names)
        if counts_LE is not None:
            counts_LE = host[n:n + counts_LE.numel()].float().view(counts_LE.shape)
        if torch.is_tensor(gn):
            gn = host[-1]
        wait_s = self.batches.take_wait()
        # a stop request rides in the all-reduce the step does anyway: every rank sees it at the same step
        local = torch.tensor([wait_s, float(self.stop.requested)], dtype=torch.float64)
        vec = all_reduce_sum(torch.cat([host[:n], local]), rt.world_size, self.device) / rt.world_size
        dt = time.perf_counter() - t0
        m = dict(zip(stats.names, vec[:n].tolist()))
        m.update(lr=lr, points_seen=state.points_seen, points_per_s=points / dt, step_time_s=dt,
                 data_wait_ms=float(vec[n]) * 1000.0)
        self.stop_now = bool(vec[n + 1] > 0)
        if rt.use_gpu:
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        profile = self.profiler.after_step(state.step)
        if profile is not None:
            m["all_to_all_share"] = profile["all_to_all_share"]
            if rt.rank == 0:
                say(f"[train] profile of steps {list(cfg.train.profile_steps)}: {profile['wall_ms_per_step']:.1f} ms/step, "
                    f"all-to-all {100 * profile['all_to_all_share']:.1f}%, kernels (ms/step) "
                    + ", ".join(f"{k} {v:.1f}" for k, v in profile["kernel_ms_per_step"].items()))
        if gn is not None:
            m["grad_norm"] = float(gn)
        self.nonfinite.check(m, state.step, rt.rank)
        m["train_flops"] = self.flops_pp * state.points_seen
        if self.peak:
            m["mfu"] = mfu(points / dt / rt.world_size, self.mcfg, self.window_len, self.peak)
        if counts_LE is not None:
            self.load_since_log = counts_LE if self.load_since_log is None else self.load_since_log + counts_LE
            m.update(expert_load_metrics(counts_LE, cfg.parallel.ep_size))
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            m.update(evaluate(self.engine, rt.val_batches(), cfg.train.eval_batches, self.device, rt.world_size))
        # step_time_s covers the step's own work up to its metrics' host copy; the interval
        # between step ends adds what the loop does between steps (logging, checkpoints, held-out
        # evaluation), so the wall-clock pace can be read beside the per-step one
        m["step_interval_s"] = self.step_clock.tick()
        self.history.append({"step": state.step, **m})
        return m

    def log(self, m: dict[str, float]) -> None:
        """Every step to ``metrics.jsonl``; every ``log_every`` steps to MLflow, the expert-load
        records and the step line."""
        cfg, rt, step = self.cfg, self.rt, self.state.step
        if rt.rank == 0:
            with (self.out_root / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **m}) + "\n")
        if step % cfg.train.log_every and step != cfg.train.max_steps:
            return
        self.tracker.log_metrics(m, step)
        if self.load_since_log is not None:  # one column of the expert-load heatmap
            if rt.rank == 0:
                with (self.out_root / EXPERT_LOAD_FILE).open("a") as f:
                    f.write(json.dumps({"step": step, "counts": self.load_since_log.round().long().tolist()}) + "\n")
            self.load_since_log = None
        if rt.rank == 0:
            eta = self.step_clock.eta_s(cfg.train.max_steps - step)
            ev = f" | eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""
            pts, step_s, apart_s = pace_since(self.history, self.logged_step)
            self.logged_step = step
            say(f"[train] step {step}/{cfg.train.max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{pts / 1e3:.1f}k pts/s | step {1e3 * step_s:.0f} ms, {1e3 * apart_s:.0f} ms apart | "
                f"data-wait {m['data_wait_ms']:.1f} ms{ev} | ETA {_fmt_eta(eta)}")

    def checkpoint_or_stop(self, m: dict[str, float]) -> bool:
        """Checkpoint every ``checkpoint_every`` steps and at the end; True when the held-out loss
        says stop (``early_stop_patience``). After a stop request (SIGTERM on any rank) before the
        last step: a checkpoint of this step, then :class:`TrainingStopped`."""
        cfg, state = self.cfg, self.state
        stop = "eval_loss" in m and self.early_stop.stop_after(m["eval_loss"])
        every = cfg.train.checkpoint_every
        last = state.step == cfg.train.max_steps or stop
        asked = self.stop_now and not last  # at the last step finishing is the better checkpoint
        if (every and state.step % every == 0) or (last and cfg.train.checkpoint_at_end) or asked:
            self.rt.save_and_report(self.engine, state, {"step": state.step, "loss": m["loss"]})
        if asked:
            signal_name = self.stop.signal_name or "SIGTERM on another rank"
            if self.rt.rank == 0:
                say(f"[train] stopped by {signal_name} after step {state.step}/{cfg.train.max_steps}: checkpoint "
                    "saved; the same command resumes from it")
            self.tracker.finish("KILLED")
            raise TrainingStopped(state.step, signal_name)
        if stop and self.rt.rank == 0:
            say(f"[train] early stop at step {state.step}: eval loss {m['eval_loss']:.4f}, best "
                f"{self.early_stop.best:.4f} {self.early_stop.patience} evaluations ago (train.early_stop_patience)")
        return stop

    def finish(self) -> TrainResult:
        """The final evaluation (when none ran during training), the export in the published
        layout, the run's pictures; the tracking run closed."""
        cfg, rt, state = self.cfg, self.rt, self.state
        if not cfg.train.eval_every:
            final_eval = evaluate(self.engine, rt.val_batches(), cfg.train.eval_batches, self.device, rt.world_size)
            if final_eval:
                self.tracker.log_metrics(final_eval, state.step)
                self.history.append({"step": state.step, **final_eval})
        if cfg.train.export:
            exported = export_model(self.engine, self.ep_info, cfg, self.out_root / "final_model", rt.rank)
            if exported is not None:
                self.tracker.log_artifact(exported, "final_model")
                say(f"[train] exported {exported}")
        if rt.rank == 0:
            log_training_pictures(self.out_root, self.tracker)
        self.tracker.finish()
        return TrainResult(self.history, self.engine, self.ep_info, state.mlflow_run_id)


def resume_state(engine: Any, cfg: TrainConfig, rt: Runtime) -> ResumeState:
    """The state of the newest checkpoint the runtime offers (weights restored into ``engine``),
    else a fresh one."""
    fingerprint = cfg.fingerprint()
    with rt.resume_dir() as ckpt_dir:
        if ckpt_dir is None:
            return ResumeState(config_fingerprint=fingerprint)
        state = checkpoint.load(engine, Path(ckpt_dir), fingerprint)
        if rt.rank == 0:
            say(f"[train] resumed from {ckpt_dir} at step {state.step}, data {state.data}")
        return state


def open_tracking(tracker: Tracker, state: ResumeState, cfg: TrainConfig) -> None:
    """Open (or re-open after a resume) the run's MLflow run; the first time, log the config and
    the data's manifest and curation report."""
    first_open = state.mlflow_run_id is None
    state.mlflow_run_id = tracker.start(state.mlflow_run_id, cfg.flat())
    if first_open:
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        if cfg.data.path:
            for name in ("manifest.json", "report.json", "report.html"):
                p = Path(cfg.data.path) / name
                if p.exists():
                    tracker.log_artifact(p, "data")


def expert_load_metrics(counts_LE: torch.Tensor, ep_size: int) -> dict[str, float]:
    """Per layer and mean: busiest expert / average (1.0 = balanced); with EP the same for each
    EP rank's block of experts (what every EP rank waits for)."""
    per_layer = expert_imbalance(counts_LE)
    m = {f"expert_imbalance/layer{i}": r for i, r in enumerate(per_layer)}
    m["expert_imbalance/mean"] = sum(per_layer) / len(per_layer)
    if ep_size > 1:
        ranks = expert_imbalance(counts_LE, counts_LE.shape[1] // ep_size)
        m["expert_imbalance/ep_rank_mean"] = sum(ranks) / len(ranks)
    return m
