"""The scaling sweep on air-gapped GPU nodes: no Ray, no MLflow there; records in a file, imported later.

On the GPU node (one process per GPU, each taking every N-th trial of the same plan)::

    CUDA_VISIBLE_DEVICES=k python -m jobs.sweep --config configs/sweep-8gpu-offline.yaml \\
        --offline-records out/records-k.jsonl --shard k/8

Each process plans the trials exactly like the online sweep (``sweep.plan_trials``: same config
hashes, steps and output folders), keeps its shard, and for each trial of it trains in-process
through ``pipeline.train.loop.run_training`` with the torchrun runtime (world size 1, plain
pyarrow reader, tracking off), measures it with ``sweep.run_trial`` (held-out loss/MSE, zero-shot
subset) and appends one JSON line to the records file (``OfflineRecord``). A trial whose hash is
already in that file is skipped, so re-running the command resumes; a trial that fails writes
nothing and is tried again next time.

Where MLflow is, ``import_records`` (``python -m jobs.sweep --config ... --import-records
out/records-*.jsonl``) logs every record as a FINISHED child run of the sweep's parent run, with
the same tags and params as an online trial, so a later online run of the same sweep skips
those trials; then the report is built from MLflow as ``run_sweep`` builds it.

Nothing here imports ray or mlflow at module level; only ``import_records`` imports mlflow.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.config import config_from_dict
from pipeline.scaling_laws import report as R
from pipeline.scaling_laws.grid import format_grid
from pipeline.scaling_laws.sweep import (
    SweepConfig,
    TrainFn,
    TrialPlan,
    build_sweep_report,
    create_trial_run,
    late_expert_balance,
    open_sweep,
    plan_trials,
    run_trial,
    steady_speed,
    trial_param_values,
    trial_runs,
)
from pipeline.train.loop import run_training
from pipeline.train.stop_request import TrainingStopped
from pipeline.train.torchrun import TorchrunRuntime, checkpoint_root

RECORD_VERSION = 1
SOURCE_TAG = "scaling.source"  # on imported child runs: "offline:<records file name>"
SHARED_GPU_TAG = "scaling.trials_per_gpu"  # on imported child runs whose trial shared its GPU


# ---------------------------------------------------------------------------------------------
# Records file (JSON lines)
# ---------------------------------------------------------------------------------------------

@dataclass
class OfflineRecord:
    """One finished trial as a line of the records file."""

    sweep: str
    config_hash: str
    trial: str                     # the trial's name, e.g. "sparse-s1-4e06"
    params: dict[str, str]         # the plan's params, as the online child run logs them
    record: R.TrialRecord
    finished_at: float = field(default_factory=time.time)  # unix seconds
    host: str = field(default_factory=socket.gethostname)
    version: int = RECORD_VERSION
    # trial processes that trained on the same GPU at the same time: above 1, points_per_s and mfu
    # are this trial's share of a shared GPU (losses are unaffected); records made before: 1
    trials_per_gpu: int = 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["record"] = _finite_or_none(d["record"])  # strict JSON: NaN -> null
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "OfflineRecord":
        d = json.loads(line)
        if d.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {d.get('version')!r}, expected {RECORD_VERSION}")
        rec = dict(d["record"])
        for k in R.TrialRecord.METRICS:
            if rec.get(k) is None:
                rec[k] = math.nan
        rec["zero_shot"] = {k: (math.nan if v is None else float(v)) for k, v in (rec.get("zero_shot") or {}).items()}
        # Records written before the seed axis, routing balance and data mixture existed have
        # none of them: seed 0, no balance, mixture unknown (the TrialRecord defaults).
        for key in ("expert_balance", "train_expert_balance"):
            rec[key] = [math.nan if v is None else float(v) for v in (rec.get(key) or [])]
        rec["data_mixture"] = {k: float(v) for k, v in (rec.get("data_mixture") or {}).items()}
        rec["seed"] = int(rec.get("seed") or 0)
        known = {f.name for f in dataclasses.fields(R.TrialRecord)}
        d["record"] = R.TrialRecord(**{k: v for k, v in rec.items() if k in known})
        return cls(**d)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_records(paths: Iterable[str | Path], log: Callable[[str], None] = print) -> list[OfflineRecord]:
    """All records of the given files (missing files are empty). A line that does not parse, such
    as the last line of a file whose writer was killed mid-write, is reported and left out."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(OfflineRecord.from_json(line))
            except (ValueError, KeyError, TypeError) as exc:
                log(f"{path}:{i}: unreadable record left out ({type(exc).__name__}: {exc})")
    return out


