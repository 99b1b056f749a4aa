"""The scaling sweep: sizes x budgets x {sparse, dense} trials on Ray, tracked in MLflow.

One MLflow parent run per sweep (tags ``scaling.role=sweep``, ``scaling.sweep=<name>``); one
child run per trial (``scaling.role=trial``, ``scaling.trial_hash=<hash>``). A re-run of the
same sweep finds the parent by its name, then for each trial:

* a FINISHED child with the same config hash  -> skipped;
* a child in any other state (RUNNING after a crash, FAILED, KILLED) -> resumed: the same run id
  and the same output folder (``<output_dir>/<hash>``), so the trainer restarts from its
  latest checkpoint there;
* no child -> started.

Trials run as Ray tasks with fractional resources (``resources_per_trial``), at most
``max_concurrent`` at a time; each trains through ``pipeline.train.ray_runtime``, then measures the
held-out loss/MSE on the val shards and the zero-shot metrics on a documented benchmark
subset, and logs one summary (see ``report.TrialRecord``) on its child run.

Air-gapped GPU nodes (no Ray, no MLflow) run the same plan through ``pipeline.scaling_laws.offline``:
trials train in-process through ``pipeline.train.loop.run_training`` and their records go to a
JSON-lines file, which ``offline.import_records`` later logs as FINISHED child runs with the
bookkeeping below (``open_sweep``, ``create_trial_run``, ``trial_runs``, ``build_sweep_report``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import typed_config
from pipeline.config import TrainSection, config_from_dict
from pipeline.evaluation import protocol as evaluation
from pipeline.evaluation.inference import InferenceOptions, ModelForecaster
from pipeline.scaling_laws import report as R
from pipeline.scaling_laws.grid import GridConfig, TrialSpec, expand_grid, format_grid
from pipeline.scaling_laws.inference import read_measurements
from pipeline.tracking import experiment_id, tracking_uri
from pipeline.train import ray_runtime as trainer
from pipeline.train.validation import heldout_measures
from preprocessing.storage import resolve_filesystem


@dataclass
class EvalSection:
    """What each trial measures after training."""

    heldout_windows: int = 256       # val windows for held-out loss / MSE (first N, fixed order)
    heldout_batch_size: int = 16
    zero_shot_datasets: tuple[str, ...] = ("ETTh1",)  # quick subset of the paper's Table 3
    zero_shot_horizons: tuple[int, ...] = (96,)
    zero_shot_stride: int = 16      # every stride-th test window (1 = the paper's full protocol)
    zero_shot_context: int | None = None  # None: the paper's context for the horizon (512 at 96)
    zero_shot_data_dir: str | None = None  # folder with the benchmark CSVs; None: skip zero-shot
    zero_shot_device: str = "auto"  # pipeline.evaluation.inference: the trial's GPU when it has one
    zero_shot_dtype: str = "auto"   # bf16 on a GPU, fp32 on CPU
    report_n_boot: int = 200
    # benchmarks/evaluate_gpu.py --grid JSON of this grid's shapes: the report then tabulates their
    # measured inference cost and times the comparison at equal loss (pipeline.scaling_laws.inference)
    report_inference_json: str | None = None


@dataclass
class SweepSection:
    name: str = "scaling"
    experiment: str = "timemoe-scaling"
    tracking_uri: str | None = None  # else $MLFLOW_TRACKING_URI
    output_dir: str = "runs/sweep"  # trial folders <output_dir>/<hash>, the report in <output_dir>/report
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass
class SweepConfig:
    sweep: SweepSection
    grid: GridConfig
    training: dict[str, Any]  # pipeline.config.TrainConfig sections except model and tracking
    evaluation: EvalSection = field(default_factory=EvalSection)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepConfig":
        return cls.from_dict(typed_config.read_yaml(path), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "SweepConfig":
        """Every section type-checked (``typed_config``); ``training`` is checked per trial, when
        the sweep merges it into each trial's ``pipeline.config.TrainConfig``."""
        unknown = set(data) - {"sweep", "grid", "training", "evaluation"}
        if unknown:
            raise typed_config.ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}; "
                                           "expected sweep, grid, training, evaluation")
        training = dict(data.get("training") or {})
        for reserved in ("model", "tracking"):
            if reserved in training:
                raise typed_config.ConfigError(f"{where}: training.{reserved} is set by the sweep per trial; remove it")
        return cls(sweep=typed_config.build(SweepSection, data.get("sweep"), where, "sweep"),
                   grid=GridConfig.from_dict(data.get("grid") or {}, where),
                   training=training, evaluation=typed_config.build(EvalSection, data.get("evaluation"), where, "evaluation"))


