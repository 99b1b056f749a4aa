"""Resume state: the DeepSpeed engine's checkpoint plus one small, explicit JSON.

A checkpoint directory holds::

    <tag>/...                 engine.save_checkpoint output (module, ZeRO partitions, scheduler)
    <tag>/experts-rank*.safetensors   with expert parallelism: each rank's own experts
    latest                    DeepSpeed's pointer to <tag>
    resume_state.json         step, data position, MLflow run id, config fingerprint

Expert parallelism: DeepSpeed's MoE checkpoint code only knows its own ``MoE`` layer layout
(``deepspeed_moe.experts.deepspeed_experts.{i}``) and writes nothing for our stacked expert
tensors, while its module file comes from rank 0 alone. So every rank saves its own expert
shard next to the engine checkpoint, DeepSpeed's MoE loading is bypassed, and each rank puts
its shard back after the engine has loaded (the parallel layout is part of the config
fingerprint, so a resume always has the same ranks). Under ZeRO-1/2 DeepSpeed also restores
the weights from each rank's fp32 master partition, which already holds the right experts
(measured: the resume test passes with or without the copy); the shard keeps a resume correct
without relying on that, e.g. for a run that loads module weights only.

Every rank writes its own ZeRO partition into the same directory (on one host, or on a shared
filesystem, or per-worker directories that Ray Train merges on upload).

Trust boundary: DeepSpeed unpickles its ``.pt`` files with ``torch.load(weights_only=False)``,
which runs any code a crafted file carries. A resume reads them with ``weights_only=True``
instead, allowing only tensors, containers and the three DeepSpeed classes its ZeRO 0-3
checkpoints hold (:data:`DEEPSPEED_CHECKPOINT_CLASSES`); anything else is refused with
:class:`UntrustedCheckpointError` before it is constructed. The JSON state and the expert shards
(safetensors) carry no code.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.train.data import DataPosition

STATE_FILE = "resume_state.json"
# what DeepSpeed 0.19's ZeRO 0-3 checkpoints (fp32/bf16, with and without expert parallelism)
# pickle besides tensors and containers: found by loading each kind with weights_only=True
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the allowed classes."""


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` of a DeepSpeed checkpoint file with ``weights_only=True`` and only the
    DeepSpeed classes of :data:`DEEPSPEED_CHECKPOINT_CLASSES` allowed (module doc)."""
    import importlib
    import pickle

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer classes to allow
            pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and DeepSpeed's known "
            f"checkpoint classes, and unpickling them could run code ({str(err).splitlines()[0]}). "
            "Resume only from checkpoints this pipeline wrote.") from None


@dataclass
class ResumeState:
    step: int = 0  # optimizer steps completed
    data: DataPosition = field(default_factory=DataPosition)
    points_seen: int = 0
    mlflow_run_id: str | None = None
    config_fingerprint: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ResumeState":
        raw = json.loads(text)
        raw["data"] = DataPosition(**raw.get("data", {}))
        return cls(**raw)


def _local_expert_params(engine: Any) -> dict[str, torch.nn.Parameter]:
    """This rank's expert-parallel parameters (marked ``allreduce=False`` by expert_parallel)."""
    return {n: p for n, p in engine.module.named_parameters() if getattr(p, "allreduce", True) is False}


def _expert_file(directory: Path, tag: str, rank: int) -> Path:
    return directory / tag / f"experts-rank{rank:05d}.safetensors"


def save(engine: Any, directory: Path, state: ResumeState) -> None:
    """Collective: every rank must call it (ZeRO partitions are per rank)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tag = f"step{state.step:08d}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"resume": asdict(state)})
    experts = _local_expert_params(engine)
    if experts:
        path = _expert_file(directory, tag, engine.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in experts.items()}, str(path))
    if engine.global_rank == 0:
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(directory / STATE_FILE)  # atomic: a half-written state never looks valid


def load(engine: Any, directory: Path, fingerprint: str) -> ResumeState:
    """Restore the engine (weights, optimizer, scheduler) and return the resume state."""
    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{directory}: no {STATE_FILE}; not a checkpoint written by pipeline.train.checkpoint")
    state = ResumeState.from_json(state_path.read_text())
    if state.config_fingerprint and state.config_fingerprint != fingerprint:
        raise ValueError(
            f"{directory}: checkpoint was written with config fingerprint {state.config_fingerprint}, "
            f"this run has {fingerprint}: model, optimiser, batch or parallel layout differ"
        )
    tag = f"step{state.step:08d}"
    experts = _local_expert_params(engine)
    had_moe = getattr(engine, "has_moe_layers", False)
    if experts:
        engine.has_moe_layers = False  # skip DeepSpeed's per-expert files (see module docstring)
    reader = engine.checkpoint_engine
    unsafe_load = reader.load
    reader.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        load_path, _ = engine.load_checkpoint(str(directory), tag=tag)
    finally:
        engine.has_moe_layers = had_moe
        reader.load = unsafe_load
    if load_path is None:
        raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint for step {state.step}")
    if experts:
        from safetensors.torch import load_file

        path = _expert_file(directory, tag, engine.global_rank)
        if not path.exists():
            raise FileNotFoundError(f"{path}: expert shard of rank {engine.global_rank} missing from the checkpoint")
        saved = load_file(str(path))
        if set(saved) != set(experts):
            raise ValueError(f"{path}: expert parameters {sorted(saved)} do not match this model's {sorted(experts)}")
        with torch.no_grad():
            for name, param in experts.items():
                param.copy_(saved[name].to(param.device, param.dtype))
    return state


def complete_local(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (torchrun mode: those with their resume
    state, written last), oldest first."""
    return sorted(p.parent for p in root.glob(f"step*/{STATE_FILE}"))


def latest_local(root: Path) -> Path | None:
    """Newest complete checkpoint directory under ``root`` (torchrun mode)."""
    done = complete_local(root)
    return done[-1] if done else None


def prune_local(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoint directories under ``root``
    (torchrun mode; rank 0, after every rank has finished the newest); returns those deleted.
    Incomplete directories are left alone: they may be a save still in progress."""
    old = complete_local(root)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old
