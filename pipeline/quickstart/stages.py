"""The quickstart as stages (``jobs.pipeline`` runs them in order):

    QuickstartRun.start   resolve every stage's config up front, print it once, keep a copy
    .corpus               the embedded synthetic corpus (without --input)
    .preprocess           Ray Data -> RUN/packed (skipped when a resumed run had published it)
    .pretrain             Ray Train + DeepSpeed -> RUN/train/final_model and an MLflow run
    .evaluate             the zero-shot protocol, model and baselines -> RUN/eval
    .register             MLflow registry: candidate, champion if it beats the champion
    .finish               RUN/summary.json, the tables, the summary as the log's last lines

Stages hand over through durable locations only (``RUN/packed/manifest.json``,
``RUN/train/final_model``, the MLflow run id, ``RUN/eval/``), so ``--resume RUN`` can redo
whatever a stopped run had not finished. A mistake of the user's is a :class:`UserError` (the job
prints one line and exits 2); a failed training a :class:`TrainingFailed` (exit 1).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import typed_config
from pipeline.config import TrainConfig, load_config
from pipeline.console import init_ray, quiet_ray_shutdown
from pipeline.evaluation.baselines import make_baseline
from pipeline.evaluation.inference import InferenceOptionError, InferenceOptions, options_from_args
from pipeline.evaluation.protocol import (
    EvalConfig,
    EvalResult,
    evaluate,
    load_forecaster,
    log_to_mlflow,
    plot_forecasts,
)
from pipeline.evaluation.registry import (
    PromotionDecision,
    Registered,
    aliases_of,
    promote_if_better,
    record_zero_shot_score,
    register_checkpoint,
)
from pipeline.evaluation.workers import evaluate_model
from pipeline.quickstart.config import QuickstartConfig, load_quickstart_config, write_heldout_benchmarks
from pipeline.reports import pictures
from pipeline.reports.run_report import RunReport, build_run_report
from pipeline.tracking import experiment_id, tracking_uri
from pipeline.train.ray_runtime import RUN_NAME, run_ray, training_run_id
from preprocessing.config import PreprocessConfig


class UserError(Exception):
    """A mistake in the job's input or configuration: one line, exit 2."""


class TrainingFailed(Exception):
    """Ray Train ended the training with an error: exit 1."""


def stage(name: str) -> float:
    print(f"\n===== {name} =====", flush=True)
    return time.time()


def say(line: str) -> None:
    print(f"[pipeline] {line}", flush=True)


def training_speed(metrics_file: Path, skip: int = 20) -> dict[str, float]:
    """Median points/s and step time, and the longest data wait, after the first ``skip`` steps
    (compilation and warm-up)."""
    if not metrics_file.exists():
        return {}
    steps = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steady = [m for m in steps if "points_per_s" in m][skip:]
    if not steady:
        return {}
    return {"steps_logged": len(steps), "points_per_s_median": statistics.median(m["points_per_s"] for m in steady),
            "step_time_s_median": statistics.median(m["step_time_s"] for m in steady),
            "data_wait_ms_max": max(m.get("data_wait_ms", 0.0) for m in steady)}


@dataclass
class Evaluation:
    bench: str
    results: dict[str, dict[str, Any]]  # forecaster -> avg_mse, inference, rows
    tables: list[str]
    model_result: EvalResult
    comparison: list[dict[str, Any]]
    worse: list[str]
    summary_json: Path


@dataclass
class Registration:
    reg: Registered
    decision: PromotionDecision
    aliases: list[str]
    report: RunReport | None


