"""The paper's in-distribution (full-shot) protocol: a pretrained model fine-tuned for one epoch on
each benchmark's train split, then evaluated on that benchmark's test split by the zero-shot
protocol's own code (``pipeline.evaluation``), so both tables come from one harness.

Per dataset (:func:`finetune_on_benchmark`):

1. the parent (a checkpoint folder, ``models:/NAME@ALIAS`` or ``runs:/ID/PATH``) is copied to
   ``RUN/parent`` in the published layout; the run's model config is the parent's, field by field;
2. the train split becomes shards (``pipeline.finetune.data``: only the train split, ever);
3. the training loop runs as for pretraining (Ray Train + DeepSpeed, the GPU when there is one)
   from the parent's weights, with the fine-tuning method of ``train.finetune`` and the
   non-finite-step guard and early stopping of ``train``;
4. the fine-tuned and the parent model are both evaluated on the test split (the parent's score
   is the zero-shot baseline the fine-tuned model must beat);
5. optionally the fine-tuned model is registered under its own name, with its lineage (parent,
   dataset, split seen) and its scores, and promoted only if it beats the parent there.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import TimeMoeConfig
from pipeline.config import TrainConfig, load_config
from pipeline.evaluation.inference import InferenceOptions, is_model_uri, load_checkpoint
from pipeline.evaluation.protocol import EvalConfig, EvalResult
from pipeline.evaluation.registry import register_checkpoint
from pipeline.evaluation.workers import evaluate_model
from pipeline.finetune.data import ALLOWED_SPLIT, FinetuneData, benchmark_train_shards
from pipeline.parallel.parallelize import RUNTIME_FIELDS  # how the model runs, not its shape
from pipeline.tracking import experiment_id, tracking_uri
from pipeline.train.ray_runtime import run_ray, training_run_id

EARLY_STOP_HELD_OUT = 0.1  # the last tenth of the train split, when a held-out loss is watched

# the paper's Table 4 (in-distribution, averages over ETTh1/2, ETTm1/2, Weather and the four
# horizons), beside which docs/evaluation.md puts ours
PAPER_IN_DISTRIBUTION = {"TimeMoE-base": (0.306, 0.362), "TimeMoE-large": (0.304, 0.359),
                         "TimeMoE-ultra": (0.301, 0.358), "PatchTST": (0.349, 0.382),
                         "iTransformer": (0.349, 0.382), "DLinear": (0.387, 0.416)}


@dataclass
class FinetuneJob:
    parent: str                      # checkpoint folder, models:/NAME@ALIAS or runs:/ID/PATH
    benchmarks: str                  # folder of benchmark CSVs
    datasets: list[str]
    config: str = "configs/finetune-cpu.yaml"  # a TrainConfig YAML: optimiser, batch, method, scaling
    overrides: list[str] = field(default_factory=list)
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    context: int | None = None       # None: the paper's context for each horizon
    window_length: int | None = None  # None: the longest context of the evaluated horizons + the largest horizon
    epochs: float = 1.0               # the paper's protocol: one epoch
    stride: int | None = None         # between training windows (default: window_length / 4)
    eval_stride: int = 1              # test windows (1 = the paper's protocol)
    output_dir: str = "outputs/finetune"
    register_name: str | None = None
    tracking_uri: str | None = None
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    eval_workers: int | str = "auto"
    data: str | None = None           # packed output of jobs.preprocess instead of benchmarks (own_data.py)
    heldout_windows: int = 2048       # with ``data``: val windows both models are scored on


@dataclass
class DatasetOutcome:
    dataset: str
    data: FinetuneData
    run_id: str | None
    model_dir: Path
    steps: int
    seconds: float          # the training job, start-up and export included
    epoch_seconds: float    # the training steps alone (their step_time_s summed)
    fine_tuned: EvalResult
    zero_shot: EvalResult
    registered: str | None = None
    promoted: bool | None = None

    def rows(self) -> list[dict[str, Any]]:
        zs = {r.horizon: r for r in self.zero_shot.rows}
        return [{"dataset": self.dataset, "horizon": r.horizon, "context": r.context,
                 "zero_shot_mse": zs[r.horizon].mse, "zero_shot_mae": zs[r.horizon].mae,
                 "fine_tuned_mse": r.mse, "fine_tuned_mae": r.mae, "windows": r.windows}
                for r in self.fine_tuned.rows]


@dataclass
class Parent:
    path: Path      # the published layout, on local disk
    label: str      # what the lineage tags say: the URI or the folder
    max_context: int


def resolve_parent(spec: str, dest: Path, tracking: str | None) -> Parent:
    """The parent model in the published layout under ``dest`` (downloaded from MLflow when it is
    a ``models:/`` or ``runs:/`` URI)."""
    model, _ = load_checkpoint(spec, tracking)
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest)
    label = spec if is_model_uri(spec) else str(Path(spec).resolve())
    return Parent(dest, label, int(model.config.max_position_embeddings))


def finetune_config(job: FinetuneJob, parent: Parent, data: FinetuneData, out: Path,
                    base: TrainConfig | None = None) -> TrainConfig:
    """The run's TrainConfig: the job's YAML, the parent's shape and weights, the data written for
    this dataset, enough steps for ``job.epochs`` passes over it, and the job's overrides last.
    ``base``: the job's YAML with its overrides, when the caller has it already."""
    base = base or load_config(job.config, list(job.overrides))
    shape = {k: v for k, v in json.loads((parent.path / "config.json").read_text()).items()
             if k not in RUNTIME_FIELDS and k in TimeMoeConfig.preset("tiny").to_dict()}
    derived = [f"model.init_from={parent.path}", f"data.path={data.path}", f"train.output_dir={out / 'train'}",
               "train.export=true"]
    # a train split smaller than one batch (a short dataset at a long window) trains on smaller
    # batches instead of failing at its first step
    workers = base.scaling.num_workers
    per_worker = data.train_windows // workers
    if per_worker == 0:
        raise ValueError(f"{data.dataset}: {data.train_windows} training windows for {workers} workers; "
                         f"lower scaling.num_workers, --window-length or --stride")
    batch = base.train.global_batch_size
    if base.train.micro_batch_size > per_worker:
        batch = per_worker * workers
        derived += [f"train.micro_batch_size={per_worker}", f"train.global_batch_size={batch}"]
        print(f"[finetune] {data.dataset}: {data.train_windows} training windows, fewer than a batch of "
              f"{base.train.global_batch_size}: batch {batch} ({per_worker} per worker)", flush=True)
    if base.train.early_stop_patience and not data.val_windows:
        raise ValueError(f"{data.dataset}: train.early_stop_patience is set but the train split is too short "
                         f"to hold rows out for it")
    derived.append(f"train.max_steps={max(1, math.ceil(job.epochs * data.train_windows / batch))}")
    if torch.cuda.is_available():
        derived += ["scaling.use_gpu=true"]
    if job.tracking_uri:
        derived.append(f"tracking.tracking_uri={job.tracking_uri}")
    cfg = load_config(job.config, derived + list(job.overrides))
    cfg.model.overrides = {**shape, **cfg.model.overrides}  # the parent's shape; the job's own overrides win
    cfg.validate()
    return cfg


