"""Fine-tuning on a user's own data: any dataset the preprocessing job can read, packed by it.

``python -m jobs.preprocess --input RAW --output PACKED`` turns jsonl / CSV / Parquet / Time-300B
files (local or s3://) into packed windows with a ``train/`` and a ``val/`` split; then
``python -m jobs.finetune --parent ... --data PACKED`` fine-tunes on ``train/`` only and scores the
parent and the fine-tuned model on the same ``val/`` windows with the held-out loss and MSE the
training loop and the scaling sweeps use (``pipeline.train.heldout``). There is no test split and
no forecasting protocol here: those belong to the benchmarks (``protocol.py``).

Refused before any training: windows longer than the parent's maximum context (re-pack with a
shorter ``pack.window_length``) and data without a ``val/`` split (pack with ``pack.val_fraction``
> 0), since the fine-tuned model could not be compared with its parent.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.evaluation.inference import load_forecaster
from pipeline.finetune.data import ALLOWED_SPLIT, FinetuneData
from pipeline.finetune.protocol import (
    FinetuneJob,
    Parent,
    record_lineage,
    register_version,
    resolve_parent,
    train_child,
)
from pipeline.train.validation import HeldOutMeasures, heldout_measures
from preprocessing.schema import TRAIN_DIR, VAL_DIR, read_manifest

HELDOUT_BATCH = 16


def packed_finetune_data(url: str, parent: Parent) -> tuple[FinetuneData, int]:
    """What the run will read and its window length, checked against the parent before anything
    trains."""
    manifest = read_manifest(url)
    window = int(manifest["window_length"])
    if window > parent.max_context:
        raise ValueError(f"{url}: windows of {window} points are longer than the model's maximum context "
                         f"{parent.max_context}; re-pack with pack.window_length <= {parent.max_context}")
    rows = manifest.get("rows", {})
    train, val = int(rows.get(TRAIN_DIR, 0)), int(rows.get(VAL_DIR, 0))
    if not train:
        raise ValueError(f"{url}: no {TRAIN_DIR}/ rows to fine-tune on")
    if not val:
        raise ValueError(f"{url}: no {VAL_DIR}/ rows to compare the fine-tuned model with its parent on; "
                         f"pack with pack.val_fraction > 0")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return FinetuneData(url, name, ALLOWED_SPLIT, (0, train), train, val), window


def heldout_of(model: str, job: FinetuneJob, data: FinetuneData, uri: str | None) -> HeldOutMeasures:
    """The held-out loss and MSE of ``model`` on the first ``job.heldout_windows`` val windows, on
    the device and in the dtype the job's inference options choose."""
    fc = load_forecaster(model, job.inference, uri)
    return heldout_measures(fc.model, str(data.path), job.heldout_windows, job.inference.batch_size or HELDOUT_BATCH)


def finetune_on_packed(job: FinetuneJob) -> dict[str, Any]:
    """Fine-tune ``job.parent`` on ``job.data``'s train split, score both models on its val split,
    register when asked; writes ``summary.json`` and ``table.md`` under ``RUN`` and returns the
    summary."""
    assert job.data, "finetune_on_packed needs job.data"
    run_root = Path(job.output_dir).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    run_root.mkdir(parents=True, exist_ok=False)
    parent = resolve_parent(job.parent, run_root / "parent", job.tracking_uri)
    data, window = packed_finetune_data(job.data, parent)
    out = run_root / data.dataset
    child = train_child(job, parent, data, out)
    cfg, uri, model_dir, run_id = child.cfg, child.uri, child.model_dir, child.run_id
    tuned, base = heldout_of(str(model_dir), job, data, uri), heldout_of(str(parent.path), job, data, uri)
    better = tuned.loss < base.loss
    scores = {"fine_tuned_heldout_loss": tuned.loss, "fine_tuned_heldout_mse": tuned.mse,
              "parent_heldout_loss": base.loss, "parent_heldout_mse": base.mse}
    record_lineage(uri, run_id, parent, data, {k.replace("_heldout_", "_heldout/"): v for k, v in scores.items()},
                   dataset_label=job.data)
    registered = promoted = None
    if job.register_name:
        registered, promoted = register_version(
            job.register_name, model_dir, run_id, uri, better,
            {"finetune.parent": parent.label, "finetune.dataset": job.data, "finetune.split": ALLOWED_SPLIT,
             "finetune.method": cfg.finetune.method, "heldout.loss": repr(tuned.loss),
             "parent_heldout.loss": repr(base.loss),
             "promotion.reason": f"held-out loss {tuned.loss:.6g} {'<' if better else '>='} parent {base.loss:.6g}"})
    windows = min(job.heldout_windows, data.val_windows)
    summary = {"parent": parent.label, "data": job.data, "window_length": window,
               "train_windows": data.train_windows, "heldout_windows": windows, "steps": cfg.train.max_steps,
               "seconds": round(child.seconds, 1), "epoch_seconds": round(child.epoch_seconds, 2),
               "run_id": run_id, "model": str(model_dir), "registered": registered, "promoted": promoted,
               "method": cfg.finetune.method, **scores}
    (run_root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_root / "table.md").write_text(
        "| model | held-out loss | held-out MSE |\n|---|---|---|\n"
        f"| parent | {base.loss:.4f} | {base.mse:.4f} |\n| fine-tuned ({cfg.finetune.method}) | {tuned.loss:.4f} | "
        f"{tuned.mse:.4f} |\n\n{windows} windows of {data.dataset}'s {VAL_DIR}/ split, both models.\n")
    summary["run_dir"] = str(run_root)
    return summary
