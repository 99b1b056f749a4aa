"""``benchmarks/precision_accuracy.py`` (bf16 against fp32 on the zero-shot protocol): both
dtypes see the same windows, and the JSON is complete after each dataset, so a run stopped by
its time limit still holds a like-for-like comparison of the datasets it finished."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests._train_helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_each_dataset_is_compared_in_both_dtypes_and_written_as_it_finishes(shared_data, tmp_path):
    tiny_checkpoint(tmp_path / "tiny", seed=0)
    out = tmp_path / "precision.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "precision_accuracy.py"), "--model", str(tmp_path / "tiny"),
           "--benchmarks", str(shared_data / "benchmarks"), "--datasets", "ETTh1", "ETTh2", "--horizons", "96",
           "--stride", "2048", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["datasets_done"] == ["ETTh1", "ETTh2"]
    assert [(r["dataset"], r["horizon"]) for r in doc["rows"]] == [("ETTh1", 96), ("ETTh2", 96)]
    for r in doc["rows"]:
        assert r["windows"] > 0 and r["mse_rel_bf16"] == r["mse_bf16"] / r["mse_fp32"] - 1.0
    mean = lambda d: sum(r[f"mse_{d}"] for r in doc["rows"]) / 2  # noqa: E731
    assert abs(doc["runs"]["fp32"]["avg_mse"] - mean("fp32")) < 1e-12
    assert doc["runs"]["fp32"]["windows"] == doc["runs"]["bf16"]["windows"] == sum(r["windows"] for r in doc["rows"])
    assert "bf16 vs fp32: average MSE" in proc.stdout
