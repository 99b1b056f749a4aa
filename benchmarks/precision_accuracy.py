"""bf16 vs fp32 accuracy of one checkpoint on the zero-shot protocol: the same windows through
the same code path (``pipeline.evaluation.protocol.evaluate`` with a ``pipeline.evaluation.inference.ModelForecaster``),
once per dtype, and the relative MSE/MAE difference per (dataset, horizon) and on average.

    python benchmarks/precision_accuracy.py --model RUN/train/final_model --benchmarks DIR \\
        --stride 256 --json precision.json

The acceptance rule (docs/evaluation.md): bf16's average MSE within 0.5% (relative) of fp32's.
``--stride 1`` is the full protocol; a larger stride takes every stride-th window of it, the same
windows for both dtypes. Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluation.inference import InferenceOptions, ModelForecaster, load_checkpoint  # noqa: E402
from pipeline.evaluation.protocol import EvalConfig, evaluate  # noqa: E402

TOLERANCE = 0.005  # bf16 average MSE within 0.5% of fp32's


def compare(rows_by_dtype: dict[str, list[dict]], reference: str = "fp32") -> list[dict]:
    """One record per (dataset, horizon): each dtype's MSE/MAE and the relative difference of
    every other dtype to ``reference``."""
    keyed = {d: {(r["dataset"], r["horizon"]): r for r in rows} for d, rows in rows_by_dtype.items()}
    out = []
    for key, ref in keyed[reference].items():
        rec = {"dataset": key[0], "horizon": key[1], "windows": ref["windows"]}
        for d, rows in keyed.items():
            r = rows[key]
            rec[f"mse_{d}"], rec[f"mae_{d}"] = r["mse"], r["mae"]
            if d != reference:
                rec[f"mse_rel_{d}"] = r["mse"] / ref["mse"] - 1.0
                rec[f"mae_rel_{d}"] = r["mae"] / ref["mae"] - 1.0
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir, models:/NAME@ALIAS or runs:/ID/PATH")
    ap.add_argument("--benchmarks", required=True)
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--horizons", nargs="+", type=int, default=None)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="the first is the reference")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model, name = load_checkpoint(args.model)
    cfg = EvalConfig(stride=args.stride, progress=False)
    if args.datasets:
        cfg.datasets = list(args.datasets)
    if args.horizons:
        cfg.horizons = list(args.horizons)
    forecasters = {d: ModelForecaster(copy.deepcopy(model), InferenceOptions(args.device, d, args.batch_size), name=name)
                   for d in args.dtypes}
    ref, others = args.dtypes[0], args.dtypes[1:]
    rows_by_dtype: dict[str, list[dict]] = {d: [] for d in args.dtypes}
    seconds = {d: 0.0 for d in args.dtypes}
    datasets = list(cfg.datasets)
    print(f"{'dataset':10s} {'h':>4s} {'windows':>8s} " + " ".join(f"{'MSE ' + d:>11s}" for d in args.dtypes)
          + " " + " ".join(f"{'rel ' + d:>10s}" for d in others), flush=True)
    # one dataset at a time in every dtype, the table and JSON rewritten after each: a run cut
    # short by its time limit still leaves a like-for-like comparison of the datasets it finished
    for i, dataset in enumerate(datasets):
        part = dataclasses.replace(cfg, datasets=[dataset])
        for d, fc in forecasters.items():
            t0 = time.perf_counter()
            result = evaluate(fc, args.benchmarks, part, model_name=name)
            seconds[d] += time.perf_counter() - t0
            rows_by_dtype[d] += [asdict(r) for r in result.rows]
        table = compare(rows_by_dtype, ref)
        for r in table[-len(part.horizons):]:
            print(f"{r['dataset']:10s} {r['horizon']:4d} {r['windows']:8d} "
                  + " ".join(f"{r['mse_' + d]:11.6f}" for d in args.dtypes)
                  + " " + " ".join(f"{100 * r['mse_rel_' + d]:+9.3f}%" for d in others), flush=True)
        report(args, cfg, forecasters, rows_by_dtype, seconds, table, ref, others, complete=i == len(datasets) - 1)
    return 0


def report(args, cfg: EvalConfig, forecasters: dict, rows_by_dtype: dict[str, list[dict]], seconds: dict[str, float],
           table: list[dict], ref: str, others: list[str], complete: bool) -> None:
    """The verdict over the datasets finished so far, printed at the end and written as JSON."""
    def avg_mse(rows: list[dict]) -> float:
        per_dataset = {}
        for r in rows:
            per_dataset.setdefault(r["dataset"], []).append(r["mse"])
        return float(sum(sum(v) / len(v) for v in per_dataset.values()) / len(per_dataset))

    runs = {d: dict(seconds=seconds[d], avg_mse=avg_mse(rows), inference=forecasters[d].describe(),
                    windows=sum(r["windows"] for r in rows)) for d, rows in rows_by_dtype.items()}
    verdict = {d: dict(avg_mse_rel=runs[d]["avg_mse"] / runs[ref]["avg_mse"] - 1.0,
                       max_abs_row_mse_rel=max(abs(r[f"mse_rel_{d}"]) for r in table),
                       within_tolerance=abs(runs[d]["avg_mse"] / runs[ref]["avg_mse"] - 1.0) <= TOLERANCE)
               for d in others}
    if complete:
        for d, run in runs.items():
            print(f"{d}: avg MSE {run['avg_mse']:.6f}, {run['windows']} windows in {run['seconds']:.1f}s "
                  f"on {run['inference']}", flush=True)
        for d, v in verdict.items():
            print(f"{d} vs {ref}: average MSE {100 * v['avg_mse_rel']:+.3f}% (tolerance {100 * TOLERANCE:.1f}%: "
                  f"{'within' if v['within_tolerance'] else 'OUTSIDE'}); largest row {100 * v['max_abs_row_mse_rel']:.3f}%")
    if args.json:
        doc = dict(model=args.model, protocol=dict(stride=args.stride, datasets=cfg.datasets, horizons=cfg.horizons),
                   complete=complete, datasets_done=sorted({r["dataset"] for r in table}),
                   reference=ref, runs=runs, rows=table, verdict=verdict, tolerance=TOLERANCE,
                   torch=torch.__version__, float32_matmul_precision=torch.get_float32_matmul_precision(),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
