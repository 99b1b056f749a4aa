"""Scaling sweep: model sizes x data budgets x {sparse, dense twin}, one MLflow child run each.

    python -m jobs.sweep --config configs/sweep-tiny-cpu.yaml

    ray job submit --working-dir . -- python -m jobs.sweep --config configs/sweep-gpu.yaml \
        --tracking-uri http://mlflow:5000

Re-running the same command skips FINISHED trials (matched by config hash, tag
``scaling.trial_hash``) and resumes unfinished ones. ``--plan`` prints the grid and exits.
At the end the report (plots, table, fitted parameters) is built from MLflow and logged on the
parent run; ``python -m jobs.scaling_report`` rebuilds it later.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.scaling.grid import format_grid
from pipeline.scaling.sweep import SweepConfig, plan_trials, run_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="sweep YAML (configs/sweep-*.yaml)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides sweep.tracking_uri)")
    ap.add_argument("--plan", action="store_true", help="print the trial grid and exit")
    ap.add_argument("--no-report", action="store_true", help="skip building the report at the end")
    args = ap.parse_args(argv)
    cfg = SweepConfig.from_yaml(args.config)
    if args.tracking_uri:
        cfg.sweep.tracking_uri = args.tracking_uri
    if args.plan:
        plans = plan_trials(cfg)
        print(format_grid([p.spec for p in plans]))
        for p in plans:
            print(f"{p.spec.name:<28} hash={p.config_hash} steps={p.steps} points={p.points_seen}")
        return 0
    result = run_sweep(cfg, report=not args.no_report)
    print(f"parent run {result.parent_run_id}: ran {len(result.ran)}, skipped {len(result.skipped)}, "
          f"resumed {len(result.resumed)}, failed {len(result.failed)}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
