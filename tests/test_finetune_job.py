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


@pytest.fixture(scope="module")
def own_packed(ray_local, tmp_path_factory) -> Path:
    """A user's own series (jsonl, seasonal), packed by the real preprocessing job at 128 points."""
    from jobs.preprocess import main

    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(1)
    (root / "raw").mkdir()
    with open(root / "raw" / "plant.jsonl", "w") as fh:
        for i in range(40):
            t = np.arange(600)
            x = np.sin(2 * np.pi * t / (12 + i % 5)) + 0.1 * rng.normal(size=len(t))
            fh.write(json.dumps({"item_id": f"s{i}", "sequence": x.round(4).tolist()}) + "\n")
    out = root / "packed"
    (root / "preprocess.yaml").write_text("pack: {window_length: 128, val_fraction: 0.2}\n")
    assert main(["--input", str(root / "raw"), "--output", str(out), "--config", str(root / "preprocess.yaml")]) == 0
    return out


@pytest.mark.timeout(600)
def test_finetune_on_own_packed_data_trains_on_train_and_beats_its_parent_on_val(ray_local, mlflow_server, parent,
                                                                                 own_packed, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.finetune import main
    from pipeline.train.validation import heldout_metrics

    manifest = json.loads((own_packed / "manifest.json").read_text())
    assert manifest["rows"]["val"] > 0 and manifest["rows"]["train"] > 0
    out = tmp_path / "ft"
    rc = main(["--parent", str(parent), "--data", str(own_packed), "--output-dir", str(out), "--epochs", "2",
               "--register", "tiny-ft-own", "--tracking-uri", mlflow_server, "--device", "cpu",
               "--heldout-windows", "64", "optim.lr=3e-3"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    summary = json.loads(next(out.glob("run-*/summary.json")).read_text())
    # one epoch = every train row once: steps x batch covers the train split twice
    batch = 16  # configs/finetune-cpu.yaml
    assert summary["steps"] == -(-2 * manifest["rows"]["train"] // batch)
    assert summary["fine_tuned_heldout_loss"] < summary["parent_heldout_loss"], summary
    # the scores are the held-out metrics of the two saved models on the same val windows
    model = TimeMoeModel.from_pretrained(summary["model"])
    loss, mse = heldout_metrics(model, str(own_packed), max_windows=64, batch_size=16)
    assert loss == pytest.approx(summary["fine_tuned_heldout_loss"], rel=1e-5)
    assert "| fine-tuned (full) |" in printed
    mv = MlflowClient(mlflow_server).get_model_version_by_alias("tiny-ft-own", "champion")
    assert mv.tags["finetune.dataset"] == str(own_packed) and mv.tags["finetune.split"] == "train"
    assert mv.tags["promotion.decision"] == "promoted"


def test_finetune_on_own_data_refuses_windows_longer_than_the_model_and_data_without_val(parent, tmp_path, capsys):
    from jobs.finetune import main
    from preprocessing.schema import minimal_manifest

    long = tmp_path / "long"
    long.mkdir()
    (long / "manifest.json").write_text(json.dumps(minimal_manifest(100_000, {"train": [{"file": "x", "rows": 4}],
                                                                               "val": [{"file": "y", "rows": 1}]})))
    assert main(["--parent", str(parent), "--data", str(long), "--output-dir", str(tmp_path / "a")]) == 2
    assert "windows of 100000 points are longer than the model's maximum context" in capsys.readouterr().err
    no_val = tmp_path / "noval"
    no_val.mkdir()
    (no_val / "manifest.json").write_text(json.dumps(minimal_manifest(64, {"train": [{"file": "x", "rows": 4}]})))
    assert main(["--parent", str(parent), "--data", str(no_val), "--output-dir", str(tmp_path / "b")]) == 2
    assert "no val/ rows to compare the fine-tuned model with its parent" in capsys.readouterr().err
    assert main(["--parent", str(parent), "--data", str(no_val), "--benchmarks", str(tmp_path),
                 "--output-dir", str(tmp_path / "c")]) == 2
    assert "either --benchmarks" in capsys.readouterr().err
    assert main(["--parent", str(parent), "--data", str(no_val), "--window-length", "64",
                 "--output-dir", str(tmp_path / "d")]) == 2
    assert "--window-length: with --data the windows are the packed data's own" in capsys.readouterr().err
