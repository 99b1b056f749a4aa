"""The scaling report: trial records <-> MLflow, fits per family, plots, table, JSON.

A sweep is one MLflow parent run (tag ``scaling.role=sweep``, ``scaling.sweep=<name>``) with one
child run per trial (tag ``scaling.role=trial``, ``scaling.trial_hash=<hash>``). A child run's
metrics named in ``TrialRecord`` below are all the report needs, so the report can be rebuilt
from MLflow alone (``python -m jobs.scaling_report --experiment NAME``).

Output files (also logged on the parent run under ``scaling_report/``):

    scaling_fits.json     fitted parameters with bootstrap intervals, multiplier, extrapolation
    scaling_table.md/html one row per trial + one row per fit
    scaling_report.html   all of it on one self-contained page (plots embedded; write_page below)
    loss_vs_flops.png     loss vs training FLOPs per family, fitted L(C) with bootstrap band
    isoflop.png           fitted L(N, C / fpp(N)) along iso-FLOP lines, with N*(C) marked
"""
from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.reports import html_page as H
from pipeline.scaling_laws import fit as F
from pipeline.scaling_laws.families import (
    DENSE,
    PAPER_INFERENCE_COST_SAVING,
    PAPER_TRAINING_COST_SAVING,
    SPARSE,
    SPARSE_FAMILIES,
)
from pipeline.scaling_laws.inference import speed_at_equal_loss

SWEEP_TAG = "scaling.sweep"
ROLE_TAG = "scaling.role"
HASH_TAG = "scaling.trial_hash"
FAMILY_TAG = "scaling.family"
RESUMED_TAG = "scaling.resumed_from_step"  # a trial whose last run resumed it from a checkpoint
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"
REPORT_DIR = "scaling_report"

BALANCE_PREFIX = "balance/layer"
TRAIN_BALANCE_PREFIX = "train_balance/layer"
MIXTURE_PREFIX = "mixture/"

# Metrics the report fits, in order of preference (the first one present is the headline).
FIT_METRICS = ("heldout_loss", "heldout_mse", "zs_mse")


@dataclass
class TrialRecord:
    """One finished trial, as logged on its MLflow child run (metrics unless noted)."""

    family: str              # param + tag: "sparse" | "dense" | "sparse_per_layer"
    size: str                # param
    trial_hash: str          # tag
    n_total: float
    n_active: float
    points_seen: float
    training_flops: float    # from model.flops: flops_per_point(config, L) x points seen
    heldout_loss: float      # training objective on the held-out (val) shards
    heldout_mse: float       # one-step MSE on the held-out shards (normalised units)
    zs_mse: float = math.nan  # zero-shot MSE / MAE averaged over the configured benchmarks
    zs_mae: float = math.nan
    wall_time_s: float = math.nan
    points_per_s: float = math.nan
    mfu: float = math.nan    # only on GPU
    zero_shot: dict[str, float] = field(default_factory=dict)  # "zs/<dataset>/<metric>" -> value
    seed: int = 0            # param: the grid's seed index (records made before seeds existed: 0)
    # Routing balance per layer, busiest expert's tokens / mean tokens per expert (1.0 = even,
    # E / k = every token on the same k experts); empty for dense models. ``expert_balance``: the
    # final model on the held-out windows (metrics balance/layer<i>); ``train_expert_balance``:
    # the training loop's per-step values averaged over the last quarter of the steps
    # (metrics train_balance/layer<i>).
    expert_balance: list[float] = field(default_factory=list)
    train_expert_balance: list[float] = field(default_factory=list)
    # Training points of the data the trial trained on, by provenance kind ("real",
    # "synthetic/<generator>"), from the preprocessing report (metrics mixture/<kind>).
    data_mixture: dict[str, float] = field(default_factory=dict)
    # The step a trial cut short had reached when this, its last run, resumed it (0: trained in
    # one run); wall_time_s and points_per_s are then that last run's.
    resumed_from_step: int = 0

    METRICS = ("n_total", "n_active", "points_seen", "training_flops", "heldout_loss", "heldout_mse",
               "zs_mse", "zs_mae", "wall_time_s", "points_per_s", "mfu")

    def metrics(self) -> dict[str, float]:
        out = {k: float(getattr(self, k)) for k in self.METRICS}
        out.update(self.zero_shot)
        out.update({f"{BALANCE_PREFIX}{i}": float(v) for i, v in enumerate(self.expert_balance)})
        out.update({f"{TRAIN_BALANCE_PREFIX}{i}": float(v) for i, v in enumerate(self.train_expert_balance)})
        out.update({f"{MIXTURE_PREFIX}{k}": float(v) for k, v in self.data_mixture.items()})
        return {k: v for k, v in out.items() if math.isfinite(v)}

    @property
    def balance_mean(self) -> float:
        """Mean over layers of the held-out routing balance (NaN for dense models)."""
        return float(np.mean(self.expert_balance)) if self.expert_balance else math.nan

    @property
    def resumed_at(self) -> float:
        """``resumed_from_step``, NaN (a table shows "-") for a trial trained in one run."""
        return float(self.resumed_from_step) if self.resumed_from_step else math.nan

    @property
    def flops_per_point(self) -> float:
        return self.training_flops / self.points_seen


# ---------------------------------------------------------------------------------------------
# MLflow I/O (only this section touches mlflow)
# ---------------------------------------------------------------------------------------------

