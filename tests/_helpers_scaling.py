"""Fake-but-realistic scaling trials for the report tests (no training involved).

Losses follow a known L(N, D) per family with 1% log-normal noise; the dense family is the
sparse law with N scaled down (a dense model of equal active parameters behaves like a smaller
sparse one), so dense needs more FLOPs for the same loss, as the Time-MoE paper reports.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from pipeline.scaling_laws.report import TrialRecord

SPARSE_LAW = dict(E=0.18, A=30.0, B=60.0, a=0.32, b=0.27)
SIZES = {"xs": 1.2e6, "s": 3.5e6, "m": 1.1e7, "l": 3.3e7}  # active params
BUDGETS = (2e7, 6e7, 2e8)  # points seen


def law(N, D, E, A, B, a, b):
    return E + A / np.asarray(N) ** a + B / np.asarray(D) ** b


def fake_trials(seed: int = 0, dense_efficiency: float = 0.35) -> list[TrialRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for family in ("sparse", "dense"):
        for size, n_active in SIZES.items():
            n_total = n_active * (2.3 if family == "sparse" else 1.0)
            fpp = 6 * n_active + 6 * 4 * 512 * 128  # 6N + attention term of a 512-point window
            for d in BUDGETS:
                n_eff = n_active if family == "sparse" else n_active * dense_efficiency
                loss = float(law(n_eff, d, **SPARSE_LAW) * np.exp(rng.normal(0, 0.01)))
                out.append(TrialRecord(
                    family=family, size=size, trial_hash=f"{family}-{size}-{d:.0e}",
                    n_total=n_total, n_active=n_active, points_seen=d, training_flops=fpp * d,
                    heldout_loss=loss, heldout_mse=loss * 2.1, zs_mse=0.9 * loss + 0.2, zs_mae=0.6 * loss + 0.3,
                    wall_time_s=d / 5e4, points_per_s=5e4, mfu=float("nan"),
                    zero_shot={"zs/ETTh1/mse": 0.9 * loss + 0.2, "zs/ETTh1/mae": 0.6 * loss + 0.3},
                ))
    return out


def write_test_shards(root, window_length: int, n_train: int = 64, n_val: int = 32, seed: int = 0):
    """Packed shards (train/ + val/ + manifest.json) of noisy sines, one series per window,
    in the format of ``preprocessing.schema`` (for tests, before real preprocessing runs)."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing import schema

    root = Path(root)
    rng = np.random.default_rng(seed)
    width = window_length + 1
    for split, n in ((schema.TRAIN_DIR, n_train), (schema.VAL_DIR, n_val)):
        t = np.arange(width)
        period = rng.uniform(8, 40, (n, 1))
        x = np.sin(2 * np.pi * t / period + rng.uniform(0, 6.3, (n, 1))) + 0.1 * rng.normal(size=(n, width))
        x = ((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)).astype(np.float32)
        table = pa.table({
            "values": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), width),
            "segment_ids": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * width, np.int32)), width),
            "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * width, np.uint8)), width),
            "seg_mean": pa.array([[0.0]] * n, pa.list_(pa.float64())),
            "seg_std": pa.array([[1.0]] * n, pa.list_(pa.float64())),
            "seg_series": pa.array([[f"synthetic/sine/{split}-{i}"] for i in range(n)], pa.list_(pa.string())),
        }, schema=schema.window_schema(window_length))
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / schema.SHARD_PATTERN.format(index=0))
    manifest = {"schema_version": schema.SCHEMA_VERSION, "window_length": window_length,
                "shards": {schema.TRAIN_DIR: [{"file": schema.SHARD_PATTERN.format(index=0), "rows": n_train}],
                           schema.VAL_DIR: [{"file": schema.SHARD_PATTERN.format(index=0), "rows": n_val}]},
                "rows": {schema.TRAIN_DIR: n_train, schema.VAL_DIR: n_val}}
    (root / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


def plain_torch_train(train_config: dict):
    """A minimal single-process training path (AdamW on the train shards, cycling) used to
    exercise the sweep's bookkeeping when Ray Train is not wanted; returns (model, info)."""
    import dataclasses
    import time

    import pyarrow.dataset as pads
    import torch

    from model import TimeMoeConfig, TimeMoeModel
    from preprocessing.schema import TRAIN_DIR, decode_batch, split_windows

    torch.set_num_threads(1)
    mc = train_config["model"]
    cfg = dataclasses.replace(TimeMoeConfig.preset(mc["preset"]), **mc.get("overrides", {}))
    tr = train_config["train"]
    torch.manual_seed(int(tr.get("seed", 0)))
    model = TimeMoeModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=float(train_config.get("optim", {}).get("lr", 1e-3)))
    table = pads.dataset(f"{train_config['data']['path']}/{TRAIN_DIR}", format="parquet").to_table()
    d = decode_batch({c: table.column(c) for c in ("values", "segment_ids", "loss_mask")})
    w = {k: torch.from_numpy(v) for k, v in split_windows(d["values"], d["segment_ids"], d["loss_mask"]).items()}
    n, gbs = len(d["values"]), int(tr["global_batch_size"])
    t0 = time.perf_counter()
    for step in range(int(tr["max_steps"])):
        idx = torch.arange(step * gbs, (step + 1) * gbs) % n
        out = model(w["inputs"][idx], segment_ids=w["segment_ids"][idx], labels=w["labels"][idx],
                    loss_mask=w["loss_mask"][idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model, {"train_seconds": time.perf_counter() - t0}


TINY_WINDOW = 32  # window of the tiny CPU sweeps in the tests


def tiny_sweep_raw(tmp_path: Path, data: Path, name: str) -> dict:
    """``configs/sweep-tiny-cpu.yaml`` shrunk for a test: its own sweep name and experiment,
    2 budgets of 2 and 4 steps (4 windows x 32 points), the given shards, a quick report."""
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "configs" / "sweep-tiny-cpu.yaml").read_text())
    raw["sweep"].update(name=name, experiment=f"exp-{name}", output_dir=str(tmp_path / "runs"))
    raw["grid"]["window_length"] = TINY_WINDOW
    raw["grid"]["budgets"] = [256, 512]
    raw["training"]["data"]["path"] = str(data)
    raw["evaluation"].update(heldout_windows=16, report_n_boot=10)
    return raw


