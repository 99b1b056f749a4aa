"""One look at a pretraining run: ``python -m jobs.report --run-id ID`` writes
``run_report.html`` (one offline page) and ``run_report.json`` (its numbers) from MLflow alone.

The page: a summary (steps, points, FLOPs, losses, throughput, zero-shot MSE beside the
baselines, registry state), loss against FLOPs and throughput curves (the run's metric
history), expert load per layer over training (the ``training/expert_load.jsonl`` artifact),
the evaluation table with its pictures (``zeroshot/``), the data mixture (the curation report
logged as ``data/report.json``), the registered versions made from the run, and the config.
Sections whose source the run lacks say so instead of failing. Numbers marked ``data-key``
are the dotted paths of the same values in ``run_report.json``.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.reports import html_page as H
from pipeline.reports import pictures, plots

CURVES = ("loss", "eval_loss", "train_flops", "points_seen", "points_per_s", "step_time_s", "data_wait_ms", "lr")


@dataclass
class RunReport:
    html: Path
    json: Path
    summary: dict[str, Any]


class _Run:
    """What the report reads of one run, fetched once."""

    def __init__(self, run_id: str, tracking_uri: str | None, scratch: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run = self.client.get_run(run_id)
        self.run_id = run_id
        self.scratch = scratch
        self.experiment = self.client.get_experiment(self.run.info.experiment_id).name
        self._listed: dict[str, set[str]] = {}

    def history(self) -> list[dict[str, Any]]:
        """Per logged step, the curve metrics (the loop logs every ``log_every`` steps)."""
        by_step: dict[int, dict[str, Any]] = {}
        for key in CURVES:
            if key not in self.run.data.metrics:
                continue
            for m in self.client.get_metric_history(self.run_id, key):
                by_step.setdefault(int(m.step), {"step": int(m.step)})[key] = float(m.value)
        return [by_step[s] for s in sorted(by_step)]

    def artifact(self, path: str) -> Path | None:
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        if folder not in self._listed:
            try:
                self._listed[folder] = {a.path for a in self.client.list_artifacts(self.run_id, folder or None)}
            except Exception:  # noqa: BLE001 - an unreadable folder is an absent one
                self._listed[folder] = set()
        if path not in self._listed[folder]:
            return None
        return Path(self.client.download_artifacts(self.run_id, path, str(self.scratch)))

    def versions(self) -> list[Any]:
        """Registered versions made from this run (tag ``training_run_id``)."""
        try:
            found = self.client.search_model_versions(f"tags.training_run_id = '{self.run_id}'")
        except Exception:  # noqa: BLE001 - stores without tag search: scan
            found = [v for v in self.client.search_model_versions("") if v.tags.get("training_run_id") == self.run_id]
        # search results may leave aliases out: read each version itself
        return [self.client.get_model_version(v.name, v.version) for v in sorted(found, key=lambda v: (v.name, int(v.version)))]


def _fig_html(fig: Any, alt: str) -> str:
    return H.image(H.figure_png(fig), alt)


def _eval_table(run: _Run) -> list[dict[str, Any]]:
    """The zero-shot table logged by the pipeline (``zeroshot/table.json``), else one built
    from the run's ``zeroshot/<dataset>/<horizon>/mse`` metrics (the model alone)."""
    path = run.artifact(f"{pictures.ZEROSHOT_DIR}/table.json")
    if path is not None:
        doc = json.loads(path.read_text())
        rows = [dict(zip(doc["columns"], r)) for r in doc["data"]]
        for r in rows:
            r["horizon"] = int(r["horizon"]) if str(r["horizon"]).isdigit() else r["horizon"]
            for k, v in r.items():
                if k not in ("dataset", "horizon"):
                    r[k] = float("nan") if v is None else float(v)
        return rows
    model = run.run.data.tags.get("zeroshot.model", "model")
    rows = []
    for key, value in run.run.data.metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "zeroshot" and parts[3] == "mse" and parts[2].isdigit():
            rows.append({"dataset": parts[1], "horizon": int(parts[2]), "mse": value})
    return pictures.comparison_table({model: rows}) if rows else []