def window_length_for(job: FinetuneJob, parent: Parent) -> int:
    """Windows long enough for the longest evaluated context plus its horizon, as the model sees
    them at test time; never longer than the model's maximum context."""
    eval_cfg = EvalConfig(horizons=list(job.horizons), context=job.context)
    want = job.window_length or max(eval_cfg.context_for(h) + h for h in job.horizons)
    if want > parent.max_context:
        if job.window_length:
            raise ValueError(f"--window-length {want} is longer than the model's maximum context {parent.max_context}")
        want = parent.max_context
    return want


def finetune_on_benchmark(job: FinetuneJob, dataset: str, parent: Parent, run_root: Path) -> DatasetOutcome:
    """Fine-tune ``parent`` on ``dataset``'s train split, evaluate it and the parent on its test
    split, register when asked (module doc)."""
    out = run_root / dataset
    # rows are held out of the train split only when the run watches a held-out loss (eval_every,
    # early stopping); with train.eval_every=0 it trains on the whole split, as the paper does
    base = load_config(job.config, list(job.overrides))
    watch = base.train.eval_every > 0 or base.train.early_stop_patience > 0
    data = benchmark_train_shards(job.benchmarks, dataset, out / "data", window_length_for(job, parent),
                                  stride=job.stride, split=ALLOWED_SPLIT,
                                  early_stop_fraction=EARLY_STOP_HELD_OUT if watch else 0.0)
    child = train_child(job, parent, data, out, base)
    cfg, uri, model_dir, run_id = child.cfg, child.uri, child.model_dir, child.run_id
    eval_cfg = EvalConfig(datasets=[dataset], horizons=list(job.horizons), context=job.context,
                          stride=job.eval_stride, batch_size=job.inference.batch_size)
    fine_tuned = evaluate_model(str(model_dir), job.benchmarks, eval_cfg, job.inference, job.eval_workers, uri,
                                model_name=f"fine-tuned ({cfg.finetune.method})")
    zero_shot = evaluate_model(str(parent.path), job.benchmarks, eval_cfg, job.inference, job.eval_workers, uri,
                               model_name="parent (zero-shot)")
    outcome = DatasetOutcome(dataset, data, run_id, model_dir, cfg.train.max_steps, child.seconds,
                             child.epoch_seconds, fine_tuned, zero_shot)
    record_lineage(uri, run_id, parent, data, {**fine_tuned.metrics(prefix="in_distribution"),
                                               **zero_shot.metrics(prefix="parent_zeroshot")})
    if job.register_name:
        _register(job, cfg, parent, outcome, uri)
    return outcome