# A known L(C) for the seed-axis tests: dense needs MULTIPLIER[family] times the sparse family's
# FLOPs for the same loss at every compute, i.e. L_dense(C) = L_family(C / m).
SEEDED_LAW = dict(E=0.2, A=40.0, alpha=0.12)
SEEDED_SIZES = {"s3": 1.47e7, "s4": 4.97e7}          # active params
SEEDED_BUDGETS = (1.2e7, 3.6e7, 1e8)                 # points seen
BALANCE = {"sparse": 4.0, "sparse_per_layer": 1.7}   # busiest/mean per layer, as issue 19 measured


def seeded_trials(multipliers: dict[str, float], seeds: int = 3, noise: float = 0.01, seed: int = 0,
                  layers: int = 4) -> list[TrialRecord]:
    """Trials of dense and the given sparse families on a sizes x budgets grid, ``seeds`` seeds per
    cell, losses from ``SEEDED_LAW`` with each sparse family ``multipliers[family]`` times more
    compute-efficient than dense, times log-normal seed noise of sd ``noise``."""
    rng = np.random.default_rng(seed)

    def loss_at(C):
        return SEEDED_LAW["E"] + SEEDED_LAW["A"] * C ** -SEEDED_LAW["alpha"]

    out = []
    for family in ("dense", *multipliers):
        m = multipliers.get(family, 1.0)
        for size, n_active in SEEDED_SIZES.items():
            fpp = 6 * n_active + 6 * layers * 1024 * 256
            for d in SEEDED_BUDGETS:
                C = fpp * d
                # dense: L(C); a sparse family reaches dense's L(m C) at C
                clean = loss_at(C * m) if family != "dense" else loss_at(C)
                for s in range(seeds):
                    loss = float(clean * np.exp(rng.normal(0, noise)))
                    bal = [] if family == "dense" else list(BALANCE[family] + rng.normal(0, 0.05, layers))
                    out.append(TrialRecord(
                        family=family, size=size, trial_hash=f"{family}-{size}-{d:.0e}-{s}", seed=s,
                        n_total=n_active * (1 if family == "dense" else 2.3), n_active=n_active, points_seen=d,
                        training_flops=C, heldout_loss=loss, heldout_mse=2 * loss, zs_mse=0.5 + loss / 4,
                        expert_balance=bal, train_expert_balance=[b + 0.1 for b in bal],
                        data_mixture={"real": 1.1e7, "synthetic/kernelsynth": 1.05e8},
                    ))
    return out
