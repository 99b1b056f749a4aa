"""Rebuild the scaling report of a sweep from MLflow alone.

    python -m jobs.scaling_report --experiment timemoe-scaling [--tracking-uri URI] [--out DIR]

    ray job submit --working-dir . -- python -m jobs.scaling_report --experiment timemoe-scaling \
        --tracking-uri http://mlflow:5000

Reads the newest sweep parent run of the experiment (or ``--sweep NAME``), takes its FINISHED
child runs' params/metrics, fits L(C), L(N, D), N*(C) and the sparse-vs-dense compute
multiplier with bootstrap intervals, writes plots + table + JSON to ``--out`` and logs them on
the parent run under ``scaling_report/`` (``--no-log`` to skip).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The fits are thousands of tiny problems: BLAS threads only add contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pipeline.console import configure_output
from pipeline.scaling_laws.inference import read_measurements
from pipeline.scaling_laws.report import FIT_METRICS, rebuild_from_mlflow


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    ap = argparse.ArgumentParser(prog="python -m jobs.scaling_report", description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name of the sweep")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    ap.add_argument("--sweep", default=None, help="sweep name (tag scaling.sweep); default: newest sweep")
    ap.add_argument("--out", default="scaling_report", type=Path, help="output folder")
    ap.add_argument("--metric", default=None, choices=FIT_METRICS, help="metric to fit (default: held-out loss)")
    ap.add_argument("--n-boot", default=200, type=int, help="bootstrap resamples for the intervals")
    ap.add_argument("--no-log", action="store_true", help="do not upload the report to the parent run")
    ap.add_argument("--inference-json", default=None, type=Path,
                    help="benchmarks/evaluate_gpu.py --grid JSON: the shapes' measured inference cost")
    args = ap.parse_args(argv)
    try:
        inference = read_measurements(args.inference_json) if args.inference_json else None
    except ValueError as exc:
        ap.error(str(exc))
    files = rebuild_from_mlflow(args.experiment, args.out, tracking_uri=args.tracking_uri, sweep=args.sweep,
                                n_boot=args.n_boot, log=not args.no_log, metric=args.metric, inference=inference)
    print(files.table_md.read_text())
    print(f"report written to {files.out_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
