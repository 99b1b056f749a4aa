"""``benchmarks/evaluate_gpu.py`` runs end to end on the CPU with a tiny model (its smoke test):
every row measured, the JSON written, a protocol estimate for every (dtype, variant)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_invocation_writes_rows_and_protocol_estimate(tmp_path):
    out = tmp_path / "evaluate_gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evaluate_gpu.py"), "--presets", "tiny", "--pairs", "512/96",
           "--batches", "8", "--device", "cpu", "--json", str(out), "--repeats", "1", "--breakdown"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = [r for r in doc["rows"] if r["kind"] == "generate"]
    assert {(r["dtype"], r["variant"]) for r in rows} == {(d, v) for d in ("bf16", "fp32") for v in ("compiled", "eager")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["windows_per_s"] > 0 and r["mfu"] > 0 and r["flops_per_window"] > 0
    for r in rows:  # --breakdown: the prefill timed alone, as a share of the row's median call
        b = r["breakdown"]
        assert b["prefill_s"] > 0 and b["profile"]["wall_ms_per_step"] > 0, b
        assert b["prefill_share"] == pytest.approx(b["prefill_s"] / r["batch_s_median"]), b
    assert "where the time goes" in proc.stdout
    compiled = [r for r in rows if r["variant"] == "compiled"]
    assert all(r["compile_s"] is not None for r in compiled)
    # compiled and eager forecasts agree (fp32 tightly, bf16 to its rounding)
    for r in rows:
        if "max_abs_diff" in r:
            assert r["max_abs_diff"] < (1e-4 if r["dtype"] == "fp32" else 0.1), r
    windows = doc["protocol_windows"]["per_pair"]["512/96"]
    assert windows == 2 * 2784 * 7 + 2 * 11424 * 7 + 10443 * 21  # ETTh x2, ETTm x2, weather (paper splits)
    est = {(e["dtype"], e["variant"]): e for e in doc["protocol_estimate"]}
    assert set(est) == {(r["dtype"], r["variant"]) for r in rows}
    for e in est.values():
        assert e["complete"] and e["seconds"] > 0
        assert e["seconds"] == sum(p["windows"] / p["windows_per_s"] for p in e["per_pair"].values())
    assert "protocol min" in proc.stdout  # the summary table


def test_grid_shapes_are_the_sweep_trials_models_and_their_flops(tmp_path):
    """``--grid``: each (family, size) of a sweep YAML measured on the very model its trials train,
    with that model's FLOPs per window; a family that differs only in its training loss is not
    measured twice but named beside the one it equals."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from evaluate_gpu import SAME_INFERENCE_AS, add_grid_shapes, model_shape

    from model.flops import count_parameters, generate_flops_per_window
    from pipeline.scaling_laws.grid import GridConfig, expand_grid

    config = tmp_path / "sweep.yaml"
    grid = {"base_preset": "tiny", "window_length": 64, "num_experts": 4, "num_experts_per_tok": 2,
            "sizes": [{"name": "a", "layers": 2, "hidden": 64}], "budgets": [1e5],
            "families": ["dense", "sparse", "sparse_per_layer"]}
    config.write_text(yaml.safe_dump({"grid": grid}))
    names = add_grid_shapes(str(config))
    assert sorted(names) == ["dense-a", "sparse-a"]
    assert SAME_INFERENCE_AS == {"sparse_per_layer-a": "sparse-a"}
    assert model_shape("sparse_per_layer-a").router_aux_loss_scope == "per_layer"
    assert model_shape("sparse-a").router_aux_loss_scope == "pooled"
    trials = {t.family: t for t in expand_grid(GridConfig.from_dict(grid))}
    for family, trial in trials.items():
        shape = model_shape(f"{family}-a")
        assert count_parameters(shape).active == trial.n_active
    assert model_shape("dense-a").use_dense and not model_shape("sparse-a").use_dense
    out = tmp_path / "evaluate_gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evaluate_gpu.py"), "--grid", str(config), "--pairs", "64/8",
           "--batches", "4", "--device", "cpu", "--dtypes", "fp32", "--variants", "eager", "--e2e", "none",
           "--json", str(out), "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["preset"]: r for r in doc["rows"] if r["kind"] == "generate"}
    assert set(rows) == set(names) and all(r["status"] == "ok" for r in rows.values())
    assert doc["same_inference_as"] == {"sparse_per_layer-a": "sparse-a"}
    for name, r in rows.items():
        assert r["flops_per_window"] == generate_flops_per_window(model_shape(name), 64, 8)


def test_protocol_floor_is_each_pairs_time_times_its_floor_share():
    """With ``--breakdown`` on the GPU every row has a floor share (GEMM + attention over wall
    time); the protocol's floor is the sum over pairs of its time there times that share, and
    only a complete set of pairs gets one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from evaluate_gpu import protocol_estimates

    windows = {"per_pair": {"512/96": 1000, "3072/720": 100}}
    rows = [dict(kind="generate", status="ok", impl="ours", preset="p", dtype="bf16", variant="compiled", context=T,
                 horizon=H, batch=8, windows_per_s=wps, mfu=0.1, breakdown={"floor_share": share})
            for (T, H, wps, share) in ((512, 96, 100.0, 0.5), (3072, 720, 10.0, 0.6))]
    (est,) = protocol_estimates(rows, windows)
    assert est["minutes"] == pytest.approx((10 + 10) / 60)
    assert est["floor_minutes"] == pytest.approx((10 * 0.5 + 10 * 0.6) / 60)
    (partial,) = protocol_estimates(rows[:1], windows)
    assert "floor_minutes" not in partial