# ---------------------------------------------------------------------------------------------
# Planning: trial spec -> training config
# ---------------------------------------------------------------------------------------------

@dataclass
class TrialPlan:
    spec: TrialSpec
    config_hash: str
    train_config: dict[str, Any]  # a full TrainConfig as a dict
    steps: int
    points_seen: int  # realised: steps x global batch x window length


def _model_overrides(spec: TrialSpec, base_preset: str) -> dict[str, Any]:
    """The trial's model as preset + the fields that differ from it (readable in MLflow)."""
    from model import TimeMoeConfig

    base = dataclasses.asdict(TimeMoeConfig.preset(base_preset))
    out = {}
    for k, v in spec.model.items():
        b = base.get(k)
        if (list(b) if isinstance(b, tuple) else b) != v:
            out[k] = v
    return out


def plan_trials(cfg: SweepConfig) -> list[TrialPlan]:
    """Expand the grid and turn each budget (points) into whole optimizer steps."""
    training = dict(cfg.training)
    specs = expand_grid(cfg.grid, training=training)
    gbs = int((training.get("train") or {}).get("global_batch_size", 8))
    per_step = gbs * cfg.grid.window_length
    root = Path(cfg.sweep.output_dir)
    plans = []
    for spec in specs:
        steps = max(1, math.ceil(spec.budget_points / per_step))
        h = spec.config_hash()
        tc = {k: dict(v) if isinstance(v, dict) else v for k, v in training.items()}
        tc["model"] = {"preset": cfg.grid.base_preset, "overrides": _model_overrides(spec, cfg.grid.base_preset)}
        train = dict(tc.get("train") or {}, max_steps=steps, output_dir=str(root / h))
        if spec.seed:  # seed 0 keeps the sweep's own train.seed (and the hash of a sweep without seeds)
            train["seed"] = int(train.get("seed", TrainSection.seed)) + spec.seed
        tc["train"] = train
        tc["tracking"] = {"enabled": False}  # the sweep owns the child run and logs the summary
        plans.append(TrialPlan(spec=spec, config_hash=h, train_config=tc, steps=steps,
                               points_seen=steps * per_step))
    return plans


# ---------------------------------------------------------------------------------------------
# One trial: train, measure, summarise (runs inside a Ray task)
# ---------------------------------------------------------------------------------------------

def late_expert_balance(steps: list[dict[str, Any]], share: float = 0.25) -> list[float]:
    """Per layer, the training loop's logged routing balance (``expert_imbalance/layer<i>``)
    averaged over the last ``share`` of the steps: where routing has settled, not its start."""
    steps = [s for s in steps if "expert_imbalance/layer0" in s]
    if not steps:
        return []
    late = steps[-max(1, math.ceil(share * len(steps))):]
    n_layers = sum(1 for k in late[0] if k.startswith("expert_imbalance/layer"))
    return [float(np.mean([s[f"expert_imbalance/layer{i}"] for s in late])) for i in range(n_layers)]


def data_mixture(data_path: str) -> dict[str, float]:
    """Training points by provenance kind ("real", "synthetic/<generator>") from the packed data's
    preprocessing report (``report.json``, block ``provenance``); {} when the report predates it."""
    fs, path = resolve_filesystem(data_path.rstrip("/") + "/report.json")
    try:
        with fs.open_input_stream(path) as f:
            rep = json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return {}
    return {kind: float(c["points_kept"] - c.get("points_val", 0)) for kind, c in (rep.get("provenance") or {}).items()}


