"""CUDA only: the DeepSpeed engine as the training loop builds it (bf16, ZeRO-1, one worker), where
non-finite steps are skipped by the optimizer on the device instead of DeepSpeed's host-side check.

The check runs in a child process: the test session pins DeepSpeed to its CPU accelerator
(conftest), and DeepSpeed picks its accelerator once per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._train_helpers import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def _engine():
    from pipeline.config import TrainConfig
    from pipeline.parallel.parallelize import build_model, init_distributed, parallelize

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    cfg = TrainConfig()
    cfg.model.preset = "tiny"
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 2
    cfg.parallel.zero_stage, cfg.parallel.precision = 1, "bf16"
    init_distributed(True)
    engine, _ = parallelize(build_model(cfg.model, 0), cfg, 1, True)
    return engine


def _step(engine, batch, loss_factor: float = 1.0) -> None:
    out = engine(batch["inputs"], segment_ids=batch["segment_ids"], labels=batch["labels"],
                 loss_mask=batch["loss_mask"])
    engine.backward(out.loss * loss_factor)
    engine.step()


def test_a_nonfinite_step_leaves_weights_and_optimizer_state_as_they_were():
    pytest.importorskip("deepspeed")
    # a port of its own: an earlier GPU test in this process may have left MASTER_PORT set, and its
    # store listening there
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skip checked" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def check_nonfinite_step_is_skipped() -> None:
    from pipeline.parallel.optim import FiniteStepAdamW

    engine = _engine()
    assert isinstance(engine.optimizer.optimizer, FiniteStepAdamW)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 65, generator=g)
    batch = {"inputs": x[:, :-1], "labels": x[:, 1:], "segment_ids": torch.ones(2, 64, dtype=torch.long),
             "loss_mask": torch.ones(2, 64, dtype=torch.bool)}
    batch = {k: v.cuda() for k, v in batch.items()}
    _step(engine, batch)
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    inner = engine.optimizer.optimizer
    moments = [inner.state[p]["exp_avg"].clone() for grp in inner.param_groups for p in grp["params"]]

    _step(engine, batch, loss_factor=float("inf"))  # every gradient inf/NaN
    assert not torch.isfinite(torch.as_tensor(engine.get_global_grad_norm())).item()
    for n, p in engine.module.named_parameters():
        assert torch.equal(p.detach(), weights[n]), f"{n} changed in a skipped step"
    after = [inner.state[p]["exp_avg"] for grp in inner.param_groups for p in grp["params"]]
    assert all(torch.equal(a, b) for a, b in zip(after, moments))

    _step(engine, batch)  # and training goes on from there
    assert torch.isfinite(torch.as_tensor(engine.get_global_grad_norm())).item()
    assert any(not torch.equal(p.detach(), weights[n]) for n, p in engine.module.named_parameters())
    print("skip checked")


if __name__ == "__main__":
    check_nonfinite_step_is_skipped()