@dataclass
class TrainedChild:
    cfg: TrainConfig
    uri: str                # the tracking store the run logged to
    run_id: str | None
    model_dir: Path         # the fine-tuned model in the published layout
    seconds: float          # the training job, start-up and export included
    epoch_seconds: float    # its steps alone


def train_child(job: FinetuneJob, parent: Parent, data: FinetuneData, out: Path,
                base: TrainConfig | None = None) -> TrainedChild:
    """The fine-tuning run itself (step 3 of the module doc): its config, its tracking store, the
    training loop through Ray Train; raises when the run failed."""
    cfg = finetune_config(job, parent, data, out, base)
    uri = tracking_uri(cfg.tracking.tracking_uri, store_dir=job.output_dir)
    cfg.tracking.tracking_uri = uri
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = f"finetune-{data.dataset}-{cfg.finetune.method}"
    experiment_id(uri, cfg.tracking.experiment, Path(job.output_dir) / "mlartifacts")
    t0 = time.time()
    result = run_ray(cfg)
    if getattr(result, "error", None):
        raise RuntimeError(f"fine-tuning on {data.dataset} failed: {result.error}")
    return TrainedChild(cfg, uri, training_run_id(result), Path(cfg.train.output_dir) / "final_model",
                        time.time() - t0, steps_seconds(Path(cfg.train.output_dir) / "metrics.jsonl"))


def steps_seconds(metrics_file: Path) -> float:
    """The summed step times of a training run's ``metrics.jsonl`` (NaN when it is missing)."""
    if not metrics_file.exists():
        return float("nan")
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return sum(float(m.get("step_time_s", 0.0)) for m in lines)


def record_lineage(uri: str, run_id: str | None, parent: Parent, data: FinetuneData, metrics: dict[str, float],
                   dataset_label: str | None = None) -> None:
    """On the training run: what it started from, which data it saw (``dataset_label``, default
    the dataset's name) and its scores."""
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for k, v in {"finetune.parent": parent.label, "finetune.dataset": dataset_label or data.dataset,
                 "finetune.split": data.split, "finetune.rows": f"{data.rows[0]}:{data.rows[1]}"}.items():
        client.set_tag(run_id, k, v)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


