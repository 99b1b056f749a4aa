"""Register an exported checkpoint in the MLflow model registry; optionally promote it.

    python -m jobs.register --run-id RUN_ID --name timemoe --promote --benchmarks /data/benchmarks \\
        --datasets ETTh1 ETTh2 --horizons 96 --stride 8
    python -m jobs.register --checkpoint runs/exp1/final_model --name timemoe --tracking-uri http://mlflow:5000

Registration points the ``candidate`` alias at the new version; ``--promote`` moves ``champion``
to it only if its average zero-shot MSE beats the current champion's (``pipeline.evaluation.registry``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from pipeline.console import configure_output
from pipeline.evaluation.inference import InferenceOptionError, add_cli_options, options_from_args
from pipeline.evaluation.protocol import EvalConfig
from pipeline.evaluation.registry import (
    TRAIN_ARTIFACT_PATH,
    download_run_checkpoint,
    promote_if_better,
    register_checkpoint,
)
from pipeline.reports import pictures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.register", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="training run whose artifacts hold the exported model")
    src.add_argument("--checkpoint", help="a save_pretrained directory")
    p.add_argument("--artifact-path", default=TRAIN_ARTIFACT_PATH, help="the model's path in the run's artifacts")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--manifest", default=None, help="data manifest.json for the lineage fingerprint")
    p.add_argument("--promote", action="store_true", help="evaluate and move 'champion' if better")
    p.add_argument("--benchmarks", help="benchmark folder (needed with --promote)")
    p.add_argument("--datasets", nargs="+", default=None)
    p.add_argument("--horizons", nargs="+", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--stride", type=int, default=1)
    add_cli_options(p)  # where the promotion gate's evaluation runs
    p.add_argument("--eval-workers", default="auto", help="gate evaluation on Ray actors: auto, N, or 0")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    args = parse_args(argv)
    if args.promote and not args.benchmarks:
        print("--promote needs --benchmarks DIR", file=sys.stderr)
        return 2
    try:
        options = options_from_args(args)
    except InferenceOptionError as e:
        print(f"jobs.register: {e}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.checkpoint or download_run_checkpoint(args.run_id, tmp, args.artifact_path, args.tracking_uri)
            reg = register_checkpoint(ckpt, args.name, training_run_id=args.run_id, manifest_path=args.manifest,
                                      tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as err:  # nothing was registered; the message names the file
        if args.debug:
            raise
        print(f"jobs.register: {err}", file=sys.stderr)
        return 2
    print(f"[register] {reg.model_uri} (alias candidate)" if reg.new else f"[register] {reg.model_uri} (unchanged)",
          flush=True)
    table, protocol, decision = [], "not evaluated (register without --promote)", None
    if args.promote:
        cfg = EvalConfig(context=args.context, stride=args.stride, batch_size=options.batch_size)
        if args.datasets:
            cfg.datasets = args.datasets
        if args.horizons:
            cfg.horizons = args.horizons
        d = promote_if_better(args.name, reg.version, args.benchmarks, cfg, tracking_uri=args.tracking_uri,
                              options=options, workers=args.eval_workers)
        print(f"[register] promotion: {'granted' if d.promoted else 'refused'}: {d.reason}", flush=True)
        table = pictures.comparison_table({"timemoe": d.candidate_rows}) if d.candidate_rows else []
        protocol, decision = cfg.protocol_key(), f"{'promoted' if d.promoted else 'rejected'} ({d.reason})"
    if reg.new:  # the version's page in the MLflow UI: its evaluation table and where it comes from
        pictures.describe_version(args.name, reg.version, args.tracking_uri, table, "timemoe",
                                  protocol, decision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