@dataclass
class QuickstartRun:
    """One run of the quickstart, its configuration resolved (see :meth:`start`)."""

    args: argparse.Namespace
    qs: QuickstartConfig
    out: Path
    run_dir: Path
    uri: str
    pre: PreprocessConfig
    train_cfg: TrainConfig
    inference: InferenceOptions
    eval_cfg: EvalConfig
    eval_workers: Any
    scale: float
    t_start: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    published: bool = False
    result: Any = None
    run_id: str | None = None
    final_model: Path | None = None
    evaluation: Evaluation | None = None
    registration: Registration | None = None

    # ------------------------------------------------------------------ 0. config
    @classmethod
    def start(cls, args: argparse.Namespace) -> "QuickstartRun":
        """Resolve every stage's config up front (a bad value fails here, before any work), print
        it once and keep a copy next to the outputs."""
        try:
            qs = load_quickstart_config(args.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        if args.resume:
            run_dir = Path(args.resume).resolve()
            if not (run_dir / "resolved_config.yaml").exists():
                raise UserError(f"--resume {args.resume}: not a pipeline run folder (no resolved_config.yaml)")
            out = run_dir.parent
        else:
            out = Path(args.output_dir).resolve()
            out.mkdir(parents=True, exist_ok=True)
            # Derived data of this run goes to its own folder (a re-run never collides with an
            # earlier run's shards or Ray Train state); the MLflow store is shared, so champions compete.
            run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
            run_dir.mkdir(parents=True, exist_ok=False)
        uri = tracking_uri(store_dir=out)
        pre = qs.preprocess
        pre.output = str(run_dir / "packed")
        try:
            train_cfg = load_config(qs.train.config, list(qs.train.overrides) + [
                f"data.path={pre.output}", f"train.output_dir={run_dir / 'train'}", f"tracking.tracking_uri={uri}",
            ] + list(args.overrides))
        except ValueError as err:
            raise UserError(str(err)) from None
        eq = qs.eval
        for key in ("device", "dtype", "batch_size", "compile"):  # flags win over the config's eval section
            if getattr(args, key) is None:
                setattr(args, key, getattr(eq, key))
        try:
            inference = options_from_args(args)
        except InferenceOptionError as err:
            raise UserError(str(err)) from None
        eval_cfg = EvalConfig(horizons=list(eq.horizons), context=eq.context, stride=eq.stride,
                              batch_size=inference.batch_size)
        run = cls(args, qs, out, run_dir, uri, pre, train_cfg, inference, eval_cfg, args.eval_workers or eq.workers,
                  args.scale if args.scale is not None else qs.corpus.scale)
        run.write_resolved_config()
        return run

    def write_resolved_config(self) -> None:
        a, eq = self.args, self.qs.eval
        resolved = {
            "output_dir": str(self.out), "run_dir": str(self.run_dir), "tracking_uri": self.uri,
            "inputs": a.input or [str(self.run_dir / "corpus")],
            "corpus": {"seed": self.qs.corpus.seed, "scale": self.scale} if not a.input else None,
            "preprocess": self.pre.to_dict(), "train": typed_config.to_plain(self.train_cfg),
            "eval": {"benchmarks": a.benchmarks or str(self.out / "heldout"), "horizons": self.eval_cfg.horizons,
                     "context": self.eval_cfg.context, "stride": self.eval_cfg.stride,
                     "device": self.inference.device, "dtype": self.inference.dtype,
                     "batch_size": self.inference.batch_size, "compile": self.inference.compile,
                     "workers": self.eval_workers, "baselines": list(eq.baselines)},
            "register": {"name": self.qs.register.name},
        }
        text = typed_config.redact_secrets(yaml.safe_dump(resolved, sort_keys=False))
        # a resumed run keeps the first resolution and adds its own next to it
        name = (f"resolved_config-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml" if a.resume
                else "resolved_config.yaml")
        (self.run_dir / name).write_text(text)
        print("# resolved config\n" + text, flush=True)

    # ------------------------------------------------------------------ 1. corpus
    def corpus(self) -> None:
        self.published = (Path(self.pre.output) / "manifest.json").exists()
        if self.args.resume:
            say(f"resuming {self.run_dir}: preprocessing {'published, skipped' if self.published else 'to redo'}")
        if self.args.input:
            self.pre.inputs = list(self.args.input)
            return
        self.pre.inputs = [str(self.run_dir / "corpus")]
        if self.published:
            return
        t = stage("1/5 corpus: embedded synthetic")
        from preprocessing.synthetic import generate_default_corpus

        shutil.rmtree(self.run_dir / "corpus", ignore_errors=True)  # a stopped run may have left part of it
        summary = generate_default_corpus(str(self.run_dir / "corpus"), seed=self.qs.corpus.seed, scale=self.scale)
        say(f"{summary['series']} series, {summary['points']:,} points in {time.time() - t:.1f}s")
        self.timings["corpus"] = time.time() - t

    # ------------------------------------------------------------------ 2. preprocessing
    def preprocess(self) -> None:
        t = stage("2/5 preprocess (Ray Data)")
        init_ray()
        if self.published:
            say(f"{self.pre.output} was published by the run being resumed: not redone")
        else:
            from preprocessing.errors import user_error
            from preprocessing.job import run_preprocess

            try:
                prep = run_preprocess(self.pre)
            except Exception as e:  # noqa: BLE001 - a user error ends the run in one line, a bug re-raises
                cause = user_error(e)
                if cause is None:
                    raise
                raise UserError(f"preprocessing failed: {' '.join(str(cause).split())}") from None
            say(f"packed {prep.manifest['rows']} rows (window {self.pre.pack.window_length}), "
                f"efficiency {prep.efficiency:.3f}, {time.time() - t:.1f}s -> {self.pre.output}")
        self.timings["preprocess"] = time.time() - t

    # ------------------------------------------------------------------ 3. pretraining
    def pretrain(self) -> None:
        t = stage("3/5 pretrain (Ray Train + DeepSpeed)")
        experiment_id(self.uri, self.train_cfg.tracking.experiment, self.out / "mlartifacts")
        resume = bool(self.args.resume) and (Path(self.train_cfg.train.output_dir) / "ray" / RUN_NAME).exists()
        self.result = run_ray(self.train_cfg, resume=resume)
        if getattr(self.result, "error", None):
            raise TrainingFailed(f"training failed: {self.result.error}")
        self.run_id = training_run_id(self.result)
        self.final_model = Path(self.train_cfg.train.output_dir) / "final_model"
        say(f"trained {time.time() - t:.1f}s: metrics {self.result.metrics}; run {self.run_id}; model {self.final_model}")
        self.timings["pretrain"] = time.time() - t

    # ------------------------------------------------------------------ 4. evaluation
    def evaluate(self) -> None:
        t = stage("4/5 zero-shot evaluation")
        bench = self.args.benchmarks or str(self.out / "heldout")
        if not self.args.benchmarks:
            self.eval_cfg.datasets = write_heldout_benchmarks(bench, seed=self.qs.eval.heldout_seed)
        elif self.args.datasets:
            self.eval_cfg.datasets = list(self.args.datasets)
        eval_dir = self.run_dir / "eval"
        model, _ = load_forecaster(str(self.final_model), options=self.inference)  # in this process: the plot
        forecasters = {"timemoe": model} | {b: make_baseline(b) for b in self.qs.eval.baselines}
        results, tables, model_result = {}, [], None
        for name, fc in forecasters.items():
            if name == "timemoe":  # on the GPU workers (pipeline.evaluation.workers)
                res = evaluate_model(str(self.final_model), bench, self.eval_cfg, self.inference, self.eval_workers,
                                     self.uri, model_name=name)
            else:
                res = evaluate(fc, bench, self.eval_cfg, model_name=name)
            files = res.write(eval_dir / name)
            if name == "timemoe":
                model_result = res
                h = self.eval_cfg.horizons[0]
                files.append(plot_forecasts(forecasters, bench, res.rows[0].dataset, h, eval_dir / "forecasts.png",
                                            context=self.eval_cfg.context_for(h)))
                if self.run_id:
                    log_to_mlflow(res, files, run_id=self.run_id, tracking_uri=self.uri)
            results[name] = {"avg_mse": res.average_mse(), "inference": res.inference,
                             "rows": json.loads((eval_dir / name / "results.json").read_text())["rows"]}
            tables.append(res.table())
        summary_json = eval_dir / "summary.json"
        summary_json.write_text(json.dumps({"protocol": self.eval_cfg.protocol_key(), "benchmarks": bench,
                                            "models": results}, indent=2))
        comparison = pictures.comparison_table({name: r["rows"] for name, r in results.items()})
        if self.run_id:  # the model beside the baselines, as a picture and an MLflow table, on the training run
            pictures.log_evaluation(self.run_id, self.uri, comparison, "timemoe", eval_dir)
        self.evaluation = Evaluation(bench, results, tables, model_result, comparison,
                                     pictures.worse_than_baselines(comparison, "timemoe"), summary_json)
        say(f"evaluated in {time.time() - t:.1f}s")
        self.timings["evaluate"] = time.time() - t

    # ------------------------------------------------------------------ 5. registry
    def register(self) -> None:
        t = stage("5/5 register + promote")
        ev, name = self.evaluation, self.qs.register.name
        reg = register_checkpoint(self.final_model, name, training_run_id=self.run_id,
                                  manifest_path=str(Path(self.pre.output) / "manifest.json"), tracking_uri=self.uri)
        if reg.new:
            # the candidate's score is stage 4's evaluation of the same checkpoint on the same protocol
            record_zero_shot_score(name, reg.version, ev.bench, ev.model_result, tracking_uri=self.uri)
            decision = promote_if_better(name, reg.version, ev.bench, self.eval_cfg, tracking_uri=self.uri,
                                         options=self.inference, workers=self.eval_workers)
        else:  # a finished run resumed: its version and the registry's aliases stay as they are
            decision = PromotionDecision(False, reg.version, ev.model_result.average_mse(), None, None,
                                         f"version {reg.version} already registered by this run; aliases unchanged")
        pictures.describe_version(name, reg.version, self.uri, ev.comparison, "timemoe", self.eval_cfg.protocol_key(),
                                  f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
        report = None
        if self.run_id:
            try:
                report = build_run_report(self.run_id, self.run_dir / "report", tracking_uri=self.uri)
            except Exception as e:  # noqa: BLE001 - the page is a view of the run; the run itself succeeded
                say(f"run report not written ({type(e).__name__}: {typed_config.redact_secrets(str(e))})")
        self.registration = Registration(reg, decision, aliases_of(name, reg.version, self.uri), report)
        self.timings["register"] = time.time() - t

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """RUN/summary.json, then the tables and the summary as the log's last lines (what Ray
        prints while shutting down goes to a file)."""
        ev, rg = self.evaluation, self.registration
        self.timings["total"] = time.time() - self.t_start
        (self.run_dir / "summary.json").write_text(json.dumps({
            "stage_seconds": {k: round(v, 1) for k, v in self.timings.items()},
            "training": training_speed(Path(self.train_cfg.train.output_dir) / "metrics.jsonl")
            | {"final_metrics": self.result.metrics},
            "evaluation": {"protocol": self.eval_cfg.protocol_key(), "inference": ev.model_result.inference,
                           "avg_mse": {k: v["avg_mse"] for k, v in ev.results.items()}, "table": ev.model_result.table()},
            "registry": {"model_uri": rg.reg.model_uri, "aliases": rg.aliases, "promoted": rg.decision.promoted,
                         "reason": rg.decision.reason},
            "mlflow_run_id": self.run_id}, indent=2, default=str))
        print("\n".join(ev.tables), flush=True)
        quiet_ray_shutdown(self.run_dir / "ray-shutdown.log")
        print(self.summary(), flush=True)

    def summary(self) -> str:
        ev, rg = self.evaluation, self.registration
        verdict = "".join(f"worse than a baseline: {w}\n" for w in ev.worse)
        promoted = f"{'promoted' if rg.decision.promoted else 'not promoted'}: {rg.decision.reason}"
        avg = ", ".join(f"{k} {v['avg_mse']:.4f}" for k, v in ev.results.items())
        return f"""
===== summary ({time.time() - self.t_start:.0f}s) =====
{verdict}run report      : {rg.report.html if rg.report else '- (no MLflow run)'} (one page: curves, expert load, evaluation, registry)
curation report : {Path(self.pre.output) / 'report.html'}
manifest        : {Path(self.pre.output) / 'manifest.json'}
MLflow run id   : {self.run_id}
model           : {self.final_model}
registered      : {rg.reg.model_uri} aliases {rg.aliases} ({promoted})
run summary     : {self.run_dir / 'summary.json'} (stage times, training speed, evaluation, registry)
eval table      : {ev.summary_json} (avg MSE {avg})
forecast plot   : {self.run_dir / 'eval' / 'forecasts.png'}
MLflow UI       : mlflow ui --backend-store-uri {typed_config.redact_secrets(self.uri)}
"""