def _model_column(table: list[dict[str, Any]], run: _Run) -> str | None:
    if not table:
        return None
    names = [k for k in table[0] if k not in ("dataset", "horizon")]
    tagged = run.run.data.tags.get("zeroshot.model")
    for candidate in ("timemoe", tagged):
        if candidate in names:
            return candidate
    return names[0]


def _mixture(report: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    if not report:
        return {}
    counts = report.get("domain_counts", {})
    kept_total = sum(c["points_kept"] for c in counts.values()) or 1
    weights = report.get("mixture_weights", {})
    return {d: {"points_kept": c["points_kept"], "share": c["points_kept"] / kept_total,
                "weight": float(weights.get(d, 1.0))} for d, c in counts.items()}


def _mixture_figure(mix: dict[str, dict[str, float]]) -> Any:
    plt = plots.pyplot()
    names = list(mix)
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.32 * len(names)))
    shares = [100 * mix[d]["share"] for d in names]
    ax.barh(names, shares, color="#47a")
    for i, v in enumerate(shares):
        ax.annotate(f"{v:.1f}%", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, max(shares + [1]) * 1.18)
    ax.invert_yaxis()
    ax.set_xlabel("share of the kept points (%)")
    ax.set_title("data mixture by domain")
    return fig


def build_run_report(run_id: str, out_dir: str | Path, tracking_uri: str | None = None) -> RunReport:
    """Write ``out_dir/run_report.html`` and ``run_report.json`` for MLflow run ``run_id``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-report-") as scratch:
        run = _Run(run_id, tracking_uri, Path(scratch))
        return _build(run, out_dir)


def _build(run: _Run, out_dir: Path) -> RunReport:
    info, data = run.run.info, run.run.data
    history = run.history()
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    speeds = [h["points_per_s"] for h in history if "points_per_s" in h]
    config_path = run.artifact("config.yaml")
    data_report_path = run.artifact("data/report.json")
    data_report = json.loads(data_report_path.read_text()) if data_report_path else None
    load_path = run.artifact(f"{pictures.TRAINING_DIR}/{pictures.EXPERT_LOAD_FILE}")
    load = plots.read_jsonl(load_path) if load_path else []
    table = _eval_table(run)
    model = _model_column(table, run)
    all_row = next((r for r in table if r["dataset"] == "all"), None)
    mix = _mixture(data_report)
    versions = run.versions()

    summary: dict[str, Any] = {
        "run_id": run.run_id, "run_name": info.run_name, "experiment": run.experiment, "status": info.status,
        "start_time": info.start_time, "end_time": info.end_time,
        "steps": steps[-1]["step"] if steps else 0,
        "final": {k: v for k, v in (("loss", steps[-1]["loss"] if steps else None),
                                    ("eval_loss", evals[-1]["eval_loss"] if evals else None),
                                    ("points_seen", data.metrics.get("points_seen")),
                                    ("train_flops", data.metrics.get("train_flops"))) if v is not None},
        "points_per_s_median": statistics.median(speeds) if speeds else None,
        "zeroshot": {"model": model, "avg_mse": {k: v for k, v in (all_row or {}).items()
                                                  if k not in ("dataset", "horizon") and math.isfinite(v)},
                     "worse_than_baseline": pictures.worse_than_baselines(table, model) if model else []},
        "mixture": mix,
        "registry": [{"name": v.name, "version": str(v.version), "aliases": list(v.aliases),
                      "decision": v.tags.get("promotion.decision", "-"), "reason": v.tags.get("promotion.reason", "-"),
                      "zeroshot_avg_mse": v.tags.get("zeroshot.avg_mse", "-")} for v in versions],
    }

    # ---- summary section
    items: list[tuple[str, Any]] = [
        ("run", H.Keyed("run_id", run.run_id, run.run_id)), ("name", info.run_name or "-"),
        ("experiment", H.Keyed("experiment", run.experiment, run.experiment)),
        ("status", H.Keyed("status", info.status, info.status)),
        ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))),
        ("duration", f"{(info.end_time - info.start_time) / 1000:.0f} s" if info.end_time else "running"),
        ("steps", H.Keyed("steps", summary["steps"]))]
    for key, label in (("loss", "last training loss"), ("eval_loss", "last held-out loss"),
                       ("points_seen", "points seen"), ("train_flops", "training FLOPs")):
        if key in summary["final"]:
            items.append((label, H.Keyed(f"final.{key}", summary["final"][key])))
    if speeds:
        items.append(("median points/s", H.Keyed("points_per_s_median", summary["points_per_s_median"])))
    for name, v in summary["zeroshot"]["avg_mse"].items():
        items.append((f"zero-shot avg MSE, {name}", H.Keyed(f"zeroshot.avg_mse.{name}", v)))
    for v in summary["registry"]:
        items.append(("registered", f"models:/{v['name']}/{v['version']} aliases {v['aliases'] or '-'} ({v['decision']})"))
    worse = summary["zeroshot"]["worse_than_baseline"]
    notes = "".join(f'<p class="note">{H.esc(w)}</p>' for w in worse)
    sections = [("summary", "Summary", H.key_values(items) + notes)]

    # ---- curves
    if steps:
        curves = (_fig_html(plots.loss_vs_flops(history), "loss against training FLOPs")
                  + _fig_html(plots.throughput(history), "throughput"))
    else:
        curves = "<p>no training metrics logged on this run</p>"
    sections.append(("curves", "Loss and throughput", curves))
    sections.append(("experts", "Expert load", _fig_html(plots.expert_load_heatmap(load), "expert load")
                     if load else "<p>no expert-load records on this run (a dense model, or an older run)</p>"))

    # ---- evaluation
    if table:
        names = [k for k in table[0] if k not in ("dataset", "horizon")]
        ev = H.table(["dataset", "horizon", *names], [[r["dataset"], r["horizon"], *[r[n] for n in names]] for r in table])
        ev += _fig_html(plots.zero_shot_comparison(table, model), "zero-shot MSE beside the baselines")
        forecasts = run.artifact(f"{pictures.ZEROSHOT_DIR}/forecasts.png")
        if forecasts:
            ev += H.image(forecasts, "forecast examples")
        ev += f'<p class="muted">protocol {H.esc(data.tags.get("zeroshot.protocol", "-"))}</p>'
    else:
        ev = "<p>not evaluated (no zero-shot metrics on this run)</p>"
    sections.append(("evaluation", "Zero-shot evaluation", ev))

    # ---- data mixture
    if mix:
        mx = H.table(["domain", "points kept", "share of kept", "mixture weight"],
                     [[d, m["points_kept"], f"{100 * m['share']:.1f}%", m["weight"]] for d, m in mix.items()])
        mx += _fig_html(_mixture_figure(mix), "data mixture")
    else:
        mx = "<p>no curation report logged with the run (data/report.json)</p>"
    sections.append(("mixture", "Data mixture", mx))

    # ---- registry
    if versions:
        reg = H.table(["model", "version", "aliases", "promotion", "reason", "zero-shot avg MSE"],
                      [[f"models:/{v['name']}/{v['version']}", v["version"], ", ".join(v["aliases"]) or "-",
                        v["decision"], v["reason"], v["zeroshot_avg_mse"]] for v in summary["registry"]])
    else:
        reg = "<p>no registered model version comes from this run</p>"
    sections.append(("registry", "Model registry", reg))
    config = config_path.read_text() if config_path else "(no config.yaml artifact)"
    sections.append(("config", "Config", f"<pre>{H.esc(config)}</pre>"))

    html_path = out_dir / "run_report.html"
    html_path.write_text(H.page(f"Pretraining run {info.run_name or run.run_id}", sections,
                                f"MLflow run {run.run_id} in experiment {run.experiment}; numbers also in run_report.json"))
    json_path = out_dir / "run_report.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    return RunReport(html_path, json_path, summary)
