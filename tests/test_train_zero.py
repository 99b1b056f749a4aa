"""The loop under the torchrun runtime on 2 gloo processes (no Ray): ZeRO-1/2/3 agree,
resume from a checkpoint reproduces the unbroken run, and the exported model loads in a
process that never imports Ray or DeepSpeed."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests._train_helpers import probe_inputs, run_ranks, tiny_config, torchrun_worker, write_shards

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    data = write_shards(tmp / "data")
    cfgs = [
        tiny_config(data, tmp / f"z{stage}", parallel={"zero_stage": stage},
                    train={"max_steps": STEPS, "checkpoint_every": 3, "export": True})
        for stage in (1, 2, 3)
    ]
    results = run_ranks(torchrun_worker, tmp / "results", 2, cfgs)
    return tmp, cfgs, results


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def test_zero_stages_agree(zero_runs):
    _, _, results = zero_runs
    rank0 = results[0]
    ref = losses(rank0[0]["history"])
    assert len(ref) == STEPS and ref[-1] < ref[0]  # it learns
    for stage, run in zip((2, 3), rank0[1:]):
        assert losses(run["history"]) == pytest.approx(ref, rel=1e-4), f"ZeRO-{stage} diverged from ZeRO-1"
    # The logged loss is already the all-rank mean: both ranks report the same numbers.
    assert losses(results[1][0]["history"]) == pytest.approx(ref, rel=1e-12)
    # Validation ran at the end on the held-out split.
    final = rank0[0]["history"][-1]
    assert final["eval_loss"] > 0 and 0 < final["eval_mse"] < 10


def test_step_metrics_present(zero_runs):
    h = zero_runs[2][0][0]["history"][0]
    for key in ("loss", "loss_h1", "aux_loss", "grad_norm", "lr", "points_seen", "points_per_s", "data_wait_ms"):
        assert key in h, key
    assert h["points_seen"] == 8 * 32  # global batch 8 windows x L = 32 points
    assert any(k.startswith("expert_imbalance/layer") for k in h)
    assert all(v >= 1.0 for k, v in h.items() if k.startswith("expert_imbalance/"))


def test_resume_from_checkpoint_matches_unbroken_run(zero_runs):
    tmp, cfgs, results = zero_runs
    cfg = dict(cfgs[1], train=dict(cfgs[1]["train"], export=False))
    ckpts = Path(cfg["train"]["output_dir"]) / "checkpoints"
    assert (ckpts / "step00000003" / "resume_state.json").exists()
    shutil.rmtree(ckpts / f"step{STEPS:08d}")  # as if the run had died after step 4
    resumed = run_ranks(torchrun_worker, tmp / "resumed", 2, [cfg], True)[0][0]["history"]
    assert [h["step"] for h in resumed if "loss" in h] == [4, 5]
    unbroken = {h["step"]: h["loss"] for h in results[0][1]["history"] if "loss" in h}
    for h in resumed:
        if "loss" in h:
            assert abs(h["loss"] - unbroken[h["step"]]) < 1e-3 * max(1.0, abs(unbroken[h["step"]]))


LOADER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from model import TimeMoeModel
    model = TimeMoeModel.from_pretrained({path!r}).eval()
    assert "ray" not in sys.modules and "deepspeed" not in sys.modules, "export needs Ray/DeepSpeed"
    with torch.no_grad():
        torch.save(model(torch.load({probe!r})).predictions[1].float(), {out!r})
""")


def test_exported_model_loads_without_ray_or_deepspeed(zero_runs, tmp_path):
    _, cfgs, results = zero_runs
    torch.save(probe_inputs(), tmp_path / "probe.pt")
    preds = {}
    for stage, cfg in zip((1, 3), (cfgs[0], cfgs[2])):
        export = Path(cfg["train"]["output_dir"]) / "final_model"
        assert (export / "config.json").exists() and (export / "model.safetensors").exists()
        out = tmp_path / f"pred{stage}.pt"
        code = LOADER.format(root=str(ROOT), path=str(export), probe=str(tmp_path / "probe.pt"), out=str(out))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        preds[stage] = torch.load(out)
    engine_pred = results[0][0]["pred"]
    torch.testing.assert_close(preds[1], engine_pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(preds[3], engine_pred, rtol=1e-3, atol=1e-4)  # ZeRO-3 gathered export


def test_expert_parallel_resume_restores_every_ranks_experts(tmp_path):
    """With ep=2 each rank holds different experts; a resumed run must get its OWN experts back
    (not rank 0's), so its losses after resume equal the unbroken run's. The resumed run pipelines
    its MoE layers in 2 chunks (parallel.ep_chunks): same losses, chunking only reorders sums."""
    data = write_shards(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "ep2", parallel={"zero_stage": 1, "ep_size": 2},
                      train={"max_steps": STEPS, "checkpoint_every": 3, "export": False})
    unbroken_hist = run_ranks(torchrun_worker, tmp_path / "unbroken", 2, [cfg])[0][0]["history"]
    unbroken = {h["step"]: h["loss"] for h in unbroken_hist if "loss" in h}
    # EP runs also log how much more expert work the busiest EP rank does than the average
    first = next(h for h in unbroken_hist if "loss" in h)
    assert 1.0 <= first["expert_imbalance/ep_rank_mean"] <= first["expert_imbalance/mean"] + 1e-9
    ckpts = Path(cfg["train"]["output_dir"]) / "checkpoints"
    shutil.rmtree(ckpts / f"step{STEPS:08d}")
    cfg["parallel"]["ep_chunks"] = 2
    resumed_out = run_ranks(torchrun_worker, tmp_path / "resumed", 2, [cfg], True)[0][0]
    assert resumed_out["dispatchers"] and all("chunks=2" in d for d in resumed_out["dispatchers"]), resumed_out["dispatchers"]
    resumed = resumed_out["history"]
    steps = [h["step"] for h in resumed if "loss" in h]
    assert steps == [4, 5]
    for h in resumed:
        if "loss" in h:
            assert abs(h["loss"] - unbroken[h["step"]]) < 1e-3 * max(1.0, abs(unbroken[h["step"]])), (h, unbroken)


def test_only_the_newest_complete_checkpoints_are_kept(tmp_path):
    """``train.keep_checkpoints`` in the torchrun runtime: complete checkpoints beyond the newest N
    go; a directory without its resume state (a save in progress, or one cut short) stays, and a
    resume never picks it."""
    from pipeline.train.checkpoint import STATE_FILE, latest_local, prune_local

    for step in (3, 6, 9, 12):
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if step != 12:
            (tmp_path / f"step{step:08d}" / STATE_FILE).write_text("{}")
    gone = prune_local(tmp_path, keep=2)
    assert [p.name for p in gone] == ["step00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000006", "step00000009", "step00000012"]
    assert latest_local(tmp_path).name == "step00000009"
    assert prune_local(tmp_path, keep=0) == [] and len(list(tmp_path.iterdir())) == 3  # 0 keeps all
