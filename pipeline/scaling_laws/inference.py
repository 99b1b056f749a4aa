"""Measured inference cost of a sweep's model shapes, for the report's sparse-vs-dense comparison.

The measurements come from ``benchmarks/evaluate_gpu.py --grid SWEEP.yaml --json OUT.json`` on a
GPU: rows named ``<family>-<size>`` with windows/s and forward FLOPs per forecast at each
context/horizon pair, the stride-1 protocol's minutes per shape, and ``same_inference_as`` for
families whose forward is another's (they differ only in training). Speed does not depend on
the weights, so these rows stand for every trial of that family and size.

``speed_at_equal_loss`` turns the report's FLOPs-based reading (``report.inference_at_equal_loss``:
the dense size that matches a sparse family's best loss) into measured time: the protocol minutes
of the sparse model against those of that dense size, taken linear in active parameters through
the dense sizes measured, as the FLOPs are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_measurements(path: str | Path) -> dict[str, Any]:
    """{"device", "date", "source", "shapes": {"<family>-<size>": {"measured_as", "protocol_minutes",
    "windows_per_s": {pair: v}, "flops_per_window": {pair: v}, "dtype", "variant"}}} from an
    ``evaluate_gpu.py`` JSON. Per shape the fastest complete protocol estimate of our code is kept."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable evaluate_gpu.py JSON ({exc})") from exc
    if not isinstance(doc, dict) or "rows" not in doc or "protocol_estimate" not in doc:
        raise ValueError(f"{path}: not an evaluate_gpu.py JSON (no 'rows' / 'protocol_estimate')")
    best: dict[str, dict[str, Any]] = {}
    for est in doc["protocol_estimate"]:
        if est.get("impl") != "ours" or not est.get("complete"):
            continue
        name = est["preset"]
        if name not in best or est["minutes"] < best[name]["protocol_minutes"]:
            best[name] = {"measured_as": name, "protocol_minutes": float(est["minutes"]),
                          "dtype": est["dtype"], "variant": est["variant"]}
    for name, shape in best.items():
        rows = [r for r in doc["rows"] if r.get("kind") == "generate" and r.get("status") == "ok"
                and r.get("impl") == "ours" and r.get("preset") == name
                and r.get("dtype") == shape["dtype"] and r.get("variant") == shape["variant"]]
        speed: dict[str, float] = {}
        for r in rows:
            pair = f"{r['context']}/{r['horizon']}"
            if r["windows_per_s"] > speed.get(pair, 0.0):
                speed[pair] = float(r["windows_per_s"])
                shape.setdefault("flops_per_window", {})[pair] = float(r["flops_per_window"])
        shape["windows_per_s"] = speed
    for alias, name in (doc.get("same_inference_as") or {}).items():
        if name in best:
            best[alias] = dict(best[name], measured_as=name)
    meta = doc.get("meta") or {}
    return {"device": meta.get("device"), "date": meta.get("date"), "source": str(path), "shapes": best}


def speed_at_equal_loss(equal_loss: dict[str, Any], family: str, measured: dict[str, Any],
                        dense_sizes: dict[str, float], dense_family: str = "dense") -> dict[str, Any] | None:
    """Measured protocol minutes of ``family``'s best model and of the dense model of equal loss.

    ``equal_loss``: one family's entry of ``report.inference_at_equal_loss`` (``sparse_size``,
    ``n_dense_equivalent``); ``dense_sizes``: size name -> active parameters of the dense cells.
    The dense minutes at ``n_dense_equivalent`` come from a straight line in active parameters
    through the measured dense sizes (least squares). None when a needed shape was not measured."""
    shapes = measured["shapes"]
    sparse = shapes.get(f"{family}-{equal_loss['sparse_size']}")
    dense = [(n, shapes[f"{dense_family}-{size}"]["protocol_minutes"]) for size, n in dense_sizes.items()
             if f"{dense_family}-{size}" in shapes]
    if sparse is None or len({n for n, _ in dense}) < 2:
        return None
    out: dict[str, Any] = {"sparse_protocol_minutes": sparse["protocol_minutes"], "device": measured["device"],
                           "dense_measured": {f"{dense_family}-{s}": shapes[f"{dense_family}-{s}"]["protocol_minutes"]
                                              for s in dense_sizes if f"{dense_family}-{s}" in shapes}}
    n_eq = equal_loss.get("n_dense_equivalent")
    if n_eq is None:
        return out | {"dense_protocol_minutes": None, "measured_time_saving": None}
    slope, intercept = np.polyfit([n for n, _ in dense], [m for _, m in dense], 1)
    dense_minutes = float(slope * n_eq + intercept)
    return out | {"dense_protocol_minutes": dense_minutes,
                  "measured_time_saving": 1.0 - sparse["protocol_minutes"] / dense_minutes}