def _register(job: FinetuneJob, cfg: TrainConfig, parent: Parent, outcome: DatasetOutcome, uri: str) -> None:
    """A version of ``job.register_name`` tagged with its lineage and scores; the ``champion``
    alias moves to it only if it beats its parent's zero-shot score on the same test windows."""
    ft, zs = outcome.fine_tuned.average_mse(), outcome.zero_shot.average_mse()
    outcome.registered, outcome.promoted = register_version(
        job.register_name, outcome.model_dir, outcome.run_id, uri, ft < zs,
        {"finetune.parent": parent.label, "finetune.dataset": outcome.dataset, "finetune.split": ALLOWED_SPLIT,
         "finetune.method": cfg.finetune.method, "finetune.protocol": outcome.fine_tuned.config.protocol_key(),
         "in_distribution.avg_mse": repr(ft), "parent_zeroshot.avg_mse": repr(zs),
         "promotion.reason": f"fine-tuned {ft:.6g} {'<' if ft < zs else '>='} parent zero-shot {zs:.6g}"})


def register_version(name: str, model_dir: Path, run_id: str | None, uri: str, better: bool,
                     tags: dict[str, str]) -> tuple[str, bool]:
    """Register ``model_dir`` as a version of ``name`` with ``tags`` and the promotion decision;
    ``champion`` moves to it only when ``better`` (it beat its parent on the same data).
    Returns ``(models:/ URI, promoted)``."""
    from mlflow.tracking import MlflowClient

    reg = register_checkpoint(model_dir, name, training_run_id=run_id, tracking_uri=uri)
    client = MlflowClient(uri)
    for k, v in {**tags, "promotion.decision": "promoted" if better else "rejected"}.items():
        client.set_model_version_tag(name, reg.version, k, v)
    if better:
        client.set_registered_model_alias(name, "champion", reg.version)
    return reg.model_uri, better


def in_distribution(job: FinetuneJob) -> dict[str, Any]:
    """Every dataset of ``job`` fine-tuned from the same parent and evaluated; writes
    ``summary.json`` and ``table.md`` under ``RUN`` and returns the summary."""
    run_root = Path(job.output_dir).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    run_root.mkdir(parents=True, exist_ok=False)
    parent = resolve_parent(job.parent, run_root / "parent", job.tracking_uri)
    outcomes = [finetune_on_benchmark(job, ds, parent, run_root) for ds in job.datasets]
    rows = [r for o in outcomes for r in o.rows()]
    avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("zero_shot_mse", "zero_shot_mae", "fine_tuned_mse",
                                                              "fine_tuned_mae")}
    summary = {"parent": parent.label, "job": {k: v for k, v in asdict(job).items() if k != "inference"},
               "inference": asdict(job.inference), "rows": rows, "average": avg,
               "datasets": {o.dataset: {"run_id": o.run_id, "steps": o.steps, "seconds": round(o.seconds, 1),
                                        "epoch_seconds": round(o.epoch_seconds, 2),
                                        "train_windows": o.data.train_windows, "model": str(o.model_dir),
                                        "registered": o.registered, "promoted": o.promoted} for o in outcomes},
               "paper_in_distribution": PAPER_IN_DISTRIBUTION}
    (run_root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_root / "table.md").write_text(table_markdown(rows, avg))
    summary["run_dir"] = str(run_root)
    return summary


def table_markdown(rows: list[dict[str, Any]], avg: dict[str, float]) -> str:
    lines = ["| dataset | horizon | zero-shot MSE | zero-shot MAE | fine-tuned MSE | fine-tuned MAE |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['horizon']} | {r['zero_shot_mse']:.4f} | {r['zero_shot_mae']:.4f} | "
              f"{r['fine_tuned_mse']:.4f} | {r['fine_tuned_mae']:.4f} |" for r in rows]
    lines.append(f"| average | | {avg['zero_shot_mse']:.4f} | {avg['zero_shot_mae']:.4f} | "
                 f"{avg['fine_tuned_mse']:.4f} | {avg['fine_tuned_mae']:.4f} |")
    lines += ["", "The paper's Table 4 (averages over ETTh1/2, ETTm1/2, Weather, 4 horizons):", "",
              "| model | MSE | MAE |", "|---|---|---|"]
    lines += [f"| {k} | {mse:.3f} | {mae:.3f} |" for k, (mse, mae) in PAPER_IN_DISTRIBUTION.items()]
    return "\n".join(lines) + "\n"
