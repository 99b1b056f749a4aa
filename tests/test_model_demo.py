"""The interim demo job runs end to end: the loss falls and the forecast plot is written."""
from __future__ import annotations

import numpy as np


def test_demo_trains_and_writes_plot(tmp_path, capsys):
    from jobs.demo import main

    res = main(["--steps", "150", "--batch", "8", "--window", "64", "--lr", "0.01", "--horizon", "32", "--out", str(tmp_path)])
    assert np.mean(res["losses"][-10:]) < 0.9 * np.mean(res["losses"][:10])
    png = tmp_path / "forecast.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "points/s" in out and "held-out forecast" in out and np.isfinite(res["mse"])
