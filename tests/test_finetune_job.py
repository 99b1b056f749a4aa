"""``python -m jobs.finetune`` end to end on CPU (its main, on a real local Ray and a real MLflow
server): the tiny preset fine-tunes on a benchmark's train split through the real loop, its
held-out loss falls, it is evaluated beside its parent on the test split with the zero-shot
protocol's code, and the registered version carries its lineage and the promotion decision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model import TimeMoeModel
from tests._train_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A seasonal benchmark-style CSV: what a random-init model forecasts badly and learns fast."""
    root = tmp_path_factory.mktemp("bench")
    t = np.arange(1600)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"date": pd.date_range("2021-01-01", periods=len(t), freq="h").strftime("%Y-%m-%d %H:%M:%S"),
                       "a": np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=len(t)),
                       "OT": np.cos(2 * np.pi * t / 12) + 0.1 * rng.normal(size=len(t))})
    df.to_csv(root / "seasonal.csv", index=False)
    return root


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("parent") / "tiny", seed=5)


@pytest.mark.timeout(600)
def test_finetune_job_trains_evaluates_and_registers_with_lineage(ray_local, mlflow_server, bench, parent, tmp_path,
                                                                   capsys):
    from mlflow.tracking import MlflowClient

    from jobs.finetune import main

    out = tmp_path / "ft"
    rc = main(["--parent", str(parent), "--benchmarks", str(bench), "--datasets", "seasonal", "--horizons", "24",
               "--context", "96", "--window-length", "128", "--stride", "8", "--epochs", "1", "--eval-stride", "8",
               "--output-dir", str(out), "--register", "tiny-ft-seasonal", "--tracking-uri", mlflow_server,
               "--device", "cpu", "--eval-workers", "0", "train.eval_every=3", "optim.lr=3e-3",
               "data.loader=plain"])  # the loader configs/finetune-gpu.yaml uses
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    summary = json.loads(next(out.glob("run-*/summary.json")).read_text())
    info = summary["datasets"]["seasonal"]
    assert info["steps"] >= 8 and info["train_windows"] > 0
    # the held-out loss (the early-stopping rows of the train split) falls
    metrics = [json.loads(line) for line in Path(info["model"]).parent.joinpath("metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    # the epoch's wall time is its steps' own, inside the job's (start-up and export on top)
    assert info["epoch_seconds"] == pytest.approx(sum(m["step_time_s"] for m in metrics), abs=0.01)
    assert 0 < info["epoch_seconds"] < info["seconds"]
    # both tables from the one harness: same windows, parent zero-shot vs fine-tuned
    (row,) = summary["rows"]
    assert row["horizon"] == 24 and row["context"] == 96 and row["windows"] > 0
    assert row["fine_tuned_mse"] < row["zero_shot_mse"], row
    assert "| seasonal | 24 |" in printed and "TimeMoE-base" in printed  # the table beside the paper's rows
    # the fine-tuned weights differ from the parent's, in the published layout
    tuned = TimeMoeModel.from_pretrained(info["model"]).state_dict()
    base = TimeMoeModel.from_pretrained(str(parent)).state_dict()
    assert set(tuned) == set(base) and any(not torch.equal(tuned[k], base[k]) for k in base)
    # lineage on the training run and on the registered version; promoted since it beats its parent
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.data.tags["finetune.split"] == "train" and run.data.tags["finetune.dataset"] == "seasonal"
    assert run.data.tags["finetune.parent"] == str(parent.resolve())
    assert len(client.get_metric_history(info["run_id"], "grad_norm")) == info["steps"]  # every step logged
    assert run.data.metrics["in_distribution/avg_mse"] == pytest.approx(row["fine_tuned_mse"])
    mv = client.get_model_version_by_alias("tiny-ft-seasonal", "champion")
    assert mv.tags["finetune.split"] == "train" and mv.tags["finetune.parent"] == str(parent.resolve())
    assert mv.tags["promotion.decision"] == "promoted" and info["promoted"] is True
    assert float(mv.tags["in_distribution.avg_mse"]) < float(mv.tags["parent_zeroshot.avg_mse"])


@pytest.mark.parametrize("split", ["val", "test"])
def test_finetune_job_refuses_the_evaluated_borders(bench, parent, tmp_path, capsys, split):
    from jobs.finetune import main

    out = tmp_path / "ft"
    assert main(["--parent", str(parent), "--benchmarks", str(bench), "--datasets", "seasonal", "--split", split,
                 "--output-dir", str(out)]) == 2
    assert f"--split {split}: fine-tuning may read only the train split" in capsys.readouterr().err
    assert not out.exists()
