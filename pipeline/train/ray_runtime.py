"""Ray Train wiring: the TorchTrainer around ``pipeline.train.loop``.

Ray builds the world around the plain loop function: workers (fractional CPUs on CPU hosts so
Ray Data tasks still schedule), dataset shards, checkpoint storage and restarts. Checkpoints:
every worker saves its ZeRO partition into its own temporary directory and reports it; Ray
merges them into ``<output_dir>/ray/<name>/checkpoint_*``. After a worker dies, Ray restarts
the whole group (``FailureConfig(max_failures)``) and the loop restores from the latest
checkpoint. ``--resume`` re-runs under the same name and storage path, which Ray Train V2
restores from its run snapshot.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.config import TrainConfig, config_from_dict
from pipeline.console import init_ray
from pipeline.train import checkpoint, data
from pipeline.train.checkpoint import ResumeState
from pipeline.train.loop import run_training

RUN_NAME = "pretrain"


def _quiet_report_lines() -> None:
    """Ray 2.60 names the logger of Ray Train's report module after its file path, so
    ``RunConfig.logging_config`` does not reach it: every rank's "Reporting training result"
    INFO line (one per checkpoint) would still come, late, to the job log."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quieten
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class RayRuntime:
    """The loop's view of a Ray Train worker."""

    def __init__(self, cfg: TrainConfig):
        import ray.train

        ctx = ray.train.get_context()
        _quiet_report_lines()
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.use_gpu = cfg.scaling.use_gpu
        self._reader, self._train_shard = None, None
        if cfg.data.loader == "plain":
            self._reader = data.PlainReader(data.shard_files(cfg.data.path, data.TRAIN_DIR), cfg.train.micro_batch_size,
                                            self.rank, self.world_size, cfg.train.seed)
        else:  # taken here, in the worker's own thread: epochs may be opened by the loop's read-ahead thread
            self._train_shard = ray.train.get_dataset_shard("train")

    def train_epoch(self, epoch: int, skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        d = self.cfg.data
        if self._reader is not None:
            return data.plain_batches(self._reader, epoch, skip_batches, d.prefetch_batches)
        it = data.ray_batches(self._train_shard, self.cfg.train.micro_batch_size, d.prefetch_batches)
        for _ in range(skip_batches):  # exact: the split order is deterministic (see pipeline.train.data)
            next(it)
        return it

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]] | None:
        import ray.train

        if self.cfg.data.loader == "plain":
            files = data.shard_files(self.cfg.data.path, data.VAL_DIR)
            if not files:
                return None
            reader = data.PlainReader(files, self.cfg.train.micro_batch_size, self.rank, self.world_size, 0, shuffle=False)
            return data.plain_batches(reader, 0, 0, 0)
        try:
            shard = ray.train.get_dataset_shard("val")
        except KeyError:
            return None
        return None if shard is None else data.ray_batches(shard, self.cfg.train.micro_batch_size, 1)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def save_and_report(self, engine: Any, state: ResumeState, metrics: dict[str, float]) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-rank{self.rank}-"))
        try:
            checkpoint.save(engine, tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"checkpoint_step{state.step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What Ray Train runs on every worker (config = ``TrainConfig.to_dict()``)."""
    cfg = config_from_dict(config)
    run_training(cfg, RayRuntime(cfg))


def run_ray(cfg: TrainConfig, resume: bool = False) -> Any:
    """Launch ``cfg.scaling.num_workers`` Ray Train workers; return Ray's ``Result``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray()  # RAY_ADDRESS set -> connect to that cluster; else a local instance
    # Ray Train 2.60 starts a PreemptionWatcher actor per worker group, whose creation logs an
    # error-level line on every run ("has constructor arguments in the object store and
    # max_restarts > 0"); it only relaxes collective timeouts while a spot node drains. Off
    # unless asked for (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 on clusters of preemptible nodes).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    out = Path(cfg.train.output_dir).resolve()
    storage = out / "ray"
    if (storage / RUN_NAME).exists() and not resume:
        raise FileExistsError(f"{storage / RUN_NAME} holds an earlier run: pass --resume to continue it, "
                              "or choose another train.output_dir")
    cfg.train.output_dir = str(out)  # workers may run in another cwd
    datasets = data.ray_datasets(cfg.data.path) if cfg.data.loader == "ray" else {}
    s = cfg.scaling
    # CPU and GPU from their own knobs; custom resources (e.g. {"trainer": 1}) place the workers
    # on the node type that advertises them (cluster.yaml, docs/cluster.md "Placing work").
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {}) | dict(s.resources_per_worker)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            # Ray Train's INFO lines (each rank's checkpoint path and report, per checkpoint)
            # reach the job log late and out of order; the loop's own lines say the same.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=data.ray_data_config(),
    )
    return trainer.fit()


def training_run_id(result: Any) -> str | None:
    """The MLflow run id stored in the final checkpoint of a Ray Train ``Result``."""
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = Path(d) / checkpoint.STATE_FILE
        if not state.exists():
            return None
        return json.loads(state.read_text()).get("mlflow_run_id")
