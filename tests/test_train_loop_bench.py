"""``benchmarks/train_loop.py``: its shards hold exactly the rows the step benchmark times (so the
loop and the step are compared on the same data layout), and its CPU smoke run reports the three
rows with the loop's medians taken after the skipped steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_loop import write_packed_shards  # noqa: E402
from train_step import make_batch  # noqa: E402

from pipeline.train import data  # noqa: E402


def test_the_loop_reads_the_rows_the_step_benchmark_builds(tmp_path):
    out = write_packed_shards(tmp_path / "packed", rows=6, length=64, seed=3, rows_per_shard=4)
    reader = data.PlainReader(data.shard_files(str(out), data.TRAIN_DIR), 6, 0, 1, 0, shuffle=False)
    (batch,) = [data.to_torch_batch(b) for b in reader.epoch(0)]
    want = make_batch(6, 64, packed=True, device="cpu", seed=3)
    assert torch.equal(batch["inputs"], want["inputs"]) and torch.equal(batch["labels"], want["labels"])
    assert torch.equal(batch["segment_ids"].long(), want["segment_ids"])
    assert torch.equal(batch["loss_mask"].bool(), want["loss_mask"])  # no loss across a series boundary


def test_cpu_smoke_reports_step_engine_and_loop_rows(tmp_path):
    out = tmp_path / "train_loop.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_loop.py"), "--device", "cpu", "--presets", "tiny",
           "--windows", "2", "--length", "128", "--steps", "8", "--skip", "3", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"step", "engine", "loop"} and not any("error" in r for r in rows.values()), rows
    assert rows["step"]["x_step"] == 1.0 and all(r["points_per_s"] > 0 for r in rows.values())
    assert rows["loop"]["steps_measured"] == 3  # steps 4..6; 7 and 8 ran under the profiler
    assert rows["loop"]["profile"]["wall_ms_per_step"] > 0 and "busy_share" in rows["loop"]["profile"]
    assert rows["loop"]["data_wait_ms_max"] <= rows["loop"]["data_wait_ms_max_all"]