def zero_shot_metrics(model: Any, ev: EvalSection) -> dict[str, float]:
    """Zero-shot MSE/MAE on the configured benchmark subset through ``pipeline.evaluation.protocol``
    (the paper's protocol; ``zero_shot_stride`` > 1 keeps every stride-th test window, the
    quick documented subset), on ``zero_shot_device`` in ``zero_shot_dtype`` (the model is moved
    and cast in place: call it last)."""
    if not ev.zero_shot_data_dir or not ev.zero_shot_datasets:
        return {}
    cfg = evaluation.EvalConfig(datasets=list(ev.zero_shot_datasets), horizons=list(ev.zero_shot_horizons),
                                context=ev.zero_shot_context, stride=ev.zero_shot_stride, progress=False)
    options = InferenceOptions(device=ev.zero_shot_device, dtype=ev.zero_shot_dtype)
    res = evaluation.evaluate(ModelForecaster(model, options, name="trial"), ev.zero_shot_data_dir, cfg)
    out = {f"zs/{r.dataset}/{r.horizon}/{m}": float(getattr(r, m)) for r in res.rows for m in ("mse", "mae")}
    out["zs_mse"] = float(np.mean([r.mse for r in res.rows]))
    out["zs_mae"] = float(np.mean([r.mae for r in res.rows]))
    return out


TrainFn = Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]]


