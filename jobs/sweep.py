r"""Scaling sweep: model sizes x data budgets x {sparse, dense twin}, one MLflow child run each.

    python -m jobs.sweep --config configs/sweep-tiny-cpu.yaml

    ray job submit --working-dir . -- python -m jobs.sweep --config configs/sweep-gpu.yaml \
        --tracking-uri http://mlflow:5000

Re-running the same command skips FINISHED trials (matched by config hash, tag
``scaling.trial_hash``) and resumes unfinished ones. ``--plan`` prints the grid and exits.
At the end the report (plots, table, fitted parameters) is built from MLflow and logged on the
parent run; ``python -m jobs.scaling_report`` rebuilds it later.

Air-gapped GPU nodes (no Ray, no MLflow; needs torch, deepspeed, pyarrow, scipy): one process
per GPU, each training its shard of the same plan in-process and appending one JSON line per
finished trial (re-running skips the trials already in the file; SIGTERM, e.g. a job's time
limit, ends a shard after a checkpoint of its running trial, exit code 143, and re-running
resumes that trial there)::

    for k in 0 1 2 3 4 5 6 7; do
        CUDA_VISIBLE_DEVICES=$k python -m jobs.sweep --config configs/sweep-8gpu-offline.yaml \
            --offline-records out/records-$k.jsonl --shard $k/8 > out/shard-$k.log 2>&1 &
    done; wait

Then, where MLflow is, the records become FINISHED child runs of the sweep (same tags and
params as online trials, so an online re-run skips them) and the report is built::

    python -m jobs.sweep --config configs/sweep-8gpu-offline.yaml --tracking-uri URI \
        --import-records out/records-*.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.console import configure_output
from pipeline.scaling_laws.grid import format_grid
from pipeline.scaling_laws.sweep import SweepConfig, plan_trials
from pipeline.train.stop_request import STOPPED_EXIT_CODE, TrainingStopped


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    ap = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="sweep YAML (configs/sweep-*.yaml)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides sweep.tracking_uri)")
    ap.add_argument("--plan", action="store_true", help="print the trial grid and exit")
    ap.add_argument("--no-report", action="store_true", help="skip building the report at the end")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--offline-records", metavar="PATH.jsonl", default=None,
                      help="offline mode (no Ray, no MLflow): train this shard's trials in this process "
                           "and append one JSON line per finished trial to PATH; trials already there are skipped")
    mode.add_argument("--import-records", metavar="PATH.jsonl", nargs="+", default=None,
                      help="log offline records as FINISHED child runs of the sweep in MLflow, then build the report")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="with --offline-records: run every N-th trial of the plan starting at I (default 0/1: all)")
    ap.add_argument("--gpu-id", type=int, default=None, metavar="K",
                    help="with --offline-records: train on GPU K (the K-th of CUDA_VISIBLE_DEVICES if set, else device K)")
    ap.add_argument("--trials-per-gpu", type=int, default=1, metavar="N",
                    help="with --offline-records: how many trial processes share this GPU at once; written into "
                         "the records, whose points/s is then a share of the GPU (default 1)")
    ap.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                    help="with --offline-records: save a resumable checkpoint every STEPS steps (the newest kept), "
                         "so that a trial cut short (a job's time limit) resumes when the shard runs again; "
                         "not part of the trials' hashes (default 0: none)")
    args = ap.parse_args(argv)
    offline_only = (args.shard != "0/1" or args.gpu_id is not None or args.trials_per_gpu != 1
                    or args.checkpoint_every != 0)
    if offline_only and not args.offline_records:
        ap.error("--shard, --gpu-id, --trials-per-gpu and --checkpoint-every go with --offline-records")
    if args.trials_per_gpu < 1:
        ap.error(f"--trials-per-gpu must be >= 1, got {args.trials_per_gpu}")
    if args.checkpoint_every < 0:
        ap.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    cfg = SweepConfig.from_yaml(args.config)
    if args.tracking_uri:
        cfg.sweep.tracking_uri = args.tracking_uri
    if args.plan:
        plans = plan_trials(cfg)
        print(format_grid([p.spec for p in plans]))
        for p in plans:
            print(f"{p.spec.name:<28} hash={p.config_hash} steps={p.steps} points={p.points_seen}")
        return 0
    if args.offline_records:
        from pipeline.scaling_laws.offline import parse_shard, run_offline

        shard = parse_shard(args.shard)
        if args.gpu_id is not None:  # before anything initialises CUDA
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if visible and args.gpu_id >= len(visible):
                ap.error(f"--gpu-id {args.gpu_id}: CUDA_VISIBLE_DEVICES lists only {len(visible)} devices")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[args.gpu_id] if visible else str(args.gpu_id)
        try:
            off = run_offline(cfg, args.offline_records, shard=shard, trials_per_gpu=args.trials_per_gpu,
                              checkpoint_every=args.checkpoint_every)
        except TrainingStopped:  # its checkpoint is saved: the same command resumes the trial
            return STOPPED_EXIT_CODE
        return 1 if off.failed else 0
    if args.import_records:
        from pipeline.scaling_laws.offline import import_records

        imp = import_records(cfg, args.import_records, report=not args.no_report)
        print(f"parent run {imp.parent_run_id}: imported {len(imp.imported)}, skipped {len(imp.skipped)}, "
              f"foreign {len(imp.foreign)}")
        return 1 if imp.foreign else 0
    from pipeline.scaling_laws.sweep import run_sweep

    result = run_sweep(cfg, report=not args.no_report)
    print(f"parent run {result.parent_run_id}: ran {len(result.ran)}, skipped {len(result.skipped)}, "
          f"resumed {len(result.resumed)}, failed {len(result.failed)}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
