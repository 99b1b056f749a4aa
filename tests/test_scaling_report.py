"""The scaling report builds from trial records, and rebuilds from a real MLflow server alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.scaling_laws import report as R

sys.path.insert(0, str(Path(__file__).parent))
from _helpers_scaling import SPARSE_LAW, fake_trials  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_build_report_from_records(scaling_report):
    files, tmp_path = scaling_report, scaling_report.out_dir  # fake_trials(seed=0), n_boot=20
    assert _is_png(files.loss_vs_flops_png) and _is_png(files.isoflop_png)
    fits = json.loads(files.fits_json.read_text())
    assert fits["metric"] == "heldout_loss"
    assert len(fits["trials"]) == 24
    sparse = fits["families"]["sparse"]
    # The joint fit sees the law the fake trials were drawn from (1% noise, 12 trials).
    assert sparse["joint"]["a"]["estimate"] == pytest.approx(SPARSE_LAW["a"], abs=0.1)
    assert sparse["joint"]["b"]["estimate"] == pytest.approx(SPARSE_LAW["b"], abs=0.1)
    for fam in ("sparse", "dense"):
        pl = fits["families"][fam]["power_law"]
        assert pl["alpha"]["low"] <= pl["alpha"]["estimate"] <= pl["alpha"]["high"]
        co = fits["families"][fam]["compute_optimal"]
        assert co["n_opt"] == sorted(co["n_opt"])  # more compute -> bigger optimal model
        assert abs(fits["families"][fam]["extrapolation"]["relative_error"]) < 0.15
    # Dense of equal active params behaves like a 0.35x smaller sparse model: it needs more FLOPs.
    assert all(m["estimate"] > 1.0 for m in fits["multiplier"]["per_compute"])
    md = files.table_md.read_text()
    # trials + fit row + cells (one seed each: a cell per trial)
    assert md.count("| sparse |") == 12 + 1 + 12 and md.count("| dense |") == 12 + 1 + 12
    assert "<table" in files.table_html.read_text()
    page = files.page_html.read_text()  # opened in a browser by tests/test_browser_reports.py
    assert page.count("data:image/png;base64,") == 4 and "http" not in page
    # FLOPs vs MSE too: held-out and zero-shot MSE get their own L(C) fits, multiplier and plot.
    for other in ("heldout_mse", "zs_mse"):
        assert set(fits["by_metric"][other]["families"]["sparse"]["power_law"]) == {"E", "A", "alpha"}
        assert "multiplier" in fits["by_metric"][other]
        assert _is_png(tmp_path / f"{other}_vs_flops.png")


def test_build_report_single_family_has_no_multiplier(tmp_path):
    records = [r for r in fake_trials(seed=1) if r.family == "sparse"]
    files = R.build_report(records, tmp_path, n_boot=10)
    assert "multiplier" not in files.fits
    assert "alpha" in files.fits["families"]["sparse"]["power_law"]


def test_build_report_refuses_empty():
    with pytest.raises(ValueError, match="no finished trials"):
        R.build_report([], "/tmp/unused")


def _log_fake_sweep(uri: str, experiment: str) -> tuple[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name="sweep", tags={R.ROLE_TAG: R.ROLE_SWEEP, R.SWEEP_TAG: "fake"})
    pid = parent.info.run_id
    records = fake_trials(seed=2)
    for rec in records:
        run = client.create_run(exp_id, run_name=rec.trial_hash,
                                tags={"mlflow.parentRunId": pid, R.ROLE_TAG: R.ROLE_TRIAL})
        R.log_trial_record(client, run.info.run_id, rec)
        client.set_terminated(run.info.run_id, "FINISHED")
    # An interrupted trial (still RUNNING, half its metrics) must not enter the report.
    broken = client.create_run(exp_id, run_name="interrupted",
                               tags={"mlflow.parentRunId": pid, R.ROLE_TAG: R.ROLE_TRIAL})
    client.log_metric(broken.info.run_id, "heldout_loss", 0.01)
    return pid, len(records)


def test_scaling_report_job_rebuilds_from_mlflow_alone(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    pid, n = _log_fake_sweep(mlflow_server, "scaling-report-test")
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.scaling_report", "--experiment", "scaling-report-test",
         "--tracking-uri", mlflow_server, "--out", str(out), "--n-boot", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _is_png(out / "loss_vs_flops.png") and _is_png(out / "isoflop.png")
    fits = json.loads((out / "scaling_fits.json").read_text())
    assert len(fits["trials"]) == n  # the interrupted run is left out
    for fam in ("sparse", "dense"):
        assert set(fits["families"][fam]["power_law"]) == {"E", "A", "alpha"}
        assert set(fits["families"][fam]["joint"]) == {"E", "A", "B", "a", "b"}
    assert fits["multiplier"]["headline"]["estimate"] > 1.0

    client = MlflowClient(tracking_uri=mlflow_server)
    logged = {a.path for a in client.list_artifacts(pid, R.REPORT_DIR)}
    assert {f"{R.REPORT_DIR}/{name}" for name in
            ("scaling_fits.json", "scaling_table.md", "scaling_table.html", "loss_vs_flops.png", "isoflop.png")} <= logged
    metrics = client.get_run(pid).data.metrics
    assert metrics["fit/sparse/alpha"] == pytest.approx(fits["families"]["sparse"]["power_law"]["alpha"]["estimate"])


def test_scaling_report_job_names_missing_experiment(mlflow_server, tmp_path):
    with pytest.raises(ValueError, match="'no-such-experiment' not found"):
        R.rebuild_from_mlflow("no-such-experiment", tmp_path, tracking_uri=mlflow_server)
