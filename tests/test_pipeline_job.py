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


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, mlflow_server) -> dict:
    """One run of the job, shared by the tests of this module (what it wrote, what it logged)."""
    out = tmp_path_factory.mktemp("pipeline_job") / "qs"
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
    run_id = json.loads((runs[0] / "summary.json").read_text())["mlflow_run_id"]
    return {"out": out, "run": runs[0], "log": log, "run_id": run_id}


@pytest.mark.timeout(420)
def test_pipeline_job_end_to_end(quickstart, tmp_path, mlflow_server):
    out, run, log = quickstart["out"], quickstart["run"], quickstart["log"]

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


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.timeout(300)
def test_pictures_of_the_run_in_mlflow(quickstart, mlflow_server, tmp_path):
    """Read back through the MLflow client from the server: the training run's pictures, the
    zero-shot table as a picture and an MLflow table, and the registered version's description."""
    from mlflow.tracking import MlflowClient

    from pipeline.reports.pictures import worse_than_baselines

    client, run_id = MlflowClient(tracking_uri=mlflow_server), quickstart["run_id"]
    training = {a.path for a in client.list_artifacts(run_id, "training")}
    assert training == {"training/loss_vs_flops.png", "training/throughput.png", "training/expert_load.png",
                        "training/expert_load.jsonl"}, training
    for name in ("loss_vs_flops.png", "throughput.png", "expert_load.png"):
        w, h = _png_size(Path(client.download_artifacts(run_id, f"training/{name}", str(tmp_path))))
        assert w > 300 and h > 200, (name, w, h)
    # the heatmap's data: one column per logged step (log_every=2 of 4 steps), layers x experts
    # of the tiny preset (2 x 4); every layer routes the same tokens to its top-2 experts
    records = [json.loads(line) for line in
               Path(client.download_artifacts(run_id, "training/expert_load.jsonl", str(tmp_path))).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert len(r["counts"]) == 2 and all(len(layer) == 4 for layer in r["counts"])
        assert len({sum(layer) for layer in r["counts"]}) == 1 and sum(r["counts"][0]) > 0

    zeroshot = {a.path for a in client.list_artifacts(run_id, "zeroshot")}
    assert {"zeroshot/forecasts.png", "zeroshot/comparison.png", "zeroshot/table.md", "zeroshot/table.json"} <= zeroshot
    _png_size(Path(client.download_artifacts(run_id, "zeroshot/comparison.png", str(tmp_path))))
    table = json.loads(Path(client.download_artifacts(run_id, "zeroshot/table.json", str(tmp_path))).read_text())
    assert table["columns"] == ["dataset", "horizon", "timemoe", "naive", "seasonal_naive"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    summary = json.loads((quickstart["run"] / "eval" / "summary.json").read_text())
    overall = next(r for r in rows if r["dataset"] == "all")
    for name, res in summary["models"].items():
        assert overall[name] == pytest.approx(res["avg_mse"], rel=1e-9), name
    for r in summary["models"]["timemoe"]["rows"]:
        assert next(x for x in rows if (x["dataset"], x["horizon"]) == (r["dataset"], str(r["horizon"])))["timemoe"] \
            == pytest.approx(r["mse"], rel=1e-9)

    # the registered version: its evaluation table and where it comes from, in its description
    mv = client.get_model_version_by_alias(NAME, "champion")
    text = mv.description
    assert "### Zero-shot evaluation" in text and "| synth_walk | avg |" in text and "### Lineage" in text
    assert f"training run: `{run_id}`" in text and mv.tags["data_manifest_fingerprint"] in text
    assert mv.tags["config_hash"] in text and "promotion: promoted" in text
    table_rows = [{**r, "horizon": int(r["horizon"]) if r["horizon"].isdigit() else r["horizon"]} for r in rows]
    worse = worse_than_baselines(table_rows, "timemoe")
    assert ("Worse than a baseline on:" in text) == bool(worse)
    assert all(f"worse than a baseline: {w}" in quickstart["log"] for w in worse)


@pytest.fixture(scope="module")
def run_report(quickstart, mlflow_server, tmp_path_factory) -> Path:
    """``python -m jobs.report --run-id`` on the job's run (in this process: main())."""
    from jobs.report import main

    out = tmp_path_factory.mktemp("run_report")
    assert main(["--run-id", quickstart["run_id"], "--tracking-uri", mlflow_server, "--out", str(out)]) == 0
    return out


@pytest.mark.timeout(300)
def test_run_report_from_mlflow(quickstart, run_report, mlflow_server, tmp_path):
    """One page of the run, from MLflow alone; its numbers (run_report.json) are the run's."""
    from mlflow.tracking import MlflowClient

    from jobs.report import main

    doc = json.loads((run_report / "run_report.json").read_text())
    metrics = MlflowClient(tracking_uri=mlflow_server).get_run(quickstart["run_id"]).data.metrics
    assert doc["steps"] == 4 and doc["final"]["loss"] == pytest.approx(metrics["loss"])
    assert doc["final"]["train_flops"] == pytest.approx(metrics["train_flops"])
    assert doc["zeroshot"]["avg_mse"]["timemoe"] == pytest.approx(metrics["zeroshot/avg_mse"])
    assert [(v["version"], sorted(v["aliases"])) for v in doc["registry"]] == [("1", ["candidate", "champion"])]
    assert set(doc["mixture"]) == {"energy", "finance", "nature", "sales", "synthetic", "transport", "web"}
    assert doc["mixture"]["sales"]["points_kept"] == 0  # dropped whole by the cleaning rules
    # the job wrote the same page next to its outputs and named it in its summary
    assert f"run report      : {quickstart['run'] / 'report' / 'run_report.html'}" in quickstart["log"]
    # an unknown run is one line and exit code 2
    assert main(["--run-id", "0" * 32, "--tracking-uri", mlflow_server, "--out", str(tmp_path)]) == 2


@pytest.mark.timeout(120)
def test_run_report_in_browser(run_report, tmp_path):
    """Checked like the other reports (tests/test_browser_reports.py): offline, every picture
    decoded, no console error, the numbers shown are run_report.json's."""
    from tests._browser import (
        Chromium,
        assert_matches,
        check_page,
        json_value,
        open_offline,
        require_browser,
        screenshot_dir,
    )

    doc = json.loads((run_report / "run_report.json").read_text())
    with Chromium(require_browser()) as browser:
        page = open_offline(browser, run_report / "run_report.html")
        check_page(page, min_images=6)  # loss vs FLOPs, throughput, expert load, comparison, forecasts, mixture
        shown = page.keyed_values()
        assert {"steps", "final.loss", "final.train_flops", "zeroshot.avg_mse.timemoe",
                "zeroshot.avg_mse.naive"} <= set(shown), shown
        for key, text in shown.items():
            if key in ("run_id", "experiment", "status"):
                assert text == doc[key], key
            else:
                assert_matches(text, json_value(doc, key), key)
        sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        assert sections == ["summary", "curves", "experts", "evaluation", "mixture", "registry", "config"]
        page.screenshot(screenshot_dir(tmp_path) / "run_report.png", max_height=2600)
