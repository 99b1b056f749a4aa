"""End to end through Ray Train's TorchTrainer with Ray Data shards and a real MLflow server:
an unbroken run, a run whose worker is killed mid-way (restored from the latest checkpoint,
same loss as the unbroken run at the first step after resume, one MLflow run), and a run whose
tracking server dies (training finishes anyway)."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests._train_helpers import (
    read_metrics,
    run_ranks,
    start_mlflow_server,
    tiny_config,
    torchrun_worker,
    wait_for_step,
    write_shards,
)

STEPS = 14


def ray_cfg(data: Path, out: Path, uri: str, experiment: str, **train) -> dict:
    from pipeline.config import config_from_dict

    return config_from_dict(tiny_config(
        data, out,
        data={"loader": "ray"},
        train={"max_steps": STEPS, "checkpoint_every": 3, "eval_every": 5, **train},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
        tracking={"enabled": True, "tracking_uri": uri, "experiment": experiment},
    ))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("raydata") / "data", train_rows=96, val_rows=16)


@pytest.fixture(scope="module")
def unbroken(ray_local, mlflow_server, data_root, tmp_path_factory):
    from pipeline.train.ray_runtime import run_ray

    out = tmp_path_factory.mktemp("unbroken")
    exp = f"unbroken-{uuid.uuid4().hex[:6]}"
    result = run_ray(ray_cfg(data_root, out, mlflow_server, exp, export=True))
    assert result.error is None
    return out, exp, result


def test_ray_run_tracks_params_metrics_artifacts(unbroken, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, exp, result = unbroken
    assert result.metrics["step"] == STEPS
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["parallel.zero_stage"] == "1"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    local = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert {m.step: m.value for m in loss} == pytest.approx(local)
    for key in ("grad_norm", "lr", "points_seen", "data_wait_ms", "aux_loss", "loss_h1", "expert_imbalance/layer0"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [5, 10]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "final_model"} <= artifacts
    assert {"final_model/config.json", "final_model/model.safetensors"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "final_model")}
    # Checkpoints merged from both workers: the ZeRO partitions of ranks 0 and 1.
    ckpt = Path(result.checkpoint.path)
    assert len(list(ckpt.glob("step*/zero_pp_rank_*_optim_states.pt"))) == 2


def test_killed_worker_is_restored_and_resumes_exactly(unbroken, mlflow_server, data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.train.ray_runtime import run_ray

    out = tmp_path / "killed"
    exp = f"killed-{uuid.uuid4().hex[:6]}"
    killed = {}

    def killer() -> None:
        # Kill only once Ray's controller has registered a checkpoint (its snapshot names it):
        # a report still in flight when the worker dies is lost, and the run would restart at 0.
        snapshot = out / "ray" / "pretrain" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while time.time() < deadline and not (snapshot.exists() and "checkpoint_step" in snapshot.read_text()):
            time.sleep(0.02)
        wait_for_step(out, 4)
        pid = int((out / "pids" / "rank1.pid").read_text())
        killed["pid"] = pid
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_ray(ray_cfg(data_root, out, mlflow_server, exp))
    thread.join(timeout=5)
    assert "pid" in killed, "the worker was never killed"
    assert result.error is None and result.metrics["step"] == STEPS

    lines = read_metrics(out)
    trace = [(m["step"], round(m["loss"], 6)) for m in lines]
    assert len(lines) > STEPS, trace  # some steps ran twice
    restart = next(i for i in range(1, len(lines)) if lines[i]["step"] <= lines[i - 1]["step"])
    first = lines[restart]
    assert first["step"] in (4, 7, 10, 13), trace  # right after a checkpoint (every 3 steps)
    assert lines[-1]["step"] == STEPS
    unbroken_loss = {m["step"]: m["loss"] for m in read_metrics(unbroken[0])}
    assert abs(first["loss"] - unbroken_loss[first["step"]]) < 1e-3, (trace, unbroken_loss)
    assert abs(lines[-1]["loss"] - unbroken_loss[STEPS]) < 1e-3

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len(runs) == 1, "a restore must continue the same MLflow run"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(1, STEPS + 1))


def test_training_survives_tracking_server_death(tmp_path, capfd):
    data = write_shards(tmp_path / "data")
    proc, uri = start_mlflow_server(tmp_path / "mlflow")
    out = tmp_path / "out"
    cfg = tiny_config(data, out, train={"max_steps": 8},
                      tracking={"enabled": True, "tracking_uri": uri, "experiment": "dies"})

    def kill_server() -> None:
        wait_for_step(out, 2)
        os.killpg(proc.pid, signal.SIGKILL)

    thread = threading.Thread(target=kill_server, daemon=True)
    thread.start()
    try:
        result = run_ranks(torchrun_worker, tmp_path / "res", 1, [cfg])[0][0]
    finally:
        thread.join(timeout=5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [h["step"] for h in result["history"] if "loss" in h] == list(range(1, 9))
    assert result["run_id"]
    assert "tracking is OFF, training continues" in capfd.readouterr().out
