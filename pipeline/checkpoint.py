"""Resume state: the DeepSpeed engine's checkpoint plus one small, explicit JSON.

A checkpoint directory holds::

    <tag>/...                 engine.save_checkpoint output (module, ZeRO partitions, scheduler)
    latest                    DeepSpeed's pointer to <tag>
    resume_state.json         step, data position, MLflow run id, config fingerprint

Every rank writes its own ZeRO partition into the same directory (on one host, or on a shared
filesystem, or per-worker directories that Ray Train merges on upload).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data import DataPosition

STATE_FILE = "resume_state.json"


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


def save(engine: Any, directory: Path, state: ResumeState) -> None:
    """Collective: every rank must call it (ZeRO partitions are per rank)."""
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=f"step{state.step:08d}", client_state={"resume": asdict(state)})
    if engine.global_rank == 0:
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(directory / STATE_FILE)  # atomic: a half-written state never looks valid


def load(engine: Any, directory: Path, fingerprint: str) -> ResumeState:
    """Restore the engine (weights, optimizer, scheduler) and return the resume state."""
    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{directory}: no {STATE_FILE}; not a checkpoint written by pipeline.checkpoint")
    state = ResumeState.from_json(state_path.read_text())
    if state.config_fingerprint and state.config_fingerprint != fingerprint:
        raise ValueError(
            f"{directory}: checkpoint was written with config fingerprint {state.config_fingerprint}, "
            f"this run has {fingerprint}: model, optimiser, batch or parallel layout differ"
        )
    load_path, _ = engine.load_checkpoint(str(directory), tag=f"step{state.step:08d}")
    if load_path is None:
        raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint for step {state.step}")
    return state


def latest_local(root: Path) -> Path | None:
    """Newest complete checkpoint directory under ``root`` (torchrun mode)."""
    done = sorted(p.parent for p in root.glob(f"step*/{STATE_FILE}"))
    return done[-1] if done else None