def train_trial(train_config: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Train one trial through the Ray Train launcher (``pipeline.train.ray_runtime.run_ray``);
    returns (exported model, info).

    The single adapter to the trainer. A folder that already holds this trial's Ray run is
    resumed (the trainer restores from its latest checkpoint). ``info`` has ``train_seconds``
    and, from the loop's ``metrics.jsonl``, the median steady-state ``points_per_s`` and ``mfu``.
    """
    from model import TimeMoeModel

    cfg = config_from_dict(train_config)
    out = Path(cfg.train.output_dir).resolve()
    resume = (out / "ray" / trainer.RUN_NAME).exists()
    t0 = time.perf_counter()
    trainer.run_ray(cfg, resume=resume)
    info = {"train_seconds": time.perf_counter() - t0}
    steps = []
    metrics_file = out / "metrics.jsonl"
    if metrics_file.exists():
        steps = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    info.update(steady_speed(steps))
    info["train_expert_balance"] = late_expert_balance(steps)
    return TimeMoeModel.from_pretrained(str(out / "final_model")), info


def steady_speed(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Median ``points_per_s`` and ``mfu`` of a trial's step metrics, without the first step
    (it pays for compilation and warm-up)."""
    steps = [s for s in steps if "points_per_s" in s]
    steady = steps[1:] or steps
    out = {}
    for key in ("points_per_s", "mfu"):
        vals = [s[key] for s in steady if key in s]
        if vals:
            out[key] = float(np.median(vals))
    return out


def run_trial(plan: TrialPlan, ev: EvalSection, *, train_fn: TrainFn | None = None) -> R.TrialRecord:
    """Train and measure one trial; returns its summary record (not yet logged)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    model, info = (train_fn or train_trial)(plan.train_config)
    if (plan.train_config.get("scaling") or {}).get("use_gpu") and torch.cuda.is_available():
        model = model.to("cuda")  # the exported model loads on CPU; measure where it trained
    data_path = plan.train_config["data"]["path"]
    held = heldout_measures(model, data_path, ev.heldout_windows, ev.heldout_batch_size)
    zs = zero_shot_metrics(model, ev)
    seconds = float(info["train_seconds"])
    pps = float(info.get("points_per_s", plan.points_seen / seconds if seconds > 0 else math.nan))
    util = float(info.get("mfu", math.nan)) if torch.cuda.is_available() else math.nan
    return R.TrialRecord(
        family=plan.spec.family, size=plan.spec.size, trial_hash=plan.config_hash,
        n_total=plan.spec.n_total, n_active=plan.spec.n_active, points_seen=plan.points_seen,
        training_flops=plan.spec.flops_per_point * plan.points_seen,
        heldout_loss=held.loss, heldout_mse=held.mse, zs_mse=zs.pop("zs_mse", math.nan),
        zs_mae=zs.pop("zs_mae", math.nan), wall_time_s=seconds, points_per_s=pps, mfu=util, zero_shot=zs,
        seed=plan.spec.seed, expert_balance=held.expert_balance,
        train_expert_balance=[float(b) for b in info.get("train_expert_balance", [])],
        data_mixture=data_mixture(data_path),
        resumed_from_step=int(info.get("resumed_from_step", 0)),
    )


# ---------------------------------------------------------------------------------------------
# The sweep: MLflow bookkeeping + Ray scheduling
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    parent_run_id: str
    ran: list[str]      # trial hashes trained in this invocation
    skipped: list[str]  # already FINISHED
    resumed: list[str]  # existed unfinished, run again in the same run/folder
    failed: dict[str, str]
    report: R.ReportFiles | None


def _parent_run(client: Any, exp_id: str, cfg: SweepConfig) -> str:
    existing = R.find_sweep_run(client, exp_id, cfg.sweep.name)
    if existing is not None:
        return existing.info.run_id
    run = client.create_run(exp_id, run_name=f"sweep-{cfg.sweep.name}",
                            tags={R.ROLE_TAG: R.ROLE_SWEEP, R.SWEEP_TAG: cfg.sweep.name})
    g = cfg.grid
    client.log_param(run.info.run_id, "sizes", ",".join(f"{s.name}:{s.num_hidden_layers}x{s.hidden_size}" for s in g.sizes))
    client.log_param(run.info.run_id, "budgets", ",".join(str(b) for b in g.budgets))
    client.log_param(run.info.run_id, "families", ",".join(g.families))
    client.log_param(run.info.run_id, "window_length", g.window_length)
    return run.info.run_id


@dataclass
class SweepRuns:
    """The MLflow side of one sweep: client, tracking URI, experiment id, parent run id."""

    client: Any
    uri: str | None
    exp_id: str
    parent: str


def open_sweep(cfg: SweepConfig) -> SweepRuns:
    """Find or create the sweep's experiment and parent run (by sweep name)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.sweep.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.sweep.experiment)
    return SweepRuns(client, uri, exp_id, _parent_run(client, exp_id, cfg))


def trial_runs(runs: SweepRuns) -> dict[str, Any]:
    """The sweep's existing child runs by config hash."""
    return {r.data.tags.get(R.HASH_TAG): r for r in R.child_runs(runs.client, runs.exp_id, runs.parent)}


def create_trial_run(runs: SweepRuns, cfg: SweepConfig, p: TrialPlan, *, tags: dict[str, str] | None = None,
                     start_time: int | None = None) -> str:
    """A new child run for a planned trial: the tags the skip/resume logic matches on, and the
    trial's parameters."""
    run_id = runs.client.create_run(runs.exp_id, run_name=p.spec.name, start_time=start_time, tags={
        "mlflow.parentRunId": runs.parent, R.ROLE_TAG: R.ROLE_TRIAL, R.HASH_TAG: p.config_hash,
        R.FAMILY_TAG: p.spec.family, R.SWEEP_TAG: cfg.sweep.name, **(tags or {})}).info.run_id
    runs.client.log_batch(run_id, params=_trial_params(p))
    return run_id


def report_inference(ev: EvalSection, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The measured inference cost named by ``evaluation.report_inference_json``; one that cannot
    be read is named in the log and left out, so a sweep's report never fails on it."""
    if not ev.report_inference_json:
        return None
    try:
        return read_measurements(ev.report_inference_json)
    except ValueError as exc:
        log(f"report: the measured inference cost is left out: {exc}")
        return None


def build_sweep_report(cfg: SweepConfig, runs: SweepRuns, log: Callable[[str], None] = print) -> R.ReportFiles | None:
    """The report from the sweep's FINISHED children in MLflow, logged on the parent run."""
    _, records = R.load_trials(cfg.sweep.experiment, runs.uri, cfg.sweep.name)
    if len(records) < 3:
        log(f"report skipped: {len(records)} finished trials (need >= 3)")
        return None
    files = R.build_report(records, Path(cfg.sweep.output_dir) / "report", n_boot=cfg.evaluation.report_n_boot,
                           inference=report_inference(cfg.evaluation, log))
    R.log_report(runs.uri, runs.parent, files.out_dir)
    log(f"report: {files.out_dir}")
    return files


def _trial_task(plan: TrialPlan, ev: EvalSection, tracking_uri: str | None, run_id: str,
                train_fn: TrainFn | None = None) -> tuple[str, str | None]:
    """Ray task body: train + measure + log on the child run; returns (hash, error or None)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        record = run_trial(plan, ev, train_fn=train_fn or train_trial)
    except Exception as exc:  # the sweep goes on; the child run says why
        import traceback

        client.set_tag(run_id, "scaling.error", f"{type(exc).__name__}: {exc}"[:5000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        return plan.config_hash, f"{type(exc).__name__}: {exc}"
    R.log_trial_record(client, run_id, record)
    client.set_terminated(run_id, "FINISHED")
    return plan.config_hash, None


def run_sweep(cfg: SweepConfig, *, report: bool = True, log: Callable[[str], None] = print,
              train_fn: TrainFn | None = None) -> SweepResult:
    """Run (or resume) the sweep, then build the report from MLflow and log it on the parent.

    ``train_fn(train_config_dict) -> (model, info)`` replaces the Ray Train trainer (the
    default, ``train_trial``) where a caller needs another training path.
    """
    runs = open_sweep(cfg)
    client, uri = runs.client, runs.uri

    plans = plan_trials(cfg)
    log(format_grid([p.spec for p in plans]))
    existing = trial_runs(runs)
    ran, skipped, resumed, todo = [], [], [], []
    for p in plans:
        run = existing.get(p.config_hash)
        if run is not None and run.info.status == "FINISHED":
            skipped.append(p.config_hash)
            continue
        if run is not None:
            resumed.append(p.config_hash)
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = create_trial_run(runs, cfg, p)
        todo.append((p, run_id))
    log(f"sweep {cfg.sweep.name!r}: {len(plans)} trials, {len(skipped)} finished (skipped), "
        f"{len(resumed)} to resume, {len(todo) - len(resumed)} new")

    failed: dict[str, str] = {}
    if todo:
        import ray

        if not ray.is_initialized():
            ray.init()
        task = ray.remote(_trial_task).options(num_cpus=cfg.sweep.cpus_per_trial,
                                               num_gpus=cfg.sweep.gpus_per_trial, max_retries=0)
        pending: dict[Any, tuple[TrialPlan, str]] = {}
        queue = list(todo)
        done = 0
        while queue or pending:
            while queue and len(pending) < max(1, cfg.sweep.max_concurrent):
                p, run_id = queue.pop(0)
                pending[task.remote(p, cfg.evaluation, uri, run_id, train_fn)] = (p, run_id)
            ready, _ = ray.wait(list(pending), num_returns=1)
            p, run_id = pending.pop(ready[0])
            h = p.config_hash
            try:
                h, err = ray.get(ready[0])
            except Exception as exc:  # the task itself died (worker crash, OOM, unpicklable args)
                err = f"{type(exc).__name__}: {str(exc)[:2000]}"
                client.set_tag(run_id, "scaling.error", err)
                client.set_terminated(run_id, "FAILED")
            done += 1
            if err:
                failed[h] = err
                log(f"[{done}/{len(todo)}] {p.spec.name} FAILED: {err}")
            else:
                ran.append(h)
                log(f"[{done}/{len(todo)}] {p.spec.name} finished")

    files = build_sweep_report(cfg, runs, log) if report else None
    return SweepResult(runs.parent, ran, skipped, resumed, failed, files)


def trial_param_values(p: TrialPlan) -> dict[str, str]:
    """The parameters every trial's child run carries (as MLflow stores them: strings)."""
    m = p.spec.model
    values = {"family": p.spec.family, "size": p.spec.size, "budget_points": p.spec.budget_points,
              "seed": p.spec.seed, "train_seed": p.train_config["train"].get("seed", TrainSection.seed),
              "steps": p.steps, "window_length": p.spec.window_length,
              "num_hidden_layers": m["num_hidden_layers"], "hidden_size": m["hidden_size"],
              "intermediate_size": m["intermediate_size"], "num_attention_heads": m["num_attention_heads"],
              "num_experts": m["num_experts"], "num_experts_per_tok": m["num_experts_per_tok"],
              "use_dense": m["use_dense"], "router_aux_loss_scope": m.get("router_aux_loss_scope", "pooled"),
              "flops_per_point": p.spec.flops_per_point}
    return {k: str(v) for k, v in values.items()}


def _trial_params(p: TrialPlan) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in trial_param_values(p).items()]
