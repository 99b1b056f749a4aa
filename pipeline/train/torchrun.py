"""The same training loop without Ray, for GPU boxes that lack it::

    torchrun --nproc-per-node 8 -m pipeline.train.torchrun --config configs/timemoe-50m.yaml \\
        --data /data/packed train.max_steps=200

Reads shards with the plain pyarrow reader; checkpoints go to ``<output_dir>/checkpoints/``
(shared by all ranks), and ``--resume`` continues from the newest complete one. SIGTERM (a
scheduler's time limit or preemption) stops every rank at the next step's end with a checkpoint
and exit code 143; the same command with ``--resume`` goes on from there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig, load_config
from pipeline.train import checkpoint, data
from pipeline.train.checkpoint import ResumeState
from pipeline.train.loop import run_training
from pipeline.train.stop_request import STOPPED_EXIT_CODE, TrainingStopped


def checkpoint_root(output_dir: str | Path) -> Path:
    """Where a run's checkpoints go in this runtime (one ``step<N>`` folder each)."""
    return Path(output_dir) / "checkpoints"


class TorchrunRuntime:
    def __init__(self, cfg: TrainConfig, resume: bool):
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512"), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # plain `python -m` = a world of one
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.use_gpu = cfg.scaling.use_gpu
        if self.use_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.ckpt_root = checkpoint_root(cfg.train.output_dir)
        self.resume = resume
        self.reader = data.PlainReader(data.shard_files(cfg.data.path, data.TRAIN_DIR), cfg.train.micro_batch_size,
                                       self.rank, self.world_size, cfg.train.seed)

    def train_epoch(self, epoch: int, skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        return data.plain_batches(self.reader, epoch, skip_batches, self.cfg.data.prefetch_batches)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]] | None:
        files = data.shard_files(self.cfg.data.path, data.VAL_DIR)
        if not files:
            return None
        reader = data.PlainReader(files, self.cfg.train.micro_batch_size, self.rank, self.world_size, 0, shuffle=False)
        return data.plain_batches(reader, 0, 0, 0)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        yield checkpoint.latest_local(self.ckpt_root) if self.resume else None

    def save_and_report(self, engine: Any, state: ResumeState, metrics: dict[str, float]) -> None:
        checkpoint.save(engine, self.ckpt_root / f"step{state.step:08d}", state)
        if self.cfg.train.keep_checkpoints:
            if dist.is_initialized() and self.world_size > 1:
                dist.barrier()  # every rank's part of the new checkpoint is on disk before an old one goes
            if self.rank == 0:
                checkpoint.prune_local(self.ckpt_root, self.cfg.train.keep_checkpoints)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        print(cfg.to_yaml(), flush=True)
    code = 0
    try:
        run_training(cfg, TorchrunRuntime(cfg, args.resume))
    except TrainingStopped:  # every rank stopped at the same step, after its checkpoint
        code = STOPPED_EXIT_CODE
    if dist.is_initialized():  # all ranks leave together; a group left to exit can abort the process
        dist.barrier()
        dist.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
