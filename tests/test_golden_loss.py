"""The golden loss curve: the tiny model trained on fixed data with a fixed seed (2 gloo ranks,
DeepSpeed ZeRO-1, fp32, the real loop under the torchrun runtime) must reproduce the per-step
losses committed in ``tests/golden/tiny_loss_curve.json``.

Any change that moves the numbers (model math, initialisation, data order, optimiser, loss
scaling, the aux loss) fails here, so refactors that should change nothing can prove it.
Tolerance: 1e-4 relative per step. Runs on one machine repeat bit for bit; the margin absorbs
other CPUs' summation order (vector width, thread count), which moves fp32 losses by ~1e-6
relative over these steps. A deliberate change regenerates the file:
``TIMEMOE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_loss.py``, and says why in its commit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests._train_helpers import run_ranks, tiny_config, torchrun_worker, write_shards

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss_curve.json"
STEPS = 40
REL_TOL = 1e-4


def test_tiny_training_reproduces_the_golden_loss_curve(tmp_path):
    data = write_shards(tmp_path / "data", seed=11)
    cfg = tiny_config(data, tmp_path / "run", optim={"warmup_steps": 5, "lr": 1e-3},
                      train={"max_steps": STEPS, "seed": 1234, "export": False, "checkpoint_at_end": False})
    history = run_ranks(torchrun_worker, tmp_path / "results", 2, [cfg])[0][0]["history"]
    steps = [h for h in history if "loss" in h]
    curve = {"loss": [h["loss"] for h in steps], "aux_loss": [h["aux_loss"] for h in steps],
             "grad_norm": [h["grad_norm"] for h in steps]}
    assert len(curve["loss"]) == STEPS
    # the wall-clock pace between step ends holds each step's own time and the loop's work around it
    for h in steps:
        assert h["step_interval_s"] >= h["step_time_s"] > 0, h
    if os.environ.get("TIMEMOE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"steps": STEPS, "config": {k: cfg[k] for k in ("model", "optim", "parallel")},
                                      "data": {"write_shards_seed": 11, "window_length": 32}, **curve}, indent=1) + "\n")
        pytest.skip(f"golden curve rewritten: {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    for key in ("loss", "aux_loss", "grad_norm"):
        for step, (got, want) in enumerate(zip(curve[key], golden[key]), start=1):
            assert got == pytest.approx(want, rel=REL_TOL), f"{key} at step {step}: {got!r} vs golden {want!r}"