def log_trial_record(client: Any, run_id: str, record: TrialRecord) -> None:
    """Log a finished trial's summary on its child run (metrics in one batch call)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in record.metrics().items()],
        params=[Param("family", record.family), Param("size", record.size), Param("seed", str(record.seed))],
        tags=[RunTag(FAMILY_TAG, record.family), RunTag(HASH_TAG, record.trial_hash)]
        + ([RunTag(RESUMED_TAG, str(record.resumed_from_step))] if record.resumed_from_step else []),
    )


def record_from_run(run: Any) -> TrialRecord | None:
    """A TrialRecord from an MLflow run, or None if the run lacks the required metrics
    (e.g. an interrupted trial)."""
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    required = ("n_total", "n_active", "points_seen", "training_flops", "heldout_loss", "heldout_mse")
    if any(k not in m for k in required):
        return None
    return TrialRecord(
        family=t.get(FAMILY_TAG, p.get("family", "?")),
        size=p.get("size", "?"),
        trial_hash=t.get(HASH_TAG, ""),
        zero_shot={k: v for k, v in m.items() if k.startswith("zs/")},
        seed=int(p.get("seed", 0)),  # runs logged before the seed axis existed: seed 0
        expert_balance=_per_layer(m, BALANCE_PREFIX),
        train_expert_balance=_per_layer(m, TRAIN_BALANCE_PREFIX),
        data_mixture={k[len(MIXTURE_PREFIX):]: v for k, v in m.items() if k.startswith(MIXTURE_PREFIX)},
        resumed_from_step=int(t.get(RESUMED_TAG, 0)),
        **{k: float(m.get(k, math.nan)) for k in TrialRecord.METRICS},
    )


def _per_layer(metrics: dict[str, float], prefix: str) -> list[float]:
    """``prefix0, prefix1, ...`` metrics as a list in layer order."""
    layers = {int(k[len(prefix):]): v for k, v in metrics.items() if k.startswith(prefix) and k[len(prefix):].isdigit()}
    return [layers[i] for i in sorted(layers)]


def find_sweep_run(client: Any, experiment_id: str, sweep: str | None = None) -> Any | None:
    """The newest parent run of the experiment (of the named sweep, if given)."""
    flt = f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'"
    if sweep:
        flt += f" and tags.`{SWEEP_TAG}` = '{sweep}'"
    runs = client.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """All trial runs under a parent (paged, so large sweeps are complete)."""
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def load_trials(experiment: str, tracking_uri: str | None = None,
                sweep: str | None = None) -> tuple[str, list[TrialRecord]]:
    """(parent run id, finished trial records) of the newest sweep in ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}")
    parent = find_sweep_run(client, exp.experiment_id, sweep)
    if parent is None:
        raise ValueError(f"experiment {experiment!r} has no sweep parent run (tag {ROLE_TAG}={ROLE_SWEEP})"
                         + (f" for sweep {sweep!r}" if sweep else ""))
    records = []
    for run in child_runs(client, exp.experiment_id, parent.info.run_id):
        if run.info.status == "FINISHED" and (rec := record_from_run(run)) is not None:
            records.append(rec)
    return parent.info.run_id, records


def log_report(tracking_uri: str | None, parent_run_id: str, out_dir: Path) -> None:
    """Upload the report files to the parent run and log the headline fitted numbers."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(parent_run_id, str(out_dir), artifact_path=REPORT_DIR)
    fits = json.loads((Path(out_dir) / "scaling_fits.json").read_text())
    now = int(time.time() * 1000)
    metrics = []
    for fam, res in fits["families"].items():
        pl = res.get("power_law")
        if pl:
            metrics.append(Metric(f"fit/{fam}/alpha", pl["alpha"]["estimate"], now, 0))
            metrics.append(Metric(f"fit/{fam}/E", pl["E"]["estimate"], now, 0))
    for fam, mult in (fits.get("multipliers") or {}).items():
        est = mult["headline"]["estimate"]  # the JSON keeps inf / nan as strings
        if isinstance(est, (int, float)) and math.isfinite(est):
            metrics.append(Metric(f"fit/dense_over_{fam}_compute", est, now, 0))
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------

def cells_of(recs: list[TrialRecord], metric: str) -> list[tuple[tuple[str, float], list[TrialRecord]]]:
    """A family's trials grouped into cells (size, points seen): the seeds of one trial."""
    cells: dict[tuple[str, float], list[TrialRecord]] = {}
    for r in recs:
        cells.setdefault((r.size, float(r.points_seen)), []).append(r)
    return sorted(cells.items(), key=lambda kv: (kv[1][0].n_active, kv[0][1]))


def _cell_rows(cells: list[tuple[tuple[str, float], list[TrialRecord]]], metric: str) -> list[dict[str, Any]]:
    out = []
    for (size, points), rs in cells:
        y = np.array([getattr(r, metric) for r in rs], dtype=float)
        zs = np.array([r.zs_mse for r in rs], dtype=float)
        bal = [r.balance_mean for r in rs if r.expert_balance]
        out.append({"size": size, "n_active": float(rs[0].n_active), "points_seen": points,
                    "training_flops": float(np.mean([r.training_flops for r in rs])),
                    "seeds": sorted(int(r.seed) for r in rs), "n_seeds": len(rs),
                    "mean": float(y.mean()), "spread": float(y.std(ddof=1)) if len(y) > 1 else 0.0,
                    "min": float(y.min()), "max": float(y.max()),
                    "zs_mse_mean": float(np.nanmean(zs)) if np.isfinite(zs).any() else math.nan,
                    "balance_mean": float(np.mean(bal)) if bal else math.nan})
    return out


