"""The thin CLI: flags override YAML, the resolved config is printed, RAY_ADDRESS connects to an
existing cluster (here the test session's), and bad configuration fails with a clear message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.preprocess import build_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_flags_override_yaml(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("seed: 3\npack: {window_length: 512, val_fraction: 0.05}\nmixture: {weights: {web: 0.5}}\n")
    cfg = build_config(parse_args(["--input", "a", "--input", "b", "--output", "o", "--config", str(cfg_path),
                                   "--window-length", "1024", "--fail-fast"]))
    assert cfg.inputs == ["a", "b"] and cfg.output == "o" and cfg.seed == 3 and cfg.fail_fast
    assert cfg.pack.window_length == 1024 and cfg.pack.val_fraction == 0.05
    assert cfg.mixture.weight("web") == 0.5 and cfg.mixture.weight("energy") == 1.0


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.inputs is empty"):
        build_config(parse_args(["--output", "o"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("clean: {windw: 64}\n")
    with pytest.raises(ValueError, match="unknown key 'windw' in section 'clean' \\(did you mean 'window'\\?\\)"):
        build_config(parse_args(["--input", "a", "--output", "o", "--config", str(bad)]))


def test_cli_runs_against_existing_cluster(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "sensors.jsonl", "w") as fh:
        for _ in range(8):
            fh.write(json.dumps({"sequence": rng.normal(0, 1, 1500).cumsum().round(4).tolist()}) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", "--input", str(raw), "--output", str(out), "--window-length", "512"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resolved config:" in proc.stdout and "window_length: 512" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["window_length"] == 512
    assert manifest["counts"]["total"]["points_in"] == 8 * 1500
    assert manifest["inputs"] and manifest["inputs"][0]["size"] > 0
