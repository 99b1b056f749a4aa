"""The measured inference cost of a sweep's shapes (``pipeline.scaling_laws.inference``) and its
place in the scaling report: read from an ``evaluate_gpu.py --grid`` JSON, used at equal loss."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.scaling_laws import report as R
from pipeline.scaling_laws.inference import read_measurements, speed_at_equal_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _helpers_scaling import SEEDED_SIZES, seeded_trials  # noqa: E402

COMMITTED = ROOT / "benchmarks" / "results" / "sweep-families-1gpu" / "inference_h100.json"


def _row(preset: str, pair: str, wps: float, dtype: str = "bf16", variant: str = "compiled", impl: str = "ours",
         status: str = "ok") -> dict:
    context, horizon = (int(x) for x in pair.split("/"))
    return dict(kind="generate", impl=impl, preset=preset, dtype=dtype, variant=variant, status=status,
                context=context, horizon=horizon, batch=8, windows_per_s=wps, flops_per_window=1e9 * context)


def _estimate(preset: str, minutes: float, dtype: str = "bf16", variant: str = "compiled", complete: bool = True,
              impl: str = "ours") -> dict:
    return dict(impl=impl, preset=preset, dtype=dtype, variant=variant, minutes=minutes, complete=complete)


def test_measurements_keep_each_shapes_fastest_complete_estimate_and_resolve_same_forward(tmp_path):
    doc = {"meta": {"device": "GPU X", "date": "2026-12-07"},
           "rows": [_row("dense-a", "64/8", 100.0), _row("dense-a", "64/8", 300.0, dtype="fp32", variant="eager"),
                    _row("dense-a", "128/16", 40.0), _row("dense-a", "128/16", 55.0),  # a second batch: the faster
                    _row("dense-a", "128/16", 999.0, status="oom"), _row("sparse-a", "64/8", 120.0),
                    _row("sparse-a", "64/8", 5000.0, impl="released")],
           "protocol_estimate": [_estimate("dense-a", 10.0), _estimate("dense-a", 20.0, "fp32", "eager"),
                                 _estimate("dense-a", 1.0, "fp32", "compiled", complete=False),
                                 _estimate("sparse-a", 8.0), _estimate("sparse-a", 0.5, impl="released")],
           "same_inference_as": {"sparse_per_layer-a": "sparse-a", "lost-a": "not-measured"}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(doc))
    m = read_measurements(path)
    assert m["device"] == "GPU X" and m["source"] == str(path)
    assert set(m["shapes"]) == {"dense-a", "sparse-a", "sparse_per_layer-a"}  # an alias of nothing is dropped
    dense = m["shapes"]["dense-a"]
    assert dense["protocol_minutes"] == 10.0 and (dense["dtype"], dense["variant"]) == ("bf16", "compiled")
    assert dense["windows_per_s"] == {"64/8": 100.0, "128/16": 55.0}  # the chosen dtype/variant's rows only
    assert m["shapes"]["sparse_per_layer-a"] == dict(m["shapes"]["sparse-a"], measured_as="sparse-a")
    assert m["shapes"]["sparse-a"]["protocol_minutes"] == 8.0  # the released code's estimate is not ours
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bad.json"):
        read_measurements(bad)


def test_committed_measurements_give_every_family_and_size_and_their_protocol_minutes():
    """The committed H100 file: every (family, size) of the families study, sparse_per_layer as
    sparse, and each shape's minutes equal to the protocol's windows over the rows' windows/s."""
    m = read_measurements(COMMITTED)
    doc = json.loads(COMMITTED.read_text())
    families = ("dense", "sparse", "sparse_per_layer")
    assert set(m["shapes"]) == {f"{f}-{s}" for f in families for s in ("s3", "s4")}
    for size in ("s3", "s4"):
        assert m["shapes"][f"sparse_per_layer-{size}"]["measured_as"] == f"sparse-{size}"
    windows = doc["protocol_windows"]["per_pair"]
    for name, shape in m["shapes"].items():
        assert set(shape["windows_per_s"]) == set(windows)
        by_hand = sum(windows[p] / shape["windows_per_s"][p] for p in windows) / 60
        assert shape["protocol_minutes"] == pytest.approx(by_hand, rel=1e-9), name


def _measured(minutes: dict[str, float]) -> dict:
    return {"device": "GPU X", "date": "d", "source": "x",
            "shapes": {k: {"measured_as": k, "protocol_minutes": v, "windows_per_s": {"64/8": 1.0},
                           "flops_per_window": {"64/8": 1e9}} for k, v in minutes.items()}}


