"""Zero-shot evaluation with the paper's protocol (the logic lives in ``pipeline.evaluation.protocol``).

    python -m jobs.evaluate --model runs/exp1/final_model --benchmarks /data/benchmarks
    python -m jobs.evaluate --model models:/timemoe@champion --benchmarks DIR --datasets ETTh1 --horizons 96 --stride 16
    python -m jobs.evaluate --model baseline:seasonal_naive --benchmarks DIR --output out/ \\
        --tracking-uri http://mlflow:5000 --run-id RUN_ID
    python -m jobs.evaluate --model DIR --benchmarks DIR --device cuda:1 --dtype fp32 --batch-size 128

Runs on the first CUDA GPU in bf16 when there is one (``--device``/``--dtype``), and spreads the
work over one Ray actor per GPU when Ray is running or several GPUs are visible
(``--eval-workers``; ``pipeline.evaluation.workers``).

Writes ``results.json``, ``results.csv``, ``results.txt`` and ``forecasts.png`` to ``--output``
and, when a run id is given (or an MLflow run is active), logs metrics ``zeroshot/<ds>/<h>/mse``
and those files to that run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.console import configure_output
from pipeline.evaluation.baselines import LastValue, SeasonalNaive
from pipeline.evaluation.inference import InferenceOptionError, InferenceOptions, add_cli_options, options_from_args
from pipeline.evaluation.protocol import EvalConfig, evaluate, load_forecaster, log_to_mlflow, plot_forecasts
from pipeline.evaluation.workers import evaluate_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir, models:/NAME@ALIAS, runs:/ID/PATH or baseline:NAME")
    p.add_argument("--benchmarks", required=True, help="folder with <dataset>.csv[.gz] files")
    p.add_argument("--datasets", nargs="+", default=None, help="default: ETTh1 ETTh2 ETTm1 ETTm2 weather")
    p.add_argument("--horizons", nargs="+", type=int, default=None, help="default: 96 192 336 720")
    p.add_argument("--context", type=int, default=None, help="one context for all horizons (default: the paper's)")
    p.add_argument("--stride", type=int, default=1, help="test window stride (1 = the paper's protocol)")
    add_cli_options(p)
    p.add_argument("--eval-workers", default="auto",
                   help="Ray actors, one GPU each: auto (one per GPU under Ray or with several local GPUs), N, or 0")
    p.add_argument("--include-last-window", action="store_true",
                   help="count the last possible window too (the released code skips it)")
    p.add_argument("--output", default="eval_out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--run-id", default=None, help="MLflow run to log to")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p.parse_args(argv)


def _positive(name: str, values: list[int] | None) -> None:
    for v in values or []:
        if v < 1:
            raise InferenceOptionError(f"{name} {v}: must be >= 1")


def main(argv: list[str] | None = None) -> int:
    configure_output()  # no progress-bar redraws or colour codes in a log file
    args = parse_args(argv)
    try:
        _positive("--horizons", args.horizons)
        _positive("--stride", [args.stride])
        if args.context is not None:
            _positive("--context", [args.context])
        options = options_from_args(args)
    except InferenceOptionError as e:
        print(f"jobs.evaluate: {e}", file=sys.stderr)
        return 2
    cfg = EvalConfig(context=args.context, stride=args.stride, batch_size=options.batch_size,
                     include_last_window=args.include_last_window)
    if args.datasets:
        cfg.datasets = args.datasets
    if args.horizons:
        cfg.horizons = args.horizons
    print(f"[eval] {args.model} on {args.benchmarks}: {cfg.protocol_key()}", flush=True)
    try:
        return run(args, cfg, options)
    except (FileNotFoundError, ValueError) as err:  # a user's input; the message names it
        if args.debug:
            raise
        print(f"jobs.evaluate: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, cfg: EvalConfig, options: InferenceOptions) -> int:
    if args.model.startswith("baseline:"):
        forecaster, name = load_forecaster(args.model, args.tracking_uri)
        result = evaluate(forecaster, args.benchmarks, cfg, model_name=name)
    else:
        result = evaluate_model(args.model, args.benchmarks, cfg, options, args.eval_workers, args.tracking_uri)
        name = result.model
    files = result.write(args.output)
    if not args.no_plot:
        h = cfg.horizons[0]
        ctx = cfg.context_for(h)
        if args.model.startswith("baseline:"):
            shown = {name: forecaster, "naive": LastValue()}
        else:
            shown = {name: load_forecaster(args.model, args.tracking_uri, options)[0], "naive": LastValue(),
                     "seasonal_naive": SeasonalNaive()}
        files.append(plot_forecasts(shown, args.benchmarks, result.rows[0].dataset, h,
                                    Path(args.output) / "forecasts.png", context=ctx))
    print(result.table(), flush=True)
    print(f"[eval] wrote {', '.join(str(f) for f in files)}", flush=True)
    if args.run_id or args.tracking_uri:  # a tracking URI alone: a new run in experiment zeroshot-eval
        run_id = log_to_mlflow(result, files, run_id=args.run_id, tracking_uri=args.tracking_uri,
                               new_run_experiment="zeroshot-eval")
        print(f"[eval] logged to MLflow run {run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
