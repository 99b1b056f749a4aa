"""The typed root training config: one dataclass per component, loaded from YAML.

Each component receives only its own section (``cfg.optim`` goes to ``pipeline.parallel.optim``,
``cfg.tracking`` to ``pipeline.tracking``, ...). The model itself is named by a preset of
``model.TimeMoeConfig`` plus field overrides, so the model config stays owned by ``model/``.

YAML layout (every key optional; see ``configs/tiny-cpu.yaml``)::

    model:    {preset: tiny, overrides: {num_hidden_layers: 2}}
    data:     {path: /data/packed, loader: ray, prefetch_batches: 4}
    optim:    {lr: 1.0e-3, warmup_steps: 100, min_lr_ratio: 0.1, ...}
    parallel: {zero_stage: 1, ep_size: 1, precision: auto, ...}
    train:    {max_steps: 1000, global_batch_size: 64, micro_batch_size: 8, ...}
    scaling:  {num_workers: 2, use_gpu: false, cpus_per_worker: 0.5, max_failures: 1,
               resources_per_worker: {trainer: 1}}
    tracking: {tracking_uri: null, experiment: timemoe-pretrain}

Command-line overrides use dotted keys: ``train.max_steps=20 optim.lr=3e-4``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import typed_config
from typed_config import ConfigError


@dataclass
class ModelSection:
    preset: str = "tiny"  # a name known to model.TimeMoeConfig.preset
    overrides: dict[str, Any] = field(default_factory=dict)  # TimeMoeConfig field -> value
    # start from these weights (a save_pretrained directory: a published checkpoint, a previous
    # run's final_model) instead of a fresh init; preset + overrides must describe the same shape
    init_from: str = ""


@dataclass
class DataSection:
    path: str = ""  # packed-shard root (local folder or s3://...), holding manifest.json
    loader: str = "ray"  # "ray": Ray Data shards (Ray Train); "plain": pyarrow reader per worker
    prefetch_batches: int = 4  # batches the iterator prepares ahead so the step never waits
    # batches read ahead by a background thread, across epoch boundaries too: a new epoch of Ray
    # Data shards starts a new execution (seconds), which then overlaps the end of the last one;
    # 0 = batches are read in the step's own thread
    lookahead_batches: int = 32


@dataclass
class OptimSection:
    lr: float = 1e-3  # paper recipe
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class ParallelSection:
    zero_stage: int = 1  # 1, 2 (expert parallel allowed) or 3 (no EP; MoE blocks are Z3 leaves)
    ep_size: int = 1
    # EP only: pipeline each MoE layer in this many chunks of tokens (pipeline.parallel.ep_dispatch), so
    # the exchanges of one chunk overlap the experts of the next. 1 = no pipelining. Each chunk
    # adds ~150 kernel launches per layer, which cost more than any exchange inside one NVLink host
    # could hide (docs/expert_parallel.md): leave 1 unless the exchange is slow.
    ep_chunks: int = 1
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or "fp32" / "bf16"
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class FinetuneSection:
    """Which weights train (``pipeline.train.adapters``): ``full``; ``linear_probe`` (the output
    heads only); ``lora`` (low-rank updates of the attention and expert projections, heads full)."""

    method: Literal["full", "linear_probe", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0


@dataclass
class TrainSection:
    max_steps: int = 100  # optimizer steps
    global_batch_size: int = 8  # windows per optimizer step, all workers and accumulation
    micro_batch_size: int = 4  # windows per worker per forward
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest N complete checkpoints stay on disk (both runtimes); 0: all
    output_dir: str = "runs/pretrain"  # checkpoints, exported model, worker pid files
    export: bool = True  # save_pretrained the final model to <output_dir>/final_model
    checkpoint_at_end: bool = True  # False for throughput benchmarks (an ultra checkpoint is ~30 GB)
    # (first, last) optimizer steps to profile on every rank (torch.profiler); summary per rank
    # in <output_dir>/profile/ (pipeline.train.profiling). Empty: no profiling.
    profile_steps: tuple[int, ...] = ()
    # A step whose loss or gradient norm is not finite is skipped (the optimizer does not apply it),
    # counted and logged; this many in a row stop the run with an error. 0: never stop.
    max_nonfinite_in_row: int = 5
    # Stop when the held-out loss (evaluated every eval_every steps) has not improved for this
    # many evaluations in a row; 0: train all max_steps.
    early_stop_patience: int = 0


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional so Ray Data tasks can still schedule (stack.md)
    max_failures: int = 0  # Ray Train restarts the worker group from the latest checkpoint
    # Extra Ray custom resources each worker asks for, on top of CPU (cpus_per_worker) and GPU
    # (use_gpu): ``{trainer: 1}`` places the workers on the cluster's gpu_trainer nodes
    # (cluster.yaml, docs/cluster.md "Placing work"). Empty: any node with the CPU/GPU.
    resources_per_worker: dict[str, float] = field(default_factory=dict)


@dataclass
class TrackingSection:
    enabled: bool = True
    tracking_uri: str | None = None  # else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in cwd (pipeline.tracking)
    experiment: str = "timemoe-pretrain"
    run_name: str | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return typed_config.to_yaml(self)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 0.001, "model.overrides.num_experts": 8, ...}`` for MLflow params, secrets
        in URIs redacted."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return typed_config.redact(out)  # MLflow parameters: no credentials

    def fingerprint(self) -> str:
        """Hash of what a resumed run must share with the run that wrote the checkpoint:
        model, optimiser, batch geometry, seed and parallel layout (not step counts, logging,
        paths or tracking, which may legitimately change on resume)."""
        keep = {
            "model": dataclasses.asdict(self.model),
            "optim": {k: v for k, v in dataclasses.asdict(self.optim).items() if k != "warmup_steps"},
            "parallel": {"zero_stage": self.parallel.zero_stage, "ep_size": self.parallel.ep_size},
            "batch": [self.train.global_batch_size, self.train.micro_batch_size, self.train.seed],
            "workers": self.scaling.num_workers,
        }
        if self.finetune.method != "full":  # pretraining runs keep the fingerprints they had
            keep["finetune"] = dataclasses.asdict(self.finetune)
        return hashlib.sha256(json.dumps(typed_config.to_plain(keep), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        p, t = self.parallel, self.train
        if t.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0 (0 keeps all), got {t.keep_checkpoints}")
        if p.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 0..3, got {p.zero_stage}")
        if self.finetune.method == "lora" and (p.zero_stage == 3 or p.ep_size > 1):
            raise ValueError("finetune.method=lora needs ZeRO stage 0-2 and parallel.ep_size=1 (the low-rank updates "
                             "adapt whole weights, which ZeRO-3 and expert parallelism shard)")
        if self.finetune.lora_rank < 1:
            raise ValueError(f"finetune.lora_rank must be >= 1, got {self.finetune.lora_rank}")
        if p.zero_stage == 3 and p.ep_size > 1:
            raise ValueError("parallel.ep_size > 1 needs ZeRO stage 1 or 2 (DeepSpeed refuses MoE groups under ZeRO-3)")
        if p.ep_chunks < 1:
            raise ValueError(f"parallel.ep_chunks must be >= 1, got {p.ep_chunks}")
        if p.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"parallel.precision must be auto, fp32 or bf16, got {p.precision!r}")
        if self.data.loader not in ("ray", "plain"):
            raise ValueError(f"data.loader must be 'ray' or 'plain', got {self.data.loader!r}")
        if t.profile_steps and (len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]):
            raise ValueError(f"train.profile_steps must be [first, last] with 1 <= first <= last, got {list(t.profile_steps)}")
        if t.early_stop_patience and not t.eval_every:
            raise ValueError("train.early_stop_patience needs train.eval_every > 0 (it watches the held-out loss)")
        if t.max_steps < 1 or t.micro_batch_size < 1:
            raise ValueError("train.max_steps and train.micro_batch_size must be >= 1")
        extra = self.scaling.resources_per_worker
        if not isinstance(extra, dict):
            raise ValueError(f"scaling.resources_per_worker must be a mapping like {{trainer: 1}}, got {extra!r}")
        for name, amount in extra.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"scaling.resources_per_worker: set {name} through "
                                 f"scaling.{'cpus_per_worker' if name == 'CPU' else 'use_gpu'}, not here")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"scaling.resources_per_worker[{name!r}] must be a number > 0, got {amount!r}")

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size x workers = {self.train.micro_batch_size} x {world_size}"
            )
        return self.train.global_batch_size // per_step


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """A validated ``TrainConfig`` from plain data (every value type-checked, ``typed_config``)."""
    cfg = typed_config.build(TrainConfig, data, where)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides;
    an error names the file or the override it came from."""
    cfg = typed_config.load(TrainConfig, path, overrides)
    try:
        cfg.validate()
    except ValueError as err:
        source = f"{path}" if path is not None else "config"
        if overrides:
            source += f" with overrides {' '.join(overrides)}"
        raise ConfigError(f"{source}: {err}") from None
    return cfg
