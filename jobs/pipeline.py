"""The main job, end to end on one machine: corpus -> preprocessing (Ray Data) -> pretraining
(Ray Train + DeepSpeed, tracked in MLflow) -> zero-shot evaluation -> model registry.

    python -m jobs.pipeline                                   # ~3 min on 2 CPU cores
    python -m jobs.pipeline --benchmarks /data/benchmarks --output-dir outputs/qs train.max_steps=20
    python -m jobs.pipeline --input /data/time300b --scale 1 --output-dir outputs/mine
    python -m jobs.pipeline --resume outputs/quickstart/run-20261122-101500   # after a stop or crash

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.pipeline

Without ``--input`` the embedded synthetic corpus is generated into ``RUN/corpus``. Stages hand
over through durable locations only (``RUN/packed/manifest.json``, ``RUN/train/final_model``, the
MLflow run id, ``RUN/eval/``, where RUN = ``OUTPUT/run-<timestamp>``). MLflow goes to ``$MLFLOW_TRACKING_URI`` or
``sqlite:///OUTPUT/mlflow.db``. Trailing ``key=value`` arguments override the training config.

``--resume RUN`` continues a stopped, killed or failed run in its own folder: preprocessing is
skipped when its manifest was published (a run publishes it last, so it is whole), training
restarts from its latest checkpoint (same MLflow run), and evaluation and registration run again.
Pass the same arguments as the first time (trailing overrides may change step counts, not the
model or the batch geometry: the checkpoint's config fingerprint is checked).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

import typed_config
from pipeline.config import load_config
from pipeline.evaluation.baselines import make_baseline
from pipeline.evaluation.inference import InferenceOptionError, add_cli_options, options_from_args
from pipeline.evaluation.protocol import EvalConfig, evaluate, load_forecaster, log_to_mlflow, plot_forecasts
from pipeline.evaluation.registry import (
    PromotionDecision,
    promote_if_better,
    record_zero_shot_score,
    register_checkpoint,
)
from pipeline.evaluation.workers import evaluate_model
from pipeline.quickstart import (
    alias_of,
    load_quickstart_config,
    write_heldout_benchmarks,
)
from pipeline.tracking import experiment_id, tracking_uri
from pipeline.train.ray_runtime import training_run_id

DEFAULT_CONFIG = "configs/quickstart.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="quickstart YAML (see configs/quickstart.yaml)")
    p.add_argument("--input", nargs="+", default=None, help="raw corpus folders/URLs (default: embedded synthetic)")
    p.add_argument("--benchmarks", default=None, help="benchmark CSV folder (default: held-out synthetic series)")
    p.add_argument("--datasets", nargs="+", default=None, help="benchmark datasets (default: all in the folder)")
    p.add_argument("--output-dir", default="outputs/quickstart")
    p.add_argument("--scale", type=float, default=None, help="size of the embedded corpus (1.0 = ~1.3M points)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (OUTPUT/run-*): skip published stages, resume training")
    add_cli_options(p, from_config=True)  # evaluation and the promotion gate; default: the config's eval section
    p.add_argument("--eval-workers", default=None, help="evaluation on Ray actors, one GPU each: auto (default), N, or 0")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.max_steps=20")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def stage(name: str) -> float:
    print(f"\n===== {name} =====", flush=True)
    return time.time()


def training_speed(metrics_file: Path, skip: int = 20) -> dict[str, float]:
    """Median points/s and step time, and the longest data wait, after the first ``skip`` steps
    (compilation and warm-up)."""
    import statistics

    if not metrics_file.exists():
        return {}
    steps = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steady = [m for m in steps if "points_per_s" in m][skip:]
    if not steady:
        return {}
    return {"steps_logged": len(steps), "points_per_s_median": statistics.median(m["points_per_s"] for m in steady),
            "step_time_s_median": statistics.median(m["step_time_s"] for m in steady),
            "data_wait_ms_max": max(m.get("data_wait_ms", 0.0) for m in steady)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    timings: dict[str, float] = {}
    try:
        qs = load_quickstart_config(args.config)
    except ValueError as err:
        print(f"jobs.pipeline: {typed_config.redact_secrets(str(err))}", file=sys.stderr)
        return 2
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / "resolved_config.yaml").exists():
            raise SystemExit(f"--resume {args.resume}: not a pipeline run folder (no resolved_config.yaml)")
        out = run_dir.parent
    else:
        out = Path(args.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        # Derived data of this run goes to its own folder (a re-run never collides with an earlier
        # run's shards or Ray Train state); the MLflow store is shared, so champions compete.
        run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=False)
    uri = tracking_uri(store_dir=out)

    # ---- resolve every stage's config up front, print it, keep a copy next to the outputs
    pre = qs.preprocess
    pre.output = str(run_dir / "packed")
    try:
        train_cfg = load_config(qs.train.config,
                                list(qs.train.overrides) + [f"data.path={pre.output}",
                                                            f"train.output_dir={run_dir / 'train'}",
                                                            f"tracking.tracking_uri={uri}"] + list(args.overrides))
    except ValueError as err:
        print(f"jobs.pipeline: {typed_config.redact_secrets(str(err))}", file=sys.stderr)
        return 2
    eq = qs.eval
    for key in ("device", "dtype", "batch_size", "compile"):  # flags win over the config's eval section
        if getattr(args, key) is None:
            setattr(args, key, getattr(eq, key))
    try:
        inference = options_from_args(args)
    except InferenceOptionError as e:
        print(f"jobs.pipeline: {e}", file=sys.stderr)
        return 2
    eval_workers = args.eval_workers or eq.workers
    eval_cfg = EvalConfig(horizons=list(eq.horizons), context=eq.context, stride=eq.stride,
                          batch_size=inference.batch_size)
    scale = args.scale if args.scale is not None else qs.corpus.scale
    reg_name = qs.register.name
    resolved = {"output_dir": str(out), "run_dir": str(run_dir), "tracking_uri": uri, "inputs": args.input or [str(run_dir / "corpus")],
                "corpus": {"seed": qs.corpus.seed, "scale": scale} if not args.input else None,
                "preprocess": pre.to_dict(), "train": typed_config.to_plain(train_cfg),
                "eval": {"benchmarks": args.benchmarks or str(out / "heldout"), "horizons": eval_cfg.horizons,
                         "context": eval_cfg.context, "stride": eval_cfg.stride,
                         "device": inference.device, "dtype": inference.dtype, "batch_size": inference.batch_size,
                         "compile": inference.compile,
                         "workers": eval_workers,
                         "baselines": list(eq.baselines)},
                "register": {"name": reg_name}}
    text = typed_config.redact_secrets(yaml.safe_dump(resolved, sort_keys=False))
    # a resumed run keeps the first resolution and adds its own next to it
    name = f"resolved_config-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml" if args.resume else "resolved_config.yaml"
    (run_dir / name).write_text(text)
    print("# resolved config\n" + text, flush=True)

    # ---- 1. corpus
    published = (Path(pre.output) / "manifest.json").exists()
    if args.resume:
        print(f"[pipeline] resuming {run_dir}: preprocessing {'published, skipped' if published else 'to redo'}",
              flush=True)
    if args.input:
        pre.inputs = list(args.input)
    elif published:
        pre.inputs = [str(run_dir / "corpus")]
    else:
        t = stage("1/5 corpus: embedded synthetic")
        import shutil

        from preprocessing.synthetic import generate_default_corpus

        shutil.rmtree(run_dir / "corpus", ignore_errors=True)  # a stopped run may have left part of it
        summary = generate_default_corpus(str(run_dir / "corpus"), seed=qs.corpus.seed, scale=scale)
        pre.inputs = [str(run_dir / "corpus")]
        print(f"[pipeline] {summary['series']} series, {summary['points']:,} points in {time.time() - t:.1f}s", flush=True)
        timings["corpus"] = time.time() - t

    # ---- 2. preprocessing (Ray Data) -> RUN/packed
    t = stage("2/5 preprocess (Ray Data)")
    if published:
        print(f"[pipeline] {pre.output} was published by the run being resumed: not redone", flush=True)
    else:
        from preprocessing.errors import user_error
        from preprocessing.job import run_preprocess

        try:
            prep = run_preprocess(pre)
        except Exception as e:  # noqa: BLE001 - a user error ends the run in one line, a bug re-raises
            cause = user_error(e)
            if cause is None:
                raise
            print(f"jobs.pipeline: preprocessing failed: {' '.join(str(cause).split())}", file=sys.stderr, flush=True)
            return 2
        print(f"[pipeline] packed {prep.manifest['rows']} rows (window {pre.pack.window_length}), "
              f"efficiency {prep.efficiency:.3f}, {time.time() - t:.1f}s -> {pre.output}", flush=True)
    timings["preprocess"] = time.time() - t

    # ---- 3. pretraining (Ray Train + DeepSpeed) -> RUN/train/final_model + MLflow run
    t = stage("3/5 pretrain (Ray Train + DeepSpeed)")
    experiment_id(uri, train_cfg.tracking.experiment, out / "mlartifacts")
    from pipeline.train.ray_runtime import RUN_NAME, run_ray

    resume = bool(args.resume) and (Path(train_cfg.train.output_dir) / "ray" / RUN_NAME).exists()
    result = run_ray(train_cfg, resume=resume)
    if getattr(result, "error", None):
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    run_id = training_run_id(result)
    final_model = Path(train_cfg.train.output_dir) / "final_model"
    print(f"[pipeline] trained {time.time() - t:.1f}s: metrics {result.metrics}; run {run_id}; model {final_model}",
          flush=True)
    timings["pretrain"] = time.time() - t

    # ---- 4. zero-shot evaluation -> RUN/eval
    t = stage("4/5 zero-shot evaluation")
    bench = args.benchmarks or str(out / "heldout")
    if not args.benchmarks:
        eval_cfg.datasets = write_heldout_benchmarks(bench, seed=eq.heldout_seed)
    elif args.datasets:
        eval_cfg.datasets = list(args.datasets)
    eval_dir = run_dir / "eval"
    model, _ = load_forecaster(str(final_model), options=inference)  # in this process: the plot
    forecasters = {"timemoe": model} | {b: make_baseline(b) for b in resolved["eval"]["baselines"]}
    results, tables = {}, []
    for name, fc in forecasters.items():
        if name == "timemoe":  # on the GPU workers (pipeline.evaluation.workers)
            res = evaluate_model(str(final_model), bench, eval_cfg, inference, eval_workers, uri, model_name=name)
        else:
            res = evaluate(fc, bench, eval_cfg, model_name=name)
        files = res.write(eval_dir / name)
        if name == "timemoe":
            model_result = res
            h = eval_cfg.horizons[0]
            png = plot_forecasts(forecasters, bench, res.rows[0].dataset, h, eval_dir / "forecasts.png",
                                 context=eval_cfg.context_for(h))
            files.append(png)
            if run_id:
                log_to_mlflow(res, files, run_id=run_id, tracking_uri=uri)
        results[name] = {"avg_mse": res.average_mse(), "inference": res.inference,
                         "rows": json.loads((eval_dir / name / "results.json").read_text())["rows"]}
        tables.append(res.table())
    eval_json = eval_dir / "summary.json"
    eval_json.write_text(json.dumps({"protocol": eval_cfg.protocol_key(), "benchmarks": bench, "models": results},
                                    indent=2))
    print(f"[pipeline] evaluated in {time.time() - t:.1f}s", flush=True)
    timings["evaluate"] = time.time() - t

    # ---- 5. registry: register (alias candidate), promote to champion if it beats the champion
    t = stage("5/5 register + promote")
    reg = register_checkpoint(final_model, reg_name, training_run_id=run_id,
                              manifest_path=str(Path(pre.output) / "manifest.json"), tracking_uri=uri)
    if reg.new:
        # the candidate's score is stage 4's evaluation of the same checkpoint on the same protocol
        record_zero_shot_score(reg_name, reg.version, bench, model_result, tracking_uri=uri)
        decision = promote_if_better(reg_name, reg.version, bench, eval_cfg, tracking_uri=uri, options=inference,
                                     workers=eval_workers)
    else:  # a finished run resumed: its version and the registry's aliases stay as they are
        decision = PromotionDecision(False, reg.version, model_result.average_mse(), None, None,
                                     f"version {reg.version} already registered by this run; aliases unchanged")
    aliases = alias_of(reg_name, reg.version, uri)
    timings["register"] = time.time() - t
    timings["total"] = time.time() - t_start
    (run_dir / "summary.json").write_text(json.dumps({
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "training": training_speed(Path(train_cfg.train.output_dir) / "metrics.jsonl") | {"final_metrics": result.metrics},
        "evaluation": {"protocol": eval_cfg.protocol_key(), "inference": model_result.inference,
                       "avg_mse": {k: v["avg_mse"] for k, v in results.items()}, "table": model_result.table()},
        "registry": {"model_uri": reg.model_uri, "aliases": aliases, "promoted": decision.promoted,
                     "reason": decision.reason},
        "mlflow_run_id": run_id}, indent=2, default=str))

    # ---- summary
    print("\n# resolved config\n" + text, flush=True)
    print("\n".join(tables), flush=True)
    print(f"""
===== summary ({time.time() - t_start:.0f}s) =====
curation report : {Path(pre.output) / 'report.html'}
manifest        : {Path(pre.output) / 'manifest.json'}
MLflow run id   : {run_id}
model           : {final_model}
registered      : {reg.model_uri} aliases {aliases} ({'promoted' if decision.promoted else 'not promoted'}: {decision.reason})
run summary     : {run_dir / 'summary.json'} (stage times, training speed, evaluation, registry)
eval table      : {eval_json} (avg MSE {', '.join(f'{k} {v["avg_mse"]:.4f}' for k, v in results.items())})
forecast plot   : {eval_dir / 'forecasts.png'}
MLflow UI       : mlflow ui --backend-store-uri {typed_config.redact_secrets(uri)}
""", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
