"""``python -m jobs.pipeline`` end to end, as a user runs it: a subprocess with a tenth of the
embedded corpus and a handful of training steps; every stage's durable output is checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "timemoe-quickstart"


PLANTED = "Pl4ntedS3cret"  # a password in the tracking URI: must appear in no output of the run


@pytest.mark.timeout(420)
def test_pipeline_job_end_to_end(tmp_path, mlflow_server):
    out = tmp_path / "qs"
    tracking = mlflow_server.replace("http://", f"http://alice:{PLANTED}@")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env |= {"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": tracking}
    cmd = [sys.executable, "-m", "jobs.pipeline", "--output-dir", str(out), "--scale", "0.1",
           "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    runs = sorted(out.glob("run-*"))
    assert len(runs) == 1, runs
    run = runs[0]

    # preprocessing: a published manifest at the window length the tiny config trains on, and the report
    manifest = json.loads((run / "packed" / "manifest.json").read_text())
    assert manifest["window_length"] == 256
    assert manifest["rows"]["train"] > 0
    assert (run / "packed" / "report.html").stat().st_size > 0

    # training: the exported model loads and forecasts finite values
    import numpy as np

    from model import TimeMoeModel

    model = TimeMoeModel.from_pretrained(str(run / "train" / "final_model"))
    pred = model.forecast([np.sin(np.arange(300) / 7.0)], 16)[0]
    assert np.asarray(pred).shape == (16,) and np.isfinite(pred).all()

    # evaluation: the model and both baselines on every held-out dataset, plus the plot
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"timemoe", "naive", "seasonal_naive"}
    for name, res in summary["models"].items():
        assert {r["dataset"] for r in res["rows"]} == {"synth_seasonal", "synth_kernel", "synth_walk"}, name
        assert all(r["horizon"] == 96 and r["windows"] > 0 for r in res["rows"]), name
        assert np.isfinite(res["avg_mse"]), name
    assert (run / "eval" / "forecasts.png").stat().st_size > 1000

    # registry: version 1 on the tracking server, alias candidate, and champion (first model)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    mv = client.get_model_version_by_alias(NAME, "candidate")
    assert str(mv.version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    # lineage: the version points at the training run the job printed, and that run carries
    # the zero-shot metrics of the evaluation stage
    run_id = mv.tags["training_run_id"]
    assert f"MLflow run id   : {run_id}" in log
    assert f"mlflow ui --backend-store-uri {mlflow_server.replace('http://', 'http://alice:***@')}" in log
    metrics = client.get_run(run_id).data.metrics
    assert metrics["zeroshot/avg_mse"] == pytest.approx(summary["models"]["timemoe"]["avg_mse"])

    # the planted password: in no line of the log, no file the run wrote, no MLflow parameter,
    # tag or logged config
    assert PLANTED not in log
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
              and PLANTED.encode() in p.read_bytes()]
    assert not leaked, leaked
    data = client.get_run(run_id).data
    assert not [k for k, v in {**data.params, **data.tags}.items() if PLANTED in str(v)]
    assert data.params["tracking.tracking_uri"].startswith("http://alice:***@")
    config_text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "alice:***@" in config_text and PLANTED not in config_text
    assert not [k for k, v in mv.tags.items() if PLANTED in str(v)]
