"""The scaling sweep on real Ray + a real MLflow server: a tiny grid trains, the report is built
and logged on the parent run, a re-run skips finished trials, an interrupted trial resumes."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import model

sys.path.insert(0, str(Path(__file__).parent))
import _helpers_scaling as H  # noqa: E402

from pipeline.scaling_laws import report as R  # noqa: E402
from pipeline.scaling_laws import sweep as S  # noqa: E402
from pipeline.train.validation import heldout_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW = H.TINY_WINDOW


def _config(tmp_path: Path, data: Path, name: str) -> S.SweepConfig:
    return S.SweepConfig.from_dict(H.tiny_sweep_raw(tmp_path, data, name))


def test_sweep_config_shipped_yaml_plans(tmp_path):
    cfg = S.SweepConfig.from_yaml(ROOT / "configs" / "sweep-tiny-cpu.yaml")
    plans = S.plan_trials(cfg)
    assert len(plans) == 2 * 2 * 2
    from pipeline.config import config_from_dict

    for p in plans:
        tc = config_from_dict(p.train_config)  # a valid TrainConfig for the trainer
        per_step = tc.train.global_batch_size * cfg.grid.window_length
        assert tc.train.max_steps == math.ceil(p.spec.budget_points / per_step)
        assert p.points_seen == tc.train.max_steps * per_step >= p.spec.budget_points
        assert tc.train.output_dir.endswith(p.config_hash)
        assert tc.model.overrides["hidden_size"] == p.spec.model["hidden_size"]
    gpu = S.SweepConfig.from_yaml(ROOT / "configs" / "sweep-gpu.yaml")
    assert len(gpu.grid.sizes) >= 4 and len(gpu.grid.budgets) >= 3


def test_sweep_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"sizes": [{"name": "a", "layers": 1, "hidden": 32}], "budgets": [1]},
                                   "training": {"model": {"preset": "tiny"}}}))
    with pytest.raises(ValueError, match=r"bad.yaml: training.model is set by the sweep"):
        S.SweepConfig.from_yaml(bad)


def test_heldout_metrics_match_slow_reference(tmp_path):
    import torch

    data = H.write_test_shards(tmp_path / "data", WINDOW, n_train=4, n_val=10)
    torch.manual_seed(0)
    m = model.TimeMoeModel(model.TimeMoeConfig.preset("tiny"))
    loss, mse = heldout_metrics(m, str(data), max_windows=7, batch_size=3)
    # Reference: one window at a time, the first 7 windows, plain loops.
    import pyarrow.parquet as pq

    t = pq.read_table(data / "val" / "shard-00000.parquet")
    vals = np.array(t.column("values").to_pylist(), dtype=np.float32)[:7]
    se, n, losses = 0.0, 0, []
    with torch.no_grad():
        for row in vals:
            x, y = torch.from_numpy(row[:-1])[None], torch.from_numpy(row[1:])[None]
            out = m(x, labels=y, loss_mask=torch.ones_like(y, dtype=torch.bool))
            p1 = out.predictions[1][0, :, 0]
            se += float(((p1 - y[0]) ** 2).sum())
            n += y.numel()
            losses.append(float(np.mean([float(v) for v in out.head_losses.values()])))
    assert mse == pytest.approx(se / n, rel=1e-4)
    # Batches of 3, 3, 1: the loss is averaged per batch, so compare against the same grouping.
    ref = np.mean([np.mean(losses[0:3]), np.mean(losses[3:6]), np.mean(losses[6:7])])
    assert loss == pytest.approx(ref, rel=1e-4)


def test_tiny_sweep_plain_training_skips_and_resumes(ray_local, mlflow_server, tmp_path):
    """Sweep bookkeeping end to end with a minimal in-task training path (no Ray Train)."""
    from mlflow.tracking import MlflowClient
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(H)  # the Ray workers cannot import the tests folder
    data = H.write_test_shards(tmp_path / "data", WINDOW, n_train=32, n_val=16)
    cfg = _config(tmp_path, data, "plain")
    cfg.sweep.tracking_uri = mlflow_server

    first = S.run_sweep(cfg, train_fn=H.plain_torch_train)
    assert not first.failed, first.failed
    assert len(first.ran) == 8 and not first.skipped
    assert first.report is not None
    fits = json.loads(first.report.fits_json.read_text())
    assert len(fits["trials"]) == 8
    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name(cfg.sweep.experiment).experiment_id
    children = R.child_runs(client, exp_id, first.parent_run_id)
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        m = c.data.metrics
        assert m["training_flops"] == pytest.approx(float(c.data.params["flops_per_point"]) * m["points_seen"])
        assert m["heldout_loss"] > 0 and m["heldout_mse"] > 0 and m["points_per_s"] > 0
    sparse = [c for c in children if c.data.params["family"] == "sparse"]
    dense = {(c.data.params["size"], c.data.params["budget_points"]): c for c in children
             if c.data.params["family"] == "dense"}
    for c in sparse:
        twin = dense[(c.data.params["size"], c.data.params["budget_points"])]
        assert c.data.metrics["n_total"] > twin.data.metrics["n_total"]
        assert abs(c.data.metrics["n_active"] - twin.data.metrics["n_active"]) / c.data.metrics["n_active"] < 0.02
    logged = {a.path for a in client.list_artifacts(first.parent_run_id, R.REPORT_DIR)}
    assert f"{R.REPORT_DIR}/scaling_fits.json" in logged and f"{R.REPORT_DIR}/loss_vs_flops.png" in logged
    # the parent run holds the pictures, and the one page that shows them all, read back from the server
    assert f"{R.REPORT_DIR}/scaling_report.html" in logged
    page = Path(client.download_artifacts(first.parent_run_id, f"{R.REPORT_DIR}/scaling_report.html", str(tmp_path)))
    assert page.read_text().count("data:image/png;base64,") >= 1

    # A re-run skips everything: no new child runs.
    second = S.run_sweep(cfg, train_fn=H.plain_torch_train, report=False)
    assert second.parent_run_id == first.parent_run_id
    assert not second.ran and len(second.skipped) == 8
    assert len(R.child_runs(client, exp_id, first.parent_run_id)) == 8

    # An interrupted trial (the driver died mid-run: child left RUNNING) is resumed in place.
    victim = children[0]
    client.update_run(victim.info.run_id, status="RUNNING")
    third = S.run_sweep(cfg, train_fn=H.plain_torch_train, report=False)
    assert third.resumed == [victim.data.tags[R.HASH_TAG]] and third.ran == third.resumed
    assert len(R.child_runs(client, exp_id, first.parent_run_id)) == 8
    assert client.get_run(victim.info.run_id).info.status == "FINISHED"


def _trainer_ready() -> str | None:
    try:
        from pipeline.train import ray_runtime as trainer
    except Exception as exc:  # noqa: BLE001
        return f"pipeline.train.ray_runtime not importable yet ({type(exc).__name__}: {exc})"
    if not hasattr(trainer, "run_ray"):
        return "pipeline.train.ray_runtime has no run_ray(cfg, resume) entry point yet"
    # The loop must accept a dense model's output (no router: aux_loss is None).
    import dataclasses

    import torch

    from pipeline.train import loop as train_loop

    cfg = dataclasses.replace(model.TimeMoeConfig.preset("tiny"), use_dense=True)
    x = torch.randn(1, 16)
    out = model.TimeMoeModel(cfg)(x, labels=x, loss_mask=torch.ones_like(x, dtype=torch.bool))
    try:
        train_loop.StepStats().add(out)
    except Exception as exc:  # noqa: BLE001
        return (f"pipeline/train/loop.py StepStats.add cannot take a dense model's output "
                f"({type(exc).__name__}: {exc}); the dense twins cannot train through Ray Train yet")
    return None


@pytest.mark.slow
def test_tiny_sweep_with_ray_train_trainer(ray_local, mlflow_server, tmp_path):
    """The real path: every trial trains through pipeline.train.ray_runtime (Ray Train + DeepSpeed).
    One size, both families, both budgets: the sweep's bookkeeping over the whole grid is the
    plain-training test's; here each Ray Train start costs about 14 s on two cores."""
    missing = _trainer_ready()
    if missing:
        pytest.skip(missing)
    from mlflow.tracking import MlflowClient

    data = H.write_test_shards(tmp_path / "data", WINDOW, n_train=32, n_val=16)
    raw = H.tiny_sweep_raw(tmp_path, data, "raytrain")
    raw["grid"]["sizes"] = raw["grid"]["sizes"][:1]
    cfg = S.SweepConfig.from_dict(raw)
    cfg.sweep.tracking_uri = mlflow_server
    cfg.sweep.max_concurrent = 1  # 2 cores: one Ray Train group at a time
    first = S.run_sweep(cfg)
    assert not first.failed, first.failed
    assert len(first.ran) == 4 and first.report is not None
    assert (first.report.out_dir / "loss_vs_flops.png").exists()
    second = S.run_sweep(cfg, report=False)
    assert not second.ran and len(second.skipped) == 4
    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name(cfg.sweep.experiment).experiment_id
    children = R.child_runs(client, exp_id, first.parent_run_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["family"] for c in children} == {"sparse", "dense"}
    assert all(c.data.metrics["heldout_loss"] > 0 and c.data.metrics["points_seen"] > 0 for c in children)


def test_zero_shot_subset_through_evaluation(shared_data):
    import torch

    torch.manual_seed(0)
    m = model.TimeMoeModel(model.TimeMoeConfig.preset("tiny"))
    ev = S.EvalSection(zero_shot_datasets=("ETTh1",), zero_shot_horizons=(96,), zero_shot_stride=400,
                       zero_shot_data_dir=str(shared_data / "benchmarks"))
    zs = S.zero_shot_metrics(m, ev)
    assert set(zs) == {"zs/ETTh1/96/mse", "zs/ETTh1/96/mae", "zs_mse", "zs_mae"}
    assert zs["zs_mse"] == zs["zs/ETTh1/96/mse"] > 0 and zs["zs_mae"] > 0
    assert S.zero_shot_metrics(m, S.EvalSection()) == {}  # no benchmark folder configured: skipped
