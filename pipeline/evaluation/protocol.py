"""Zero-shot evaluation with the paper's protocol (spec section 6) -- the one place it lives.

Protocol, per dataset and horizon H:
1. every channel is an independent univariate series;
2. splits: ETTh fixed borders 12/4/4 months, ETTm the same times 4, others 70/10/20
   (``pipeline.evaluation.benchmark_data.split_borders``);
3. a per-channel StandardScaler is fitted on the train split and applied to all rows;
4. test windows: the forecast start t runs over the test split at stride 1 (``stride`` > 1 for
   quick runs); the context is the ``context`` rows before t and may reach back before the test
   start; the paper's contexts are 512/1024/2048/3072 for H = 96/192/336/720;
5. MSE and MAE over all predicted points of all windows and channels, on scaled values.

Window count: the released code (``BenchmarkEvalDataset``) iterates
``range(window_length, n_points)`` and so skips the very last possible window: ETTh at H = 96
gives 2880 - 96 = 2784 windows per channel. We follow it by default so that numbers compare
with the paper; ``include_last_window=True`` counts all 2785.

Where we differ from the released code (documented in docs/evaluation.md): the released code
feeds the dataset-scaled context straight into ``generate``; we call the model's
``forecast(series, horizon)``, which z-scores each context and maps the forecast back (the
contract of ``model.TimeMoeModel.forecast``, matching how the model was pre-trained on
normalised sequences). Where a context would reach before row 0 (short non-ETT files at long
contexts) the released code wraps around through a negative index; we hand over the shorter
context instead.

Shape legend: B = windows in a batch, T = context length, H = horizon, C = channels.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.evaluation.baselines import Forecaster, make_baseline
from pipeline.evaluation.benchmark_data import (
    DEFAULT_DATASETS,
    BenchmarkDataset,
    load_benchmark,
    scaled_values,
    split_borders,
)
from pipeline.evaluation.inference import InferenceOptions
from pipeline.evaluation.inference import load_forecaster as load_model_forecaster
from pipeline.tracking import experiment_id
from pipeline.tracking import tracking_uri as resolve_tracking_uri

PAPER_HORIZONS = (96, 192, 336, 720)
PAPER_CONTEXTS = {96: 512, 192: 1024, 336: 2048, 720: 3072}


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    horizons: list[int] = field(default_factory=lambda: list(PAPER_HORIZONS))
    context: int | None = None  # None: the paper's context for each horizon
    stride: int = 1
    batch_size: int | None = None  # None: the forecaster's own (``batch_size_for``), else 256
    include_last_window: bool = False  # False = the released code's count (2784 for ETTh, H=96)
    progress: bool = True

    def context_for(self, horizon: int) -> int:
        if self.context is not None:
            return self.context
        if horizon not in PAPER_CONTEXTS:
            raise ValueError(f"horizon {horizon} has no paper context ({PAPER_CONTEXTS}); pass context=")
        return PAPER_CONTEXTS[horizon]

    def protocol_key(self) -> str:
        """Identifies what was measured (two scores are comparable only with equal keys)."""
        ctx = "paper" if self.context is None else str(self.context)
        return (f"datasets={','.join(self.datasets)};horizons={','.join(map(str, self.horizons))};"
                f"context={ctx};stride={self.stride};last={int(self.include_last_window)}")


@dataclass
class EvalRow:
    dataset: str
    horizon: int
    context: int
    mse: float
    mae: float
    windows: int  # over all channels
    points: int
    seconds: float


def window_starts(test: tuple[int, int], horizon: int, stride: int = 1, include_last: bool = False) -> np.ndarray:
    """Forecast start rows in the test split [start, end): every ``stride``-th row t with t + H <= end,
    without the last one (t + H == end) unless ``include_last`` (the released code skips it)."""
    start, end = test
    n = end - start - horizon + (1 if include_last else 0)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return start + np.arange(0, max(n, 0), stride)


def _check_forecast(pred: Any, batch: int, horizon: int, who: str) -> np.ndarray:
    pred_BH = np.asarray(pred, dtype=np.float64)
    if pred_BH.shape != (batch, horizon):
        raise ValueError(f"{who}.forecast returned shape {pred_BH.shape}, expected {(batch, horizon)}")
    if not np.isfinite(pred_BH).all():
        raise ValueError(f"{who}.forecast returned non-finite values")
    return pred_BH


@dataclass
class ErrorSums:
    """Squared and absolute error sums of some windows: what shards of one (dataset, horizon)
    return, so that merged shards give exactly the rows of one unsharded run (up to float
    summation order)."""

    sq: float = 0.0
    abs: float = 0.0
    points: int = 0
    windows: int = 0
    seconds: float = 0.0

    def add(self, other: "ErrorSums") -> "ErrorSums":
        return ErrorSums(self.sq + other.sq, self.abs + other.abs, self.points + other.points,
                         self.windows + other.windows, self.seconds + other.seconds)

    def row(self, dataset: str, horizon: int, context: int) -> "EvalRow":
        return EvalRow(dataset, horizon, context, self.sq / self.points, self.abs / self.points,
                       self.windows, self.points, self.seconds)


def batch_size_of(forecaster: Forecaster, cfg: EvalConfig, context: int, horizon: int) -> int:
    if cfg.batch_size is not None:
        return cfg.batch_size
    pick = getattr(forecaster, "batch_size_for", None)
    return int(pick(context, horizon)) if pick is not None else 256


def check_context(cfg: EvalConfig, max_context: int | None) -> None:
    """Refuse contexts the model cannot see whole (it would silently use only the last
    ``max_context`` points, and the results would not be what the protocol key says)."""
    if max_context is None:
        return
    for h in cfg.horizons:
        if cfg.context_for(h) > max_context:
            given = "--context" if cfg.context is not None else f"the paper's context for horizon {h}"
            raise ValueError(f"{given} {cfg.context_for(h)} is longer than the model's maximum context "
                             f"{max_context} (max_position_embeddings)")


def error_sums(forecaster: Forecaster, ds: BenchmarkDataset, horizon: int, cfg: EvalConfig,
               channels: Sequence[int] | None = None) -> ErrorSums:
    """Error sums of one forecaster on one dataset at one horizon over ``channels`` (default
    all), batching windows across channels."""
    context = cfg.context_for(horizon)
    check_context(cfg, getattr(forecaster, "max_context", None))
    scaled_TC, borders = scaled_values(ds)
    starts = window_starts(borders.test, horizon, cfg.stride, cfg.include_last_window)
    if len(starts) == 0:
        raise ValueError(f"{ds.path}: test split {borders.test} is shorter than horizon {horizon}")
    num_c = scaled_TC.shape[1]
    chans = np.arange(num_c) if channels is None else np.asarray(list(channels), dtype=np.int64)
    # Left-pad with NaN so that every window is a fixed-width view; windows that reach before
    # row 0 are trimmed to their real part before they go to the forecaster.
    padded_CT = np.concatenate([np.full((num_c, context), np.nan), scaled_TC.T], axis=1)
    windows_CNW = sliding_window_view(padded_CT, context + horizon, axis=1)  # a view, no copy
    chan_idx = np.repeat(chans, len(starts))
    start_idx = np.tile(starts, len(chans))  # original row t - context sits at padded column t
    who = getattr(forecaster, "name", type(forecaster).__name__)
    batch = batch_size_of(forecaster, cfg, context, horizon)
    sums = ErrorSums()
    t0 = last_print = time.perf_counter()
    total = len(chan_idx)
    for b in range(0, total, batch):
        win_BW = windows_CNW[chan_idx[b : b + batch], start_idx[b : b + batch]]
        ctx_BT, truth_BH = win_BW[:, :context], win_BW[:, context:]
        if np.isnan(ctx_BT).any():
            series: np.ndarray | list[np.ndarray] = [row[~np.isnan(row)] for row in ctx_BT]
        else:
            series = np.ascontiguousarray(ctx_BT)
        pred_BH = _check_forecast(forecaster.forecast(series, horizon), len(ctx_BT), horizon, who)
        err_BH = pred_BH - truth_BH
        sums.sq += float(np.square(err_BH).sum())
        sums.abs += float(np.abs(err_BH).sum())
        sums.points += err_BH.size
        now = time.perf_counter()
        if cfg.progress and now - last_print > 10:
            done = min(b + batch, total)
            rate = done / (now - t0)
            print(f"[eval] {who} {ds.name} H={horizon}: {done}/{total} windows, {rate:.0f}/s, "
                  f"ETA {(total - done) / rate:.0f}s", flush=True)
            last_print = now
    sums.windows = total
    sums.seconds = time.perf_counter() - t0
    return sums


def evaluate_dataset(forecaster: Forecaster, ds: BenchmarkDataset, horizon: int, cfg: EvalConfig) -> EvalRow:
    """MSE/MAE of one forecaster on one dataset at one horizon."""
    row = error_sums(forecaster, ds, horizon, cfg).row(ds.name, horizon, cfg.context_for(horizon))
    if cfg.progress:
        who = getattr(forecaster, "name", type(forecaster).__name__)
        print(f"[eval] {who} {ds.name} H={horizon} ctx={row.context}: mse {row.mse:.4f} mae {row.mae:.4f} "
              f"({row.windows} windows, {row.seconds:.1f}s)", flush=True)
    return row


def protocol_plan(benchmarks_dir: str | Path, cfg: EvalConfig) -> list[tuple[BenchmarkDataset, list[int]]]:
    """Each dataset of ``cfg`` with the horizons it can serve. Horizons that a short dataset
    cannot serve (test split <= horizon) are skipped with a message, not silently."""
    plan = []
    for name in cfg.datasets:
        ds = load_benchmark(benchmarks_dir, name)
        test = split_borders(ds.name, ds.num_rows).test
        horizons = []
        for h in cfg.horizons:
            if test[1] - test[0] <= h:
                print(f"[eval] skip {name} H={h}: test split has only {test[1] - test[0]} rows", flush=True)
                continue
            horizons.append(h)
        plan.append((ds, horizons))
    if not any(hs for _, hs in plan):
        raise ValueError(f"nothing evaluated: datasets {cfg.datasets} x horizons {cfg.horizons}")
    return plan


@dataclass
class EvalResult:
    model: str
    config: EvalConfig
    rows: list[EvalRow]
    inference: dict[str, Any] = field(default_factory=dict)  # device, dtype, batch, workers

    def averages(self) -> dict[str, tuple[float, float]]:
        """Per dataset: (MSE, MAE) averaged over its horizons, as the paper's Table 3 reports."""
        out: dict[str, tuple[float, float]] = {}
        for name in dict.fromkeys(r.dataset for r in self.rows):
            rs = [r for r in self.rows if r.dataset == name]
            out[name] = (float(np.mean([r.mse for r in rs])), float(np.mean([r.mae for r in rs])))
        return out

    def average_mse(self) -> float:
        """Mean over datasets of the per-dataset average MSE (the promotion score)."""
        return float(np.mean([mse for mse, _ in self.averages().values()]))

    def metrics(self, prefix: str = "zeroshot") -> dict[str, float]:
        m: dict[str, float] = {}
        for r in self.rows:
            m[f"{prefix}/{r.dataset}/{r.horizon}/mse"] = r.mse
            m[f"{prefix}/{r.dataset}/{r.horizon}/mae"] = r.mae
        for name, (mse, mae) in self.averages().items():
            m[f"{prefix}/{name}/avg/mse"] = mse
            m[f"{prefix}/{name}/avg/mae"] = mae
        m[f"{prefix}/avg_mse"] = self.average_mse()
        return m

    def table(self) -> str:
        where = "".join(f", {k} {v}" for k, v in self.inference.items())
        lines = [f"zero-shot evaluation of {self.model} (stride {self.config.stride}{where})",
                 f"{'dataset':<18}{'horizon':>8}{'context':>8}{'MSE':>9}{'MAE':>9}{'windows':>9}{'sec':>8}"]
        avgs = self.averages()
        for name in avgs:
            for r in (r for r in self.rows if r.dataset == name):
                lines.append(f"{r.dataset:<18}{r.horizon:>8}{r.context:>8}{r.mse:>9.4f}{r.mae:>9.4f}"
                             f"{r.windows:>9}{r.seconds:>8.1f}")
            mse, mae = avgs[name]
            lines.append(f"{name:<18}{'avg':>8}{'':>8}{mse:>9.4f}{mae:>9.4f}")
        lines.append(f"{'all':<18}{'avg':>8}{'':>8}{self.average_mse():>9.4f}")
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> list[Path]:
        """``results.json`` (config + rows + averages), ``results.csv`` and ``results.txt``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js = out / "results.json"
        js.write_text(json.dumps({
            "model": self.model, "config": asdict(self.config), "protocol": self.config.protocol_key(),
            "inference": self.inference,
            "rows": [asdict(r) for r in self.rows],
            "averages": {k: {"mse": v[0], "mae": v[1]} for k, v in self.averages().items()},
            "avg_mse": self.average_mse(),
        }, indent=2))
        cs = out / "results.csv"
        with cs.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(EvalRow.__dataclass_fields__))
            w.writeheader()
            w.writerows(asdict(r) for r in self.rows)
        txt = out / "results.txt"
        txt.write_text(self.table() + "\n")
        return [js, cs, txt]


def evaluate(forecaster: Forecaster, benchmarks_dir: str | Path, cfg: EvalConfig | None = None,
             model_name: str | None = None) -> EvalResult:
    """Run the protocol in this process for every dataset x horizon of ``cfg``
    (``pipeline.evaluation.workers.evaluate_model`` spreads the same work over GPU workers)."""
    cfg = cfg or EvalConfig()
    rows: list[EvalRow] = []
    for ds, horizons in protocol_plan(benchmarks_dir, cfg):
        f = forecaster.for_dataset(ds) if hasattr(forecaster, "for_dataset") else forecaster
        for h in horizons:
            rows.append(evaluate_dataset(f, ds, h, cfg))
    name = model_name or getattr(forecaster, "name", type(forecaster).__name__)
    describe = getattr(forecaster, "describe", None)
    return EvalResult(model=name, config=cfg, rows=rows, inference=describe() if describe else {})


def plot_forecasts(forecasters: dict[str, Forecaster], benchmarks_dir: str | Path, dataset: str, horizon: int,
                   path: str | Path, context: int | None = None, num_examples: int = 4, shown_context: int = 192) -> Path:
    """PNG of a few test windows (last channel, evenly spread over the test split): the context's
    tail, the truth and each forecaster's forecast, on scaled values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = load_benchmark(benchmarks_dir, dataset)
    scaled_TC, borders = scaled_values(ds)
    ctx = context or EvalConfig().context_for(horizon)
    starts = window_starts(borders.test, horizon)
    picks = starts[np.linspace(0, len(starts) - 1, num_examples).astype(int)]
    series_T = scaled_TC[:, -1]
    fig, axes = plt.subplots(num_examples, 1, figsize=(10, 2.4 * num_examples), squeeze=False)
    for ax, t in zip(axes[:, 0], picks):
        lo = max(0, t - ctx)
        shown = max(lo, t - shown_context)
        ax.plot(np.arange(shown, t), series_T[shown:t], color="0.5", lw=1, label="context")
        ax.plot(np.arange(t, t + horizon), series_T[t : t + horizon], color="k", lw=1.2, label="truth")
        for label, fc in forecasters.items():
            f = fc.for_dataset(ds) if hasattr(fc, "for_dataset") else fc
            pred = np.asarray(f.forecast(series_T[lo:t][None, :], horizon))[0]
            ax.plot(np.arange(t, t + horizon), pred, lw=1.2, label=label)
        ax.set_title(f"{dataset} / {ds.channels[-1]} at row {t}, H={horizon}", fontsize=9)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over, the curves
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def log_to_mlflow(result: EvalResult, files: Sequence[Path], run_id: str | None = None,
                  tracking_uri: str | None = None, prefix: str = "zeroshot",
                  new_run_experiment: str | None = None) -> str:
    """Metrics ``zeroshot/<dataset>/<horizon>/{mse,mae}`` and the files as artifacts under
    ``zeroshot/`` of the given run, else of the active run, else (with ``new_run_experiment``)
    of a new finished run in that experiment. Returns the run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    created = False
    if run_id is None:
        active = mlflow.active_run()
        if active is not None:
            run_id = active.info.run_id
        elif new_run_experiment is not None:
            exp_id = experiment_id(client, new_run_experiment)
            run_id = client.create_run(exp_id, run_name=f"zeroshot-{result.model}"[:250]).info.run_id
            created = True
        else:
            raise ValueError("log_to_mlflow: no run id given and no active MLflow run")
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(k, v, now, 0) for k, v in result.metrics(prefix).items() if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, f"{prefix}.protocol", result.config.protocol_key())
    client.set_tag(run_id, f"{prefix}.model", result.model)
    for k, v in result.inference.items():
        client.set_tag(run_id, f"{prefix}.inference.{k}", str(v))
    for p in files:
        client.log_artifact(run_id, str(p), prefix)
    if created:
        client.set_terminated(run_id)
    return run_id


def load_forecaster(spec: str, tracking_uri: str | None = None,
                    options: InferenceOptions | None = None) -> tuple[Forecaster, str]:
    """``baseline:NAME``, else a model through ``pipeline.evaluation.inference.load_forecaster``
    (checkpoint directory, ``models:/NAME@ALIAS``, ``runs:/ID/PATH``) on ``options``' device."""
    if spec.startswith("baseline:"):
        return make_baseline(spec.split(":", 1)[1]), spec
    fc = load_model_forecaster(spec, options, tracking_uri)
    return fc, fc.name
