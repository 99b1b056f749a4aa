"""Fine-tune a pretrained Time-MoE on benchmark train splits and evaluate it in-distribution (the
paper's full-shot protocol); the logic lives in ``pipeline.finetune``.

    python -m jobs.finetune --parent runs/exp1/final_model --benchmarks /data/benchmarks --datasets ETTh1 ETTm1
    python -m jobs.finetune --parent models:/timemoe@champion --benchmarks DIR --datasets ETTh1 --method lora \\
        --config configs/finetune-gpu.yaml --register timemoe-etth1 --tracking-uri http://mlflow:5000
    python -m jobs.preprocess --input s3://bucket/my-series --output s3://bucket/my-packed   # your own data
    python -m jobs.finetune --parent models:/timemoe@champion --data s3://bucket/my-packed --register timemoe-mine

On a cluster::

    ray job submit --working-dir . -- python -m jobs.finetune --parent models:/timemoe@champion ...

Each dataset: its train split (never its validation or test rows) becomes training shards, the
training loop runs from the parent's weights (``--method``: full, linear_probe, lora), then the
fine-tuned model and the parent are evaluated on the test split with the zero-shot protocol.
With ``--data`` (a ``jobs.preprocess`` output): trains on its train/ split and scores both models
on its val/ split with the held-out loss (``pipeline.finetune.own_data``). Writes
``OUTPUT/run-*/summary.json`` and ``table.md``. Trailing ``key=value`` arguments override the
training config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typed_config
from pipeline.evaluation.inference import InferenceOptionError, add_cli_options, options_from_args
from pipeline.finetune.data import ContaminationError
from pipeline.finetune.own_data import finetune_on_packed
from pipeline.finetune.protocol import FinetuneJob, in_distribution


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--parent", required=True, help="checkpoint dir, models:/NAME@ALIAS or runs:/ID/PATH")
    p.add_argument("--benchmarks", default=None, help="folder with <dataset>.csv[.gz] files")
    p.add_argument("--data", default=None, help="instead of --benchmarks: a folder or s3:// prefix written by "
                   "jobs.preprocess; trains on its train/ split, scores both models on its val/ split")
    p.add_argument("--heldout-windows", type=int, default=2048, help="with --data: val windows scored")
    p.add_argument("--datasets", nargs="+", default=["ETTh1"])
    p.add_argument("--split", default="train", help="the split fine-tuning reads: only 'train' is allowed")
    p.add_argument("--method", choices=["full", "linear_probe", "lora"], default=None,
                   help="which weights train (default: the config's finetune.method)")
    p.add_argument("--config", default="configs/finetune-cpu.yaml", help="training config (see configs/finetune-*.yaml)")
    p.add_argument("--horizons", nargs="+", type=int, default=[96, 192, 336, 720])
    p.add_argument("--context", type=int, default=None, help="one context for all horizons (default: the paper's)")
    p.add_argument("--window-length", type=int, default=None, help="training window (default: context + horizon)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--stride", type=int, default=None, help="between training windows (default: window / 4)")
    p.add_argument("--eval-stride", type=int, default=1, help="test windows (1 = the paper's protocol)")
    p.add_argument("--output-dir", default="outputs/finetune")
    p.add_argument("--register", default=None, metavar="NAME", help="register the fine-tuned model(s) under NAME")
    p.add_argument("--tracking-uri", default=None)
    add_cli_options(p)
    p.add_argument("--eval-workers", default="auto", help="evaluation on Ray actors, one GPU each: auto, N or 0")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.eval_every=10")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.split != "train":
            raise ContaminationError(f"--split {args.split}: fine-tuning may read only the train split; the "
                                     "validation and test borders hold the data the model is evaluated on")
        if (args.data is None) == (args.benchmarks is None):
            raise ValueError("give either --benchmarks (the paper's in-distribution protocol) or --data (a "
                             "jobs.preprocess output), not both or neither")
        if args.data:
            given = [f"--{k.replace('_', '-')}" for k in ("window_length", "stride", "context") if getattr(args, k)]
            if given:
                raise ValueError(f"{', '.join(given)}: with --data the windows are the packed data's own "
                                 "(re-pack with jobs.preprocess to change them)")
        overrides = list(args.overrides) + ([f"finetune.method={args.method}"] if args.method else [])
        job = FinetuneJob(parent=args.parent, benchmarks=args.benchmarks or "", datasets=list(args.datasets),
                          config=args.config, overrides=overrides, horizons=list(args.horizons),
                          context=args.context, window_length=args.window_length, epochs=args.epochs, stride=args.stride,
                          eval_stride=args.eval_stride, output_dir=args.output_dir, register_name=args.register,
                          tracking_uri=args.tracking_uri, inference=options_from_args(args),
                          eval_workers=args.eval_workers, data=args.data, heldout_windows=args.heldout_windows)
        if job.data:
            return report_own_data(finetune_on_packed(job))
        summary = in_distribution(job)
    except (ContaminationError, InferenceOptionError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"jobs.finetune: {typed_config.redact_secrets(str(err))}", file=sys.stderr)
        return 2
    print((Path(summary["run_dir"]) / "table.md").read_text(), flush=True)
    for name, d in summary["datasets"].items():
        extra = f"; registered {d['registered']} ({'promoted' if d['promoted'] else 'not promoted'})" if d["registered"] else ""
        print(f"[finetune] {name}: {d['steps']} steps in {d['epoch_seconds']:.1f}s "
              f"({d['seconds']:.0f}s with start-up and export), model {d['model']}{extra}", flush=True)
    print(f"[finetune] summary: {summary['run_dir']}/summary.json", flush=True)
    return 0


def report_own_data(summary: dict) -> int:
    print((Path(summary["run_dir"]) / "table.md").read_text(), flush=True)
    extra = (f"; registered {summary['registered']} ({'promoted' if summary['promoted'] else 'not promoted'})"
             if summary["registered"] else "")
    print(f"[finetune] {summary['data']}: {summary['steps']} steps in {summary['epoch_seconds']:.1f}s "
          f"({summary['seconds']:.0f}s with start-up and export), model {summary['model']}{extra}", flush=True)
    print(f"[finetune] summary: {summary['run_dir']}/summary.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