def test_speed_at_equal_loss_takes_dense_minutes_linear_in_active_parameters():
    measured = _measured({"dense-s3": 10.0, "dense-s4": 30.0, "sparse-s4": 15.0})
    sizes = {"s3": 1e7, "s4": 3e7}
    out = speed_at_equal_loss({"sparse_size": "s4", "n_dense_equivalent": 2e7}, "sparse", measured, sizes)
    assert out["dense_protocol_minutes"] == pytest.approx(20.0)
    assert out["measured_time_saving"] == pytest.approx(1 - 15.0 / 20.0)
    assert out["dense_measured"] == {"dense-s3": 10.0, "dense-s4": 30.0}
    beyond = speed_at_equal_loss({"sparse_size": "s4", "n_dense_equivalent": 5e7}, "sparse", measured, sizes)
    assert beyond["dense_protocol_minutes"] == pytest.approx(50.0)
    no_match = speed_at_equal_loss({"sparse_size": "s4", "n_dense_equivalent": None}, "sparse", measured, sizes)
    assert no_match["measured_time_saving"] is None and no_match["sparse_protocol_minutes"] == 15.0
    # a shape not measured, or one dense size only: nothing to compare
    assert speed_at_equal_loss({"sparse_size": "s3", "n_dense_equivalent": 2e7}, "sparse", measured, sizes) is None
    assert speed_at_equal_loss({"sparse_size": "s4", "n_dense_equivalent": 2e7}, "sparse",
                               _measured({"dense-s3": 10.0, "sparse-s4": 15.0}), sizes) is None


def test_report_tabulates_measured_inference_and_states_the_time_at_equal_loss(tmp_path):
    records = seeded_trials({"sparse": 3.0}, seeds=2, noise=0.0)
    n3, n4 = SEEDED_SIZES["s3"], SEEDED_SIZES["s4"]
    measured = _measured({"dense-s3": 10.0, "dense-s4": 30.0, "sparse-s3": 9.0, "sparse-s4": 28.0})
    files = R.build_report(records, tmp_path, n_boot=10, inference=measured)
    inf = files.fits["inference_at_equal_loss"]["sparse"]
    n_eq = inf["n_dense_equivalent"]
    dense_minutes = 10.0 + (30.0 - 10.0) * (n_eq - n3) / (n4 - n3)
    assert inf["measured"]["dense_protocol_minutes"] == pytest.approx(dense_minutes, rel=1e-9)
    assert inf["measured"]["measured_time_saving"] == pytest.approx(
        1 - measured["shapes"][f"sparse-{inf['sparse_size']}"]["protocol_minutes"] / dense_minutes, rel=1e-9)
    md = files.table_md.read_text()
    assert "## Inference cost (measured on GPU X" in md and "| sparse-s4 | sparse-s4 |" in md
    assert any("less time" in line and "GPU X" in line for line in R.multiplier_lines(files.fits))
    assert "Inference cost of each shape" in files.page_html.read_text()
    saved = json.loads(files.fits_json.read_text())
    assert saved["inference_measured"]["shapes"]["dense-s4"]["protocol_minutes"] == 30.0
    # without measurements the report says where they would come from
    plain = R.build_report(records, tmp_path / "plain", n_boot=10)
    assert "inference-json" in plain.page_html.read_text() and "## Inference cost" not in plain.table_md.read_text()


def test_scaling_report_cli_rejects_an_unreadable_inference_json_by_name(tmp_path):
    bad = tmp_path / "not_eval.json"
    bad.write_text("{")
    proc = subprocess.run([sys.executable, "-m", "jobs.scaling_report", "--experiment", "x", "--inference-json", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not_eval.json" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_config_names_the_measurements_for_its_report_without_changing_trial_hashes(tmp_path):
    """``evaluation.report_inference_json`` of the families study: read for the sweep's (and the
    import's) report; the committed records still belong to the plan; a file that cannot be read
    is named in the log and left out."""
    import dataclasses

    from pipeline.scaling_laws.offline import read_records
    from pipeline.scaling_laws.sweep import SweepConfig, plan_trials, report_inference

    cfg = SweepConfig.from_yaml(str(ROOT / "configs" / "sweep-families-1gpu.yaml"))
    measured = report_inference(cfg.evaluation)
    assert measured is not None and measured["shapes"]["sparse_per_layer-s4"]["measured_as"] == "sparse-s4"
    hashes = {p.config_hash for p in plan_trials(cfg)}
    records = read_records(sorted((COMMITTED.parent).glob("records-*.jsonl")))
    assert records and {r.config_hash for r in records} <= hashes
    logs: list[str] = []
    missing = dataclasses.replace(cfg.evaluation, report_inference_json=str(tmp_path / "gone.json"))
    assert report_inference(missing, logs.append) is None and "gone.json" in logs[0]
    assert report_inference(dataclasses.replace(cfg.evaluation, report_inference_json=None)) is None