def append_record(path: str | Path, rec: OfflineRecord) -> None:
    """One line, flushed and synced, so a crash after it cannot lose the trial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(rec.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Sharding and in-process training
# ---------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def shard_plans(plans: list[TrialPlan], index: int, count: int) -> list[TrialPlan]:
    """Every ``count``-th trial of the plan, starting at ``index`` (the plan's order is fixed:
    family, size, budget), so ``count`` processes split the grid without talking to each other."""
    return plans[index::count]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_local(train_config: dict[str, Any], checkpoint_every: int = 0) -> tuple[Any, dict[str, float]]:
    """Train one trial in this process through ``run_training`` and the torchrun runtime (world
    size 1, plain pyarrow reader, no tracking); returns (exported model, info) as
    ``sweep.train_trial`` does. A trial folder with a complete checkpoint resumes from it.

    ``checkpoint_every`` > 0 saves a resumable checkpoint every that many steps (only the newest
    kept), so that a trial cut short (a job's time limit, a lost node) goes on from there when
    its shard runs again with the same output folder; ``info["resumed_from_step"]`` says where
    this run started. Checkpoints change nothing that is trained, so they are not in the trial's
    hash."""
    import torch

    from model import TimeMoeModel

    tc = {k: dict(v) if isinstance(v, dict) else v for k, v in train_config.items()}
    tc["data"] = dict(tc.get("data") or {}, loader="plain")
    tc["tracking"] = {"enabled": False}
    if checkpoint_every > 0:
        tc["train"] = dict(tc.get("train") or {}, checkpoint_every=checkpoint_every, keep_checkpoints=1)
    cfg = config_from_dict(tc)
    cfg.scaling.num_workers = 1  # one process per trial here; the global batch is unchanged
    out = Path(cfg.train.output_dir).resolve()
    metrics_file = out / "metrics.jsonl"
    seen_lines = len(metrics_file.read_text().splitlines()) if metrics_file.exists() else 0
    if cfg.parallel.compile:
        torch._dynamo.reset()  # each trial compiles afresh (no recompile limit across trials)
    t0 = time.perf_counter()
    result = run_training(cfg, TorchrunRuntime(cfg, resume=True))
    info = {"train_seconds": time.perf_counter() - t0}
    del result  # the engine: free its GPU memory before the next trial
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    every_run, this_run = [], []
    if metrics_file.exists():
        lines = metrics_file.read_text().splitlines()
        every_run = [json.loads(line) for line in lines if line.strip()]
        this_run = every_run[sum(1 for line in lines[:seen_lines] if line.strip()):]
    # speed from this run's steps (a resumed run's wall time is its own); routing balance from the
    # trajectory the model took, where steps redone after a resume count once (the later run's)
    info.update(steady_speed(this_run))
    info["resumed_from_step"] = int(this_run[0]["step"]) - 1 if this_run else 0
    trajectory = sorted({int(m["step"]): m for m in every_run}.values(), key=lambda m: m["step"])
    info["train_expert_balance"] = late_expert_balance(trajectory)
    return TimeMoeModel.from_pretrained(str(out / "final_model")), info


# ---------------------------------------------------------------------------------------------
# The offline sweep
# ---------------------------------------------------------------------------------------------

@dataclass
class OfflineResult:
    ran: list[str]
    skipped: list[str]           # already in the records file
    failed: dict[str, str]
    records_path: Path


def run_offline(cfg: SweepConfig, records_path: str | Path, *, shard: tuple[int, int] = (0, 1),
                log: Callable[[str], None] = print, train_fn: TrainFn | None = None,
                trials_per_gpu: int = 1, checkpoint_every: int = 0) -> OfflineResult:
    """Train and measure this shard's trials in-process, appending one record per finished trial.

    ``trials_per_gpu`` (how many such processes share this GPU) is written into every record;
    ``checkpoint_every`` > 0 makes a trial cut short resume when the shard runs again
    (:func:`train_local`)."""
    if trials_per_gpu < 1:
        raise ValueError(f"trials_per_gpu must be >= 1, got {trials_per_gpu}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    train_fn = train_fn or functools.partial(train_local, checkpoint_every=checkpoint_every)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # several trial processes on one host
    records_path = Path(records_path)
    plans = plan_trials(cfg)
    mine = shard_plans(plans, *shard)
    done = {r.config_hash for r in read_records([records_path], log) if r.sweep == cfg.sweep.name}
    todo = [p for p in mine if p.config_hash not in done]
    skipped = [p.config_hash for p in mine if p.config_hash in done]
    log(format_grid([p.spec for p in mine]))
    log(f"sweep {cfg.sweep.name!r} offline, shard {shard[0]}/{shard[1]}: {len(mine)} of {len(plans)} trials, "
        f"{len(skipped)} already in {records_path} (skipped), {len(todo)} to run")
    ran, failed = [], {}
    t_all = time.perf_counter()
    for k, p in enumerate(todo, 1):
        log(f"[{k}/{len(todo)}] {p.spec.name} ({p.config_hash}): {p.steps} steps, {p.points_seen:,} points, "
            f"{p.spec.training_flops:.2e} FLOPs")
        t0 = time.perf_counter()
        try:
            record = run_trial(p, cfg.evaluation, train_fn=train_fn)
        except TrainingStopped as stopped:  # the shard ends here; the trial resumes from its checkpoint next time
            log(f"[{k}/{len(todo)}] {p.spec.name}: {stopped}")
            raise
        except Exception as exc:  # the shard goes on; nothing is written, so a re-run retries it
            failed[p.config_hash] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
            log(f"[{k}/{len(todo)}] {p.spec.name} FAILED after {time.perf_counter() - t0:.1f}s: {failed[p.config_hash]}")
            continue
        append_record(records_path, OfflineRecord(sweep=cfg.sweep.name, config_hash=p.config_hash,
                                                  trial=p.spec.name, params=trial_param_values(p), record=record,
                                                  trials_per_gpu=trials_per_gpu))
        ran.append(p.config_hash)
        # recorded: its resume points (periodic, or the one a stop request left) are not needed any more
        # (disk: ~1.6 GB at s4)
        shutil.rmtree(checkpoint_root(p.train_config["train"]["output_dir"]), ignore_errors=True)
        zs = f", zero-shot MSE {record.zs_mse:.4f}" if math.isfinite(record.zs_mse) else ""
        if record.expert_balance:
            zs += f", routing busiest/mean {record.balance_mean:.2f} (max layer {max(record.expert_balance):.2f})"
        if record.resumed_from_step:
            zs += f"; resumed from step {record.resumed_from_step} (train s and points/s are this run's)"
        log(f"[{k}/{len(todo)}] {p.spec.name} done: {p.points_seen:,} points, {time.perf_counter() - t0:.1f}s "
            f"(train {record.wall_time_s:.1f}s, {record.points_per_s:,.0f} points/s), held-out loss "
            f"{record.heldout_loss:.4f}, MSE {record.heldout_mse:.4f}{zs}")
    log(f"shard {shard[0]}/{shard[1]}: ran {len(ran)}, skipped {len(skipped)}, failed {len(failed)} "
        f"in {time.perf_counter() - t_all:.1f}s -> {records_path}")
    return OfflineResult(ran, skipped, failed, records_path)


# ---------------------------------------------------------------------------------------------
# Import into MLflow
# ---------------------------------------------------------------------------------------------

@dataclass
class ImportResult:
    parent_run_id: str
    imported: list[str]
    skipped: list[str]           # already FINISHED in MLflow (or a duplicate line)
    foreign: list[str]           # records whose hash is not in this config's plan
    report: R.ReportFiles | None


def import_records(cfg: SweepConfig, paths: Iterable[str | Path], *, report: bool = True,
                   log: Callable[[str], None] = print) -> ImportResult:
    """Log offline records as FINISHED child runs of the sweep (found or created as ``run_sweep``
    does), skip hashes already FINISHED there, then build and log the report from MLflow."""
    paths = list(paths)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"records file(s) not found: {missing}")
    records = [(rec, Path(path).name) for path in paths for rec in read_records([path], log)]
    plans = {p.config_hash: p for p in plan_trials(cfg)}
    order = {h: i for i, h in enumerate(plans)}
    runs = open_sweep(cfg)
    existing = trial_runs(runs)
    imported, skipped, foreign = [], [], []
    seen: set[str] = set()
    for rec, source in sorted(records, key=lambda rs: order.get(rs[0].config_hash, -1)):
        h = rec.config_hash
        p = plans.get(h)
        if p is None or rec.sweep != cfg.sweep.name:
            foreign.append(h)
            log(f"{rec.trial} ({h}): not a trial of sweep {cfg.sweep.name!r} with this config; left out")
            continue
        run = existing.get(h)
        if h in seen or (run is not None and run.info.status == "FINISHED"):
            skipped.append(h)
            continue
        seen.add(h)
        tag = {SOURCE_TAG: f"offline:{source}"}
        if rec.trials_per_gpu > 1:
            tag[SHARED_GPU_TAG] = str(rec.trials_per_gpu)
        end_ms = int(rec.finished_at * 1000)
        wall = rec.record.wall_time_s if math.isfinite(rec.record.wall_time_s) else 0.0
        if run is not None:  # an online attempt left it unfinished: finish it with the record
            run_id = run.info.run_id
            runs.client.update_run(run_id, status="RUNNING")
            for k, v in tag.items():
                runs.client.set_tag(run_id, k, v)
        else:
            run_id = create_trial_run(runs, cfg, p, tags=tag, start_time=end_ms - int(wall * 1000))
        R.log_trial_record(runs.client, run_id, rec.record)
        runs.client.set_terminated(run_id, "FINISHED", end_time=end_ms)
        imported.append(h)
        log(f"imported {rec.trial} ({h}) -> run {run_id}")
    finished = set(imported) | {h for h, r in existing.items() if r.info.status == "FINISHED"}
    log(f"sweep {cfg.sweep.name!r}: imported {len(imported)}, skipped {len(skipped)} (already finished), "
        f"{len(foreign)} foreign; {sum(h not in finished for h in plans)} of {len(plans)} planned trials "
        "not finished yet")
    files = build_sweep_report(cfg, runs, log) if report else None
    return ImportResult(runs.parent, imported, skipped, foreign, files)