def _fit_family(recs: list[TrialRecord], metric: str, n_boot: int, seed: int, joint: bool = True) -> dict[str, Any]:
    """L(C) and L(N, D) of one family, fitted to its cells' mean losses (one point per size and
    budget, whatever the number of seeds), with the seed bootstrap of ``fit.bootstrap_power_law_cells``."""
    cells = cells_of(recs, metric)
    rows = _cell_rows(cells, metric)
    seed_cells = [F.SeedCell(r["training_flops"], tuple(float(getattr(t, metric)) for t in rs))
                  for r, (_, rs) in zip(rows, cells)]
    C = np.array([r["training_flops"] for r in rows])
    y = np.array([r["mean"] for r in rows])
    N = np.array([r["n_active"] for r in rows])
    D = np.array([r["points_seen"] for r in rows])
    out: dict[str, Any] = {"n_trials": len(recs), "n_cells": len(rows), "cells": rows,
                           "seed_noise_log": F.seed_noise_log(seed_cells)}
    frontier = F.pareto_frontier(C, y)
    # L(C) is the best loss at C: fit the frontier, unless it is too short for 3 params + CI.
    idx = frontier if len(frontier) >= 4 else np.arange(len(C))
    out["power_law_points"] = "frontier" if len(frontier) >= 4 else "all"
    out["_frontier_cells"] = frontier.tolist()
    if len(idx) >= 3:
        boot, method = F.bootstrap_power_law_cells([seed_cells[i] for i in idx], n_boot=n_boot, seed=seed)
        out["power_law"] = {k: v.to_dict() for k, v in boot.intervals().items()}
        out["interval_method"] = method
        out["_boot"] = boot
    if len(idx) >= 4:
        out["extrapolation"] = F.extrapolation_error(C[idx], y[idx]).to_dict()
    if joint and len(C) >= 5 and len(np.unique(N)) >= 2 and len(np.unique(D)) >= 2:
        best, samples = F.bootstrap_joint(N, D, y, n_boot=max(n_boot // 2, 10), seed=seed)
        iv = {p: F._interval(getattr(best, p), np.array([getattr(s, p) for s in samples]), 0.9).to_dict()
              for p in ("E", "A", "B", "a", "b")}
        out["joint"] = iv
        out["_joint"] = best
        fpp = F.linear_flops_per_point(N, C / D)
        out["_fpp"] = fpp
        budgets = np.logspace(math.log10(C.min()), math.log10(C.max()) + 2, 5)
        out["compute_optimal"] = F.compute_optimal(best, fpp, budgets,
                                                   n_bounds=(N.min() / 100, N.max() * 1000)).to_dict()
    return out


def _multiplier(sparse_fam: str, sp: dict[str, Any], de: dict[str, Any], c_sparse: np.ndarray,
                c_dense: np.ndarray) -> dict[str, Any]:
    """Compute multiplier of one sparse family over dense at 5 points of the compute range both
    families cover (the sparse family's own range if they do not overlap); the headline is at
    the largest common compute. If its interval (from the seed bootstrap) includes 1, the seeds per
    cell, and so the sweep FLOPs, at which it would exclude 1 (``fit.seeds_to_exclude_one``)."""
    lo, hi = max(c_sparse.min(), c_dense.min()), min(c_sparse.max(), c_dense.max())
    if lo > hi:
        lo, hi = c_sparse.min(), c_sparse.max()
    grid = np.logspace(math.log10(lo), math.log10(hi), 5)
    per_c = [F.multiplier_with_interval(sp["_boot"], de["_boot"], float(c)) for c in grid]
    head = per_c[-1]
    sweep_flops = float(c_sparse.sum() + c_dense.sum())
    out: dict[str, Any] = {
        "family": sparse_fam,
        "definition": f"C_dense(L_{sparse_fam}(C)) / C: dense FLOPs needed for the {sparse_fam} loss at C",
        "compute": grid.tolist(),
        "per_compute": [m.to_dict() for m in per_c],
        "headline": head.to_dict(),  # at the largest common compute
        "interval_method": sp.get("interval_method", "cells"),
        "excludes_1": bool(head.low > 1.0 or head.high < 1.0),
        "training_cost_saving": training_cost_saving(head.to_dict()),
    }
    if not out["excludes_1"] and out["interval_method"] == "seeds_within_cells":
        n_seeds = min(c["n_seeds"] for fam in (sp, de) for c in fam["cells"])
        out["resolving_budget"] = F.seeds_to_exclude_one(head, n_seeds, sweep_flops).to_dict()
    return out


def training_cost_saving(multiplier: dict[str, float]) -> dict[str, float]:
    """The share of dense's training FLOPs a sparse family saves at equal loss, 1 - 1/m, for a
    multiplier's estimate and interval ends (monotonic in m; negative where sparse costs more):
    the quantity of the paper's "78% less training cost"."""
    return {k: 1.0 - 1.0 / multiplier[k] if multiplier[k] > 0 else -math.inf
            for k in ("estimate", "low", "high")} | {"paper": PAPER_TRAINING_COST_SAVING}


def inference_at_equal_loss(sparse_cells: list[dict[str, Any]], dense_cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paper's inference comparison for one sparse family: the dense model that reaches the
    family's best loss with the same training points, and what its forecasts cost more.

    Method, from the cells alone: the sparse family's best cell at its largest budget; the dense
    cells at that budget (two sizes or more), loss taken linear in log N through them (least
    squares) and solved for the sparse loss: ``n_dense_equivalent``. Forward FLOPs per point
    scale as the training FLOPs per point (``model.flops``: training is 3 forward passes' worth),
    taken linear in N through the dense sizes (``fit.linear_flops_per_point``), so the saving is
    1 - fpp(sparse) / fpp(n_dense_equivalent). ``extrapolated``: that size lies outside the dense
    sizes that ran. None when the dense family has fewer than two sizes at that budget."""
    if not sparse_cells:
        return None
    points = max(c["points_seen"] for c in sparse_cells)
    best = min((c for c in sparse_cells if c["points_seen"] == points), key=lambda c: c["mean"])
    dense = [c for c in dense_cells if c["points_seen"] == points]
    sizes = np.array([c["n_active"] for c in dense], dtype=float)
    if len(np.unique(sizes)) < 2:
        return None
    out: dict[str, Any] = {"points_seen": points, "sparse_size": best["size"], "sparse_n_active": best["n_active"],
                           "sparse_loss": best["mean"], "paper": PAPER_INFERENCE_COST_SAVING}
    slope, intercept = np.polyfit(np.log(sizes), [c["mean"] for c in dense], 1)
    if slope >= 0:  # dense gets no better with size here: no dense size matches, nothing to read off
        return out | {"n_dense_equivalent": None, "inference_cost_saving": None,
                      "why_none": "the dense loss does not fall with size at this budget"}
    fpp = F.linear_flops_per_point(sizes, [c["training_flops"] / c["points_seen"] for c in dense])
    sparse_fpp = best["training_flops"] / best["points_seen"]

    def read_off(loss: float) -> tuple[float, float]:
        n = float(math.exp((loss - intercept) / slope))
        return n, 1.0 - sparse_fpp / float(fpp(n))

    n_eq, saving = read_off(best["mean"])
    # the same reading at the sparse cell's best and worst seed: how far seed noise alone moves it
    # (the dense cells' own seed noise comes on top)
    seeds = sorted(read_off(best.get(k, best["mean"]))[1] for k in ("min", "max"))
    return out | {"n_dense_equivalent": n_eq, "extrapolated": not sizes.min() <= n_eq <= sizes.max(),
                  "inference_cost_saving": saving, "saving_over_sparse_seeds": seeds}


def equal_compute_cells(sparse: list[TrialRecord], dense: list[TrialRecord], metric: str) -> list[dict[str, Any]]:
    """Every cell (size, points) that a sparse family and dense both ran, at the same training
    FLOPs (the dense twins have the sparse sizes' active parameters): the sparse family's loss
    against dense's with the seed noise's interval (``fit.cell_difference``). Needs no fit, so
    it reads out as soon as a cell has two seeds in both families."""
    dense_cells = dict(cells_of(dense, metric))
    out = []
    for key, rs in cells_of(sparse, metric):
        ds = dense_cells.get(key)
        if ds is None:
            continue
        c_sparse, c_dense = np.mean([r.training_flops for r in rs]), np.mean([r.training_flops for r in ds])
        if not math.isclose(c_sparse, c_dense, rel_tol=0.01):  # not the same compute: no like-for-like pair
            continue
        diff = F.cell_difference([getattr(r, metric) for r in rs], [getattr(r, metric) for r in ds])
        if diff is not None:
            out.append({"size": key[0], "points_seen": key[1], "training_flops": float(c_dense)} | diff.to_dict())
    return out


def _routing(recs: list[TrialRecord]) -> dict[str, Any] | None:
    """A family's routing balance: per layer, busiest expert / mean, averaged over its trials."""
    held = [r.expert_balance for r in recs if r.expert_balance]
    if not held:
        return None
    n_layers = min(len(b) for b in held)
    per_layer = np.mean([b[:n_layers] for b in held], axis=0)
    train = [r.train_expert_balance for r in recs if r.train_expert_balance]
    out = {"n_trials": len(held), "mean": float(per_layer.mean()), "max_layer": float(per_layer.max()),
           "min_layer": float(per_layer.min()), "per_layer": per_layer.tolist(),
           "worst_trial_layer": float(max(max(b) for b in held))}
    if train:
        n = min(len(b) for b in train)
        out["train_mean"] = float(np.mean([b[:n] for b in train]))
    return out


def fit_records(records: list[TrialRecord], metric: str = "heldout_loss", n_boot: int = 200,
                seed: int = 0, joint: bool = True) -> dict[str, Any]:
    """Fits per family (on cell means; seeds resampled within cells), the compute multiplier of
    each sparse family over dense, and each family's routing balance. Keys starting with '_'
    hold fit objects for plotting and are dropped from the JSON."""
    fams: dict[str, list[TrialRecord]] = {}
    for r in records:
        if math.isfinite(getattr(r, metric)) and getattr(r, metric) > 0:
            fams.setdefault(r.family, []).append(r)
    result: dict[str, Any] = {"metric": metric, "families": {}, "multipliers": {}, "routing": {}}
    for i, (fam, recs) in enumerate(sorted(fams.items())):
        result["families"][fam] = _fit_family(recs, metric, n_boot, seed + i, joint)
        routing = _routing(recs)
        if routing:
            result["routing"][fam] = routing
    de = result["families"].get(DENSE, {})
    for fam in SPARSE_FAMILIES:
        sp = result["families"].get(fam, {})
        if "_boot" in sp and "_boot" in de:
            result["multipliers"][fam] = _multiplier(
                fam, sp, de, np.array([r.training_flops for r in fams[fam]]),
                np.array([r.training_flops for r in fams[DENSE]]))
    result["equal_compute_cells"] = {fam: equal_compute_cells(fams[fam], fams[DENSE], metric)
                                     for fam in SPARSE_FAMILIES if fam in fams and DENSE in fams}
    result["inference_at_equal_loss"] = {}
    for fam in SPARSE_FAMILIES:
        if fam in result["families"] and DENSE in result["families"]:
            inf = inference_at_equal_loss(result["families"][fam]["cells"], result["families"][DENSE]["cells"])
            if inf is not None:
                result["inference_at_equal_loss"][fam] = inf
    if SPARSE in result["multipliers"]:
        result["multiplier"] = result["multipliers"][SPARSE]  # the paper's comparison, as before
    return result


def _public(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan
    return obj


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

COLORS = {"sparse": "tab:blue", "dense": "tab:orange", "sparse_per_layer": "tab:green"}


def _plain_log_labels(axis: Any) -> None:
    """Tick labels of a loss axis as 0.6, 2 (not 6x10^-1, 2x10^0); matplotlib still decides
    which minor ticks get one from the span shown."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLog(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _plot_loss_vs_flops(records: list[TrialRecord], fits: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = fits["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown: list[float] = []  # the trials' values: the y-axis fits them, a wide band is clipped
    for fam, res in fits["families"].items():
        recs = [r for r in records if r.family == fam and math.isfinite(getattr(r, metric))]
        color = COLORS.get(fam)
        # every seed faintly, each cell's mean over seeds with +-1 standard deviation across seeds
        ax.scatter([r.training_flops for r in recs], [getattr(r, metric) for r in recs], color=color,
                   s=9, alpha=0.35, zorder=2)
        cells = res["cells"]
        C = np.array([c["training_flops"] for c in cells])
        y = np.array([c["mean"] for c in cells])
        err = np.array([c["spread"] for c in cells])
        front = set(res.get("_frontier_cells", []))
        on = np.array([i in front for i in range(len(cells))], dtype=bool)
        shown += [float(getattr(r, metric)) for r in recs if getattr(r, metric) > 0]
        n_seeds = max(c["n_seeds"] for c in cells)
        ax.errorbar(C[on], y[on], yerr=err[on], fmt="o", color=color, capsize=3, zorder=3,
                    label=f"{fam} (frontier, mean of {n_seeds} seed{'s' if n_seeds > 1 else ''} +- sd)")
        ax.errorbar(C[~on], y[~on], yerr=err[~on], fmt="o", mfc="none", color=color, capsize=3, zorder=3)
        if "_boot" in res:
            boot = res["_boot"]
            cc = np.logspace(math.log10(C.min()) - 0.3, math.log10(C.max()) + 0.5, 100)
            lo, hi = boot.prediction_band(cc)
            pl = boot.fit
            ax.plot(cc, pl.predict(cc), color=color,
                    label=f"{fam}: {pl.E:.3g} + {pl.A:.3g} C^-{pl.alpha:.3f}")
            ax.fill_between(cc, lo, hi, color=color, alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if shown:
        ax.set_ylim(min(shown) / 1.4, max(shown) * 1.4)
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title("Loss vs training compute (90% bootstrap band)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # never over a point
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_isoflop(records: list[TrialRecord], fits: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f, r in fits["families"].items() if "_joint" in r]
    fig, axes = plt.subplots(1, max(len(fams), 1), figsize=(6 * max(len(fams), 1), 4.5), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        res = fits["families"][fam]
        joint, fpp = res["_joint"], res["_fpp"]
        N = np.array([r.n_active for r in records if r.family == fam])
        opt = res["compute_optimal"]
        # wide enough for every N*(C) marked on it
        lo, hi = min(N.min() / 10, min(opt["n_opt"]) / 2), max(N.max() * 10, max(opt["n_opt"]) * 2)
        n_grid = np.logspace(math.log10(lo), math.log10(hi), 200)
        cmap = plt.get_cmap("viridis")
        for i, (C, n_opt, l_opt) in enumerate(zip(opt["compute"], opt["n_opt"], opt["loss_opt"])):
            color = cmap(i / max(len(opt["compute"]) - 1, 1))
            ax.plot(n_grid, F.iso_flop_curve(joint, fpp, C, n_grid), color=color, label=f"C={C:.2e}")
            ax.scatter([n_opt], [l_opt], color=color, marker="*", s=80, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
        ax.set_xlabel("active parameters N")
        ax.set_ylabel(f"fitted {fits['metric']}")
        ax.set_title(f"{fam}: iso-FLOP curves of L(N,D), * = N*(C)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLE_COLUMNS = [("family", "family", "{}"), ("size", "size", "{}"), ("N_total", "n_total", "{:,.0f}"),
                 ("N_active", "n_active", "{:,.0f}"), ("points", "points_seen", "{:.3g}"), ("seed", "seed", "{}"),
                 ("FLOPs", "training_flops", "{:.3g}"), ("held-out loss", "heldout_loss", "{:.4f}"),
                 ("held-out MSE", "heldout_mse", "{:.4f}"), ("zero-shot MSE", "zs_mse", "{:.4f}"),
                 ("zero-shot MAE", "zs_mae", "{:.4f}"), ("wall s", "wall_time_s", "{:.1f}"),
                 ("points/s", "points_per_s", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"),
                 ("routing busiest/mean", "balance_mean", "{:.2f}"),
                 # wall s and points/s of a resumed trial are its last run's, from this step on
                 ("resumed from step", "resumed_at", "{:.0f}")]


def _cell(fmt: str, v: Any) -> str:
    if (isinstance(v, float) and not math.isfinite(v)) or v in ("nan", "inf", "-inf"):  # JSON keeps these as strings
        return "-"
    return fmt.format(v)


def _table_rows(records: list[TrialRecord]) -> list[list[str]]:
    recs = sorted(records, key=lambda r: (r.family, r.n_active, r.points_seen, r.seed))
    return [[_cell(fmt, getattr(r, attr)) for _, attr, fmt in TABLE_COLUMNS] for r in recs]


CELL_HEADER = ["family", "size", "points", "FLOPs", "seeds", "mean", "sd over seeds", "min - max",
               "zero-shot MSE (mean)", "routing busiest/mean"]


def _cells_table_rows(fits: dict[str, Any]) -> list[list[str]]:
    """One row per (family, size, budget) cell: the metric's mean and spread over its seeds."""
    rows = []
    for fam, res in sorted(fits["families"].items()):
        for c in res["cells"]:
            rows.append([fam, c["size"], f"{c['points_seen']:.3g}", f"{c['training_flops']:.3g}",
                         ",".join(str(x) for x in c["seeds"]), _cell("{:.4f}", c["mean"]),
                         _cell("{:.4f}", c["spread"]) if c["n_seeds"] > 1 else "-",
                         f"{c['min']:.4f} - {c['max']:.4f}", _cell("{:.4f}", c["zs_mse_mean"]),
                         _cell("{:.2f}", c["balance_mean"])])
    return rows


EQUAL_COMPUTE_HEADER = ["family", "size", "points", "FLOPs", "seeds (family, dense)", "against dense",
                        "90% interval (seed noise, Welch t)", "excludes 0", "seeds per cell to exclude 0"]


def _equal_compute_rows(fits: dict[str, Any]) -> list[list[str]]:
    rows = []
    for fam, cells in sorted(fits.get("equal_compute_cells", {}).items()):
        for c in cells:
            rows.append([fam, c["size"], f"{c['points_seen']:.3g}", f"{c['training_flops']:.3g}",
                         f"{c['n_sparse']}, {c['n_dense']}", f"{100 * c['relative']:+.1f}%",
                         f"{100 * c['low']:+.1f}% to {100 * c['high']:+.1f}%", "yes" if c["excludes_0"] else "no",
                         "-" if c["excludes_0"] else (str(c["seeds_to_separate"]) if c["seeds_to_separate"] else "more than 1000")])
    return rows


ROUTING_HEADER = ["family", "trials", "busiest/mean, mean of layers", "best layer", "worst layer",
                  "worst layer of any trial", "per layer (mean over trials)", "late training, mean of layers"]


def _routing_rows(fits: dict[str, Any]) -> list[list[str]]:
    """Each MoE family's routing balance on the held-out windows (1.0 = even; E/k = all tokens on
    the same k experts); dense families have no router and no row."""
    rows = []
    for fam, r in sorted(fits.get("routing", {}).items()):
        rows.append([fam, str(r["n_trials"]), f"{r['mean']:.2f}", f"{r['min_layer']:.2f}", f"{r['max_layer']:.2f}",
                     f"{r['worst_trial_layer']:.2f}", " ".join(f"{v:.2f}" for v in r["per_layer"]),
                     _cell("{:.2f}", r.get("train_mean", math.nan))])
    return rows


def data_mixtures(records: list[TrialRecord]) -> list[dict[str, Any]]:
    """The distinct training-data mixtures the trials report (normally one), with how many trials
    trained on each; trials whose data predates the provenance block count as unknown."""
    out: list[dict[str, Any]] = []
    for r in records:
        mix = {k: float(v) for k, v in sorted(r.data_mixture.items())}
        for m in out:
            if m["points"] == mix:
                m["trials"] += 1
                break
        else:
            out.append({"points": mix, "trials": 1})
    for m in out:
        total = sum(m["points"].values())
        m["total"] = total
        m["share"] = {k: v / total for k, v in m["points"].items()} if total else {}
    return out


MIXTURE_HEADER = ["trials", "kind", "training points", "share"]


def _mixture_rows(mixtures: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for m in mixtures:
        if not m["points"]:
            rows.append([str(m["trials"]), "unknown (data without a provenance block)", "-", "-"])
        for kind, pts in m["points"].items():
            rows.append([str(m["trials"]), kind, f"{pts:,.0f}", f"{m['share'][kind]:.1%}"])
    return rows


def multiplier_lines(fits: dict[str, Any]) -> list[str]:
    """The headline sentence of each sparse family's compute multiplier, with the projection
    when its interval includes 1, then each family's inference comparison at equal loss."""
    lines = []
    for fam, m in fits.get("multipliers", {}).items():
        h = m["headline"]
        line = (f"{fam}: dense FLOPs / {fam} FLOPs at equal {fits['metric']} at C = {m['compute'][-1]:.3g}: "
                f"{_num(h['estimate'])} (90% interval {_num(h['low'])} - {_num(h['high'])}, "
                f"{m['interval_method'].replace('_', ' ')})")
        if "training_cost_saving" in m:
            sv = m["training_cost_saving"]
            line += (f"; training cost saved at equal {fits['metric']}: {_pct(sv['estimate'])} "
                     f"({_pct(sv['low'])} to {_pct(sv['high'])}; the paper: {_pct(sv['paper'])})")
        if m["excludes_1"]:
            line += "; the interval excludes 1"
        elif "resolving_budget" in m:
            rb = m["resolving_budget"]
            if rb["seeds_per_cell"] is None:
                line += "; includes 1, and the estimate sits at 1: no number of seeds would exclude it"
            else:
                line += (f"; includes 1; at the measured seed noise it would exclude 1 with "
                         f"{rb['seeds_per_cell']:.0f} seeds per cell instead of {rb['n_seeds']} "
                         f"({rb['factor']:.3g}x the FLOPs of these two families' trials, {rb['training_flops']:.3g}), "
                         f"assuming {rb['assumption']}")
        else:
            line += "; includes 1 (no cell has 2 seeds: the seed noise is unknown, no projection)"
        lines.append(line)
    for fam, inf in fits.get("inference_at_equal_loss", {}).items():
        line = (f"{fam} inference at equal {fits['metric']}: its best model ({inf['sparse_size']}, "
                f"{_num(inf['sparse_n_active'])} active parameters, {fits['metric']} {_num(inf['sparse_loss'])} "
                f"at {_num(inf['points_seen'])} points) ")
        if inf.get("n_dense_equivalent") is None:
            line += f"has no dense match ({inf.get('why_none', 'unknown')})"
        else:
            line += (f"matches a dense model of {_num(inf['n_dense_equivalent'])} parameters"
                     f"{' (extrapolated beyond the dense sizes run)' if inf['extrapolated'] else ''}: "
                     f"{_pct(inf['inference_cost_saving'])} less forward FLOPs per forecast "
                     f"({_pct(inf['saving_over_sparse_seeds'][0])} to {_pct(inf['saving_over_sparse_seeds'][1])} "
                     f"over the sparse cell's seeds; the paper: {_pct(inf['paper'])}; loss linear in log N "
                     f"through the dense sizes)")
            ms = inf.get("measured")
            if ms and ms.get("measured_time_saving") is not None:
                line += (f"; measured on {ms['device']}: the stride-1 protocol in {ms['sparse_protocol_minutes']:.1f} min "
                         f"against {ms['dense_protocol_minutes']:.1f} min for that dense model (linear in N through "
                         f"the dense sizes measured), {_pct(ms['measured_time_saving'])} less time")
        lines.append(line)
    return lines


INFERENCE_HEADER = ["shape", "measured as", "windows/s per context/horizon", "forward GFLOPs per forecast",
                    "protocol min"]


def _inference_rows(measured: dict[str, Any] | None) -> list[list[str]]:
    rows = []
    for name, sh in sorted((measured or {}).get("shapes", {}).items()):
        pairs = sorted(sh.get("windows_per_s", {}), key=lambda p: int(p.split("/")[0]))
        rows.append([name, sh["measured_as"], ", ".join(f"{p}: {sh['windows_per_s'][p]:,.0f}" for p in pairs),
                     ", ".join(f"{sh['flops_per_window'][p] / 1e9:.3g}" for p in pairs), f"{sh['protocol_minutes']:.1f}"])
    return rows


def _num(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"


def _pct(v: Any) -> str:
    """A share as a percentage; a non-finite one (a string once the fits went through JSON) as is."""
    return str(v) if isinstance(v, str) or not math.isfinite(v) else f"{v:.0%}"


def _fit_rows(fits: dict[str, Any]) -> list[list[str]]:
    rows = []
    for fam, res in fits["families"].items():
        pl, jt, ex = res.get("power_law"), res.get("joint"), res.get("extrapolation")
        def iv(d: dict) -> str:
            return f"{d['estimate']:.4g} [{d['low']:.4g}, {d['high']:.4g}]"
        rows.append([fam, str(res["n_trials"]),
                     iv(pl["alpha"]) if pl else "-", iv(pl["E"]) if pl else "-",
                     iv(jt["a"]) if jt else "-", iv(jt["b"]) if jt else "-", iv(jt["E"]) if jt else "-",
                     f"{ex['relative_error']:+.2%}" if ex else "-"])
    return rows


FIT_HEADER = ["family", "trials", "alpha of L(C)", "E of L(C)", "a (N) of L(N,D)", "b (D) of L(N,D)",
              "E of L(N,D)", "extrapolation error (largest C)"]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{body}</table>"


@dataclass
class ReportFiles:
    out_dir: Path
    fits_json: Path
    table_md: Path
    table_html: Path
    loss_vs_flops_png: Path
    isoflop_png: Path | None
    fits: dict[str, Any]
    page_html: Path | None = None  # scaling_report.html: everything above on one offline page


def build_report(records: Iterable[TrialRecord], out_dir: Path | str, *, metric: str | None = None,
                 n_boot: int = 200, seed: int = 0, inference: dict[str, Any] | None = None) -> ReportFiles:
    """Fit, plot and tabulate ``records`` into ``out_dir``. ``inference``: measured speeds of the
    sweep's shapes (``inference.read_measurements``), tabulated and used in the comparison at equal loss."""
    records = list(records)
    if not records:
        raise ValueError("build_report: no finished trials to report on")
    if metric is None:
        metric = next((m for m in FIT_METRICS
                       if sum(math.isfinite(getattr(r, m)) for r in records) >= 3), FIT_METRICS[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fits = fit_records(records, metric=metric, n_boot=n_boot, seed=seed)
    if inference is not None:
        fits["inference_measured"] = inference
        for fam, inf in fits.get("inference_at_equal_loss", {}).items():
            dense_sizes = {c["size"]: c["n_active"] for c in fits["families"][DENSE]["cells"]
                           if c["points_seen"] == inf["points_seen"]}
            inf["measured"] = speed_at_equal_loss(inf, fam, inference, dense_sizes, dense_family=DENSE)
    public = _public(fits)
    public["trials"] = [asdict(r) for r in records]
    fits_json = out_dir / "scaling_fits.json"
    fits_json.write_text(json.dumps(_public(public), indent=2))

    public["data_mixtures"] = data_mixtures(records)
    header = [h for h, _, _ in TABLE_COLUMNS]
    mult_text = "\n".join(f"- {line}" for line in multiplier_lines(public))
    mult_line = f"\n\n## Compute multipliers\n\n{mult_text}\n" if mult_text else ""
    extra_md = (f"\n## Cells (mean and spread over seeds)\n\n{_markdown(CELL_HEADER, _cells_table_rows(fits))}\n"
                f"\n## Sparse against dense at equal training FLOPs (no fit; {metric}, relative to dense)\n\n"
                f"{_markdown(EQUAL_COMPUTE_HEADER, _equal_compute_rows(fits))}\n"
                f"\n## Routing balance (held-out windows)\n\n{_markdown(ROUTING_HEADER, _routing_rows(fits))}\n"
                f"\n## Training data mixture\n\n{_markdown(MIXTURE_HEADER, _mixture_rows(public['data_mixtures']))}\n")
    if inference is not None:
        extra_md += (f"\n## Inference cost (measured on {inference['device']}, {inference['date']})\n\n"
                     f"{_markdown(INFERENCE_HEADER, _inference_rows(inference))}\n")
    md = (f"# Scaling report ({metric})\n\n## Trials\n\n{_markdown(header, _table_rows(records))}\n\n"
          f"## Fits (90% bootstrap intervals)\n\n{_markdown(FIT_HEADER, _fit_rows(fits))}{mult_line}{extra_md}")
    table_md = out_dir / "scaling_table.md"
    table_md.write_text(md)
    table_html = out_dir / "scaling_table.html"
    table_html.write_text(f"<html><body><h1>Scaling report ({html.escape(metric)})</h1><h2>Trials</h2>"
                          f"{_html_table(header, _table_rows(records))}<h2>Cells</h2>"
                          f"{_html_table(CELL_HEADER, _cells_table_rows(fits))}<h2>Sparse against dense at equal FLOPs</h2>"
                          f"{_html_table(EQUAL_COMPUTE_HEADER, _equal_compute_rows(fits))}<h2>Fits</h2>"
                          f"{_html_table(FIT_HEADER, _fit_rows(fits))}<p>{html.escape(mult_text)}</p>"
                          f"<h2>Routing balance</h2>{_html_table(ROUTING_HEADER, _routing_rows(fits))}"
                          f"<h2>Training data mixture</h2>{_html_table(MIXTURE_HEADER, _mixture_rows(public['data_mixtures']))}"
                          "</body></html>")
    loss_png = out_dir / "loss_vs_flops.png"
    _plot_loss_vs_flops(records, fits, loss_png)
    # The other metrics (held-out MSE, zero-shot MSE): L(C) per family and the multiplier only.
    by_metric = {metric: {k: v for k, v in public.items() if k != "trials"}}
    for other in FIT_METRICS:
        if other == metric or sum(math.isfinite(getattr(r, other)) for r in records) < 3:
            continue
        extra = fit_records(records, metric=other, n_boot=max(n_boot // 4, 10), seed=seed, joint=False)
        by_metric[other] = _public(extra)
        _plot_loss_vs_flops(records, extra, out_dir / f"{other}_vs_flops.png")
    public["by_metric"] = by_metric
    fits_json.write_text(json.dumps(_public(public), indent=2))
    iso_png = None
    if any("_joint" in r for r in fits["families"].values()):
        iso_png = out_dir / "isoflop.png"
        _plot_isoflop(records, fits, iso_png)

    page = write_page(records, _public(public), out_dir)
    return ReportFiles(out_dir, fits_json, table_md, table_html, loss_png, iso_png, public, page)


def rebuild_from_mlflow(experiment: str, out_dir: Path | str, *, tracking_uri: str | None = None,
                        sweep: str | None = None, n_boot: int = 200, log: bool = True,
                        metric: str | None = None, inference: dict[str, Any] | None = None) -> ReportFiles:
    """Read the newest sweep's finished child runs, build the report, log it on the parent."""
    parent_id, records = load_trials(experiment, tracking_uri, sweep)
    if not records:
        raise ValueError(f"experiment {experiment!r}: sweep run {parent_id} has no finished trials "
                         "with the required metrics")
    files = build_report(records, out_dir, metric=metric, n_boot=n_boot, inference=inference)
    if log:
        log_report(tracking_uri, parent_id, files.out_dir)
    return files


# ---------------------------------------------------------------------------------------------
# scaling_report.html: the report as one self-contained page (plots embedded, works offline and
# as an MLflow artifact), written next to scaling_fits.json. Headline numbers carry data-key =
# their dotted path in scaling_fits.json (a list's path stands for its length), so a reader can
# trace each one to the JSON.
# ---------------------------------------------------------------------------------------------


def _estimate(fits: dict[str, Any], path: str) -> H.Keyed | str:
    node: Any = fits
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return "-"
        node = node[part]
    if isinstance(node, str):  # JSON keeps inf / nan as strings
        return H.Keyed(path, node, node)
    return H.Keyed(path, node)


def _headline(records: list[TrialRecord], fits: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = [("trials", H.Keyed("trials", len(records))), ("fitted metric", fits["metric"])]
    for fam in sorted(fits["families"]):
        items.append((f"{fam} trials", H.Keyed(f"families.{fam}.n_trials", fits["families"][fam]["n_trials"])))
        items.append((f"{fam}: alpha of L(C)", _estimate(fits, f"families.{fam}.power_law.alpha.estimate")))
        items.append((f"{fam}: E of L(C)", _estimate(fits, f"families.{fam}.power_law.E.estimate")))
        ex = fits["families"][fam].get("extrapolation")
        if ex:
            err = ex["relative_error"]
            items.append((f"{fam}: extrapolation error at the largest C",
                          H.Keyed(f"families.{fam}.extrapolation.relative_error", err, f"{100 * err:+.2f}%")))
    for fam, mult in fits.get("multipliers", {}).items():
        h = mult["headline"]
        items.append((f"dense FLOPs / {fam} FLOPs at equal {fits['metric']} (C = {mult['compute'][-1]:.3g})",
                      _estimate(fits, f"multipliers.{fam}.headline.estimate")))
        items.append(("  90% interval", f"{H.fmt(h['low'])} - {H.fmt(h['high'])}"))
        rb = mult.get("resolving_budget")
        if rb and rb["seeds_per_cell"] is not None:
            items.append(("  seeds per cell to exclude 1 (at the measured seed noise)",
                          _estimate(fits, f"multipliers.{fam}.resolving_budget.seeds_per_cell")))
    for fam, cells in sorted(fits.get("equal_compute_cells", {}).items()):
        if cells:
            i, c = max(enumerate(cells), key=lambda ic: ic[1]["training_flops"])
            items.append((f"{fam} against dense at equal FLOPs (C = {c['training_flops']:.3g}, no fit)",
                          H.Keyed(f"equal_compute_cells.{fam}.{i}.relative", c["relative"], f"{100 * c['relative']:+.1f}%")))
            items.append(("  90% interval (seed noise)", f"{100 * c['low']:+.1f}% to {100 * c['high']:+.1f}%"))
    for fam in sorted(fits.get("routing", {})):
        items.append((f"{fam}: routing busiest/mean (mean of layers, held-out)", _estimate(fits, f"routing.{fam}.mean")))
    for fam in sorted(fits["families"]):
        sigma = fits["families"][fam].get("seed_noise_log")
        if isinstance(sigma, float) and math.isfinite(sigma):
            items.append((f"{fam}: seed noise (sd of log {fits['metric']} within cells)",
                          _estimate(fits, f"families.{fam}.seed_noise_log")))
    return H.key_values(items)


def write_page(records: list[TrialRecord], fits: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/scaling_report.html`` from the records, the public fits (as in
    ``scaling_fits.json``) and the PNGs already written in ``out_dir``."""
    out_dir = Path(out_dir)
    metric = fits["metric"]
    pictures = []
    for name, caption in (("loss_vs_flops.png", f"{metric} against training FLOPs, fitted L(C) with its 90% band"),
                          ("isoflop.png", "fitted L(N, D) along iso-FLOP lines; * = compute-optimal N*(C)")):
        if (out_dir / name).exists():
            pictures.append(f"<p class='muted'>{H.esc(caption)}</p>" + H.image(out_dir / name, caption))
    for other in FIT_METRICS:
        png = out_dir / f"{other}_vs_flops.png"
        if other != metric and png.exists():
            pictures.append(f"<p class='muted'>{H.esc(other)} against training FLOPs</p>" + H.image(png, other))
    mult_html = ""
    for fam, mult in fits.get("multipliers", {}).items():
        mult_html += f"<h3>{H.esc(fam)} over dense</h3>" + H.table(
            ["common compute C", f"dense / {fam} FLOPs", "90% low", "90% high"],
            [[f"{c:.3g}", m["estimate"], m["low"], m["high"]] for c, m in zip(mult["compute"], mult["per_compute"])])
    lines = "".join(f"<p>{H.esc(line)}</p>" for line in multiplier_lines(fits))
    header = [h for h, _, _ in TABLE_COLUMNS]
    sections = [
        ("headline", "Headline", _headline(records, fits)),
        ("plots", "Loss against compute", "".join(pictures)),
        ("fits", "Fits (90% bootstrap intervals; seeds resampled within cells)",
         H.table(FIT_HEADER, _fit_rows(fits)) + lines + mult_html),
        ("cells", "Cells: mean and spread over seeds", H.table(CELL_HEADER, _cells_table_rows(fits))),
        ("equal-compute", f"Sparse against dense at equal training FLOPs ({metric}; no fit, the seeds' Welch t interval)",
         H.table(EQUAL_COMPUTE_HEADER, _equal_compute_rows(fits))
         if any(fits.get("equal_compute_cells", {}).values()) else "<p>no cell with two seeds in a sparse family and dense</p>"),
        ("routing", "Routing balance per family (busiest expert / mean, held-out windows)",
         H.table(ROUTING_HEADER, _routing_rows(fits)) if fits.get("routing") else "<p>no MoE trial with a routing record</p>"),
        ("mixture", "Training data mixture", H.table(MIXTURE_HEADER, _mixture_rows(fits.get("data_mixtures", [])))),
        ("inference", "Inference cost of each shape (measured; speed does not depend on the weights)",
         H.table(INFERENCE_HEADER, _inference_rows(fits.get("inference_measured")))
         if fits.get("inference_measured") else "<p>not measured (jobs.scaling_report --inference-json)</p>"),
        ("trials", "Trials", H.table(header, _table_rows(records))),
    ]
    path = out_dir / "scaling_report.html"
    path.write_text(H.page(f"Scaling report ({metric})", sections,
                           "sparse vs dense Time-MoE trials (seeds, routing, data mixture); all numbers also in scaling_fits.json"))
    return path
