"""What people look at in MLflow rather than read: pictures and tables on the training run,
and a registered version's description.

- ``training/`` on the training run (rank 0, at the end of training): ``loss_vs_flops.png``,
  ``throughput.png``, ``expert_load.png`` (layers x experts over steps) and the
  ``expert_load.jsonl`` records behind it;
- ``zeroshot/`` on the same run after evaluation: ``comparison.png`` (the model's MSE beside
  each baseline), ``table.md`` and ``table.json`` (an MLflow table artifact: the run page's
  artifact view shows it as a table), next to ``forecasts.png``;
- a registered version's description: the zero-shot table, where the model is worse than a
  baseline, and its lineage (training run, data manifest, config, code, registration run).

Pictures are observers, like the tracker: a failure to draw is reported and never stops a run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.reports import plots

TRAINING_DIR = "training"
ZEROSHOT_DIR = "zeroshot"
EXPERT_LOAD_FILE = "expert_load.jsonl"


def training_pictures(out_root: str | Path) -> list[Path]:
    """Draw the training run's pictures from ``metrics.jsonl`` and ``expert_load.jsonl`` in
    ``out_root`` into ``out_root/pictures``; return the files to log (pictures + load records)."""
    out_root = Path(out_root)
    metrics = plots.read_jsonl(out_root / "metrics.jsonl")
    load = plots.read_jsonl(out_root / EXPERT_LOAD_FILE)
    out = out_root / "pictures"
    files = [plots.save(plots.loss_vs_flops(metrics), out / "loss_vs_flops.png"),
             plots.save(plots.throughput(metrics), out / "throughput.png")]
    if load:
        files += [plots.save(plots.expert_load_heatmap(load), out / "expert_load.png"), out_root / EXPERT_LOAD_FILE]
    return files


# ------------------------------------------------------------------------- zero-shot table


def comparison_table(rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (dataset, horizon) with each forecaster's MSE as a column, then one ``avg``
    row per dataset (mean over its horizons) and an ``all`` row (mean of the dataset averages:
    the number the registry compares)."""
    order: list[tuple[str, Any]] = []
    mse: dict[tuple[str, Any], dict[str, float]] = {}
    for name, rows in rows_by_model.items():
        for r in rows:
            key = (r["dataset"], r["horizon"])
            if key not in mse:
                order.append(key)
                mse[key] = {}
            mse[key][name] = float(r["mse"])
    names = list(rows_by_model)
    table = [{"dataset": d, "horizon": h, **{n: mse[(d, h)].get(n, math.nan) for n in names}} for d, h in order]
    datasets = list(dict.fromkeys(d for d, _ in order))
    avg = []
    for d in datasets:
        part = [r for r in table if r["dataset"] == d]
        avg.append({"dataset": d, "horizon": "avg", **{n: _mean([r[n] for r in part]) for n in names}})
    overall = {"dataset": "all", "horizon": "avg", **{n: _mean([r[n] for r in avg]) for n in names}}
    return table + avg + [overall]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def worse_than_baselines(table: Sequence[Mapping[str, Any]], model: str) -> list[str]:
    """One line per dataset (horizon average) where a baseline has a lower MSE than ``model``."""
    lines = []
    for r in table:
        if r["horizon"] != "avg" or r["dataset"] == "all":
            continue
        baselines = {k: v for k, v in r.items() if k not in ("dataset", "horizon", model) and math.isfinite(v)}
        if not baselines or not math.isfinite(r[model]):
            continue
        best = min(baselines, key=baselines.get)
        if baselines[best] < r[model]:
            lines.append(f"{r['dataset']}: {model} MSE {r[model]:.4f} is worse than {best} {baselines[best]:.4f} "
                         f"({r[model] / max(baselines[best], 1e-12) - 1:+.1%})")
    return lines


def table_markdown(table: Sequence[Mapping[str, Any]], model: str) -> str:
    names = [k for k in table[0] if k not in ("dataset", "horizon")] if table else []
    out = ["| dataset | horizon | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in table:
        cells = []
        finite = {n: r[n] for n in names if math.isfinite(r[n])}
        best = min(finite, key=finite.get) if finite else None
        for n in names:
            text = f"{r[n]:.4f}" if math.isfinite(r[n]) else "-"
            cells.append(f"**{text}**" if n == best else text)
        out.append(f"| {r['dataset']} | {r['horizon']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + f"\n\nMSE on scaled values, lower is better; **bold** = best of the row; model: {model}.\n"


def log_evaluation(run_id: str, tracking_uri: str, table: Sequence[Mapping[str, Any]], model: str,
                   out_dir: str | Path) -> list[Path]:
    """Write ``comparison.png`` and ``table.md`` into ``out_dir`` and log them, and ``table.json``
    as an MLflow table, under ``zeroshot/`` of the training run."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir)
    files = [plots.save(plots.zero_shot_comparison(table, model), out_dir / "comparison.png")]
    (out_dir / "table.md").write_text(table_markdown(table, model))
    files.append(out_dir / "table.md")
    client = MlflowClient(tracking_uri=tracking_uri)
    for f in files:
        client.log_artifact(run_id, str(f), ZEROSHOT_DIR)
    frame = pd.DataFrame([{**r, "horizon": str(r["horizon"])} for r in table])
    client.log_table(run_id, data=frame, artifact_file=f"{ZEROSHOT_DIR}/table.json")
    return files


# -------------------------------------------------------------------- registered version


def version_description(table: Sequence[Mapping[str, Any]], model: str, protocol: str, tags: Mapping[str, str],
                        decision: str | None = None) -> str:
    """Markdown for a registered version: zero-shot table, the datasets where a baseline wins,
    and where the version comes from."""
    lines = ["### Zero-shot evaluation", "", f"Protocol `{protocol}`.", "", table_markdown(table, model)]
    worse = worse_than_baselines(table, model)
    if worse:
        lines += ["Worse than a baseline on:", ""] + [f"- {w}" for w in worse] + [""]
    run = tags.get("training_run_id")
    lines += ["### Lineage", "",
              f"- training run: `{run}` (the model is its artifact `runs:/{run}/final_model`)" if run else "- training run: -",
              f"- data manifest sha256: `{tags.get('data_manifest_fingerprint', '-')}`",
              f"- config hash: `{tags.get('config_hash', '-')}`",
              f"- code version: `{tags.get('code_version', '-')}`",
              f"- registration run: `{tags.get('registration_run_id', '-')}`"]
    if decision:
        lines.append(f"- promotion: {decision}")
    return "\n".join(lines) + "\n"


def describe_version(name: str, version: str, tracking_uri: str, table: Sequence[Mapping[str, Any]], model: str,
                     protocol: str, decision: str | None = None) -> str:
    """Set the version's description (see :func:`version_description`); return it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version(name, version)
    text = version_description(table, model, protocol, mv.tags, decision)
    client.update_model_version(name, version, description=text)
    return text
