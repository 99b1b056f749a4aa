"""The held-out metrics of a model on a packed run's ``val/`` shards (local or s3://), read in the
manifest's order: the same windows for every model scored, so a sparse trial and its dense
twin, or a fine-tuned model and its parent, compare directly. The metrics themselves are
defined once, in ``pipeline.train.heldout``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch

from pipeline.train.heldout import HeldOut
from pipeline.train.loop import expert_imbalance
from preprocessing.schema import VAL_DIR, decode_batch, list_shards, split_windows
from preprocessing.storage import resolve_filesystem


@dataclass
class HeldOutMeasures:
    loss: float                 # pipeline.train.heldout's eval_loss
    mse: float                  # ... and eval_mse
    expert_balance: list[float]  # per layer: busiest expert's tokens / mean (empty for dense models)


def heldout_metrics(model: Any, data_path: str, max_windows: int, batch_size: int) -> tuple[float, float]:
    """(held-out loss, held-out MSE) as ``pipeline.train.heldout`` defines them, on the first
    ``max_windows`` windows of the val shards (local or s3://), in the manifest's order."""
    m = heldout_measures(model, data_path, max_windows, batch_size)
    return m.loss, m.mse


def heldout_measures(model: Any, data_path: str, max_windows: int, batch_size: int) -> HeldOutMeasures:
    """Held-out loss and MSE (``heldout_metrics``) and, in the same forward passes, the routing
    balance of every MoE layer over the windows' real tokens (``pipeline.train.loop``'s
    ``expert_imbalance``: the same windows for every trial, so families compare directly)."""
    urls = list_shards(data_path, VAL_DIR)
    if not urls:
        raise FileNotFoundError(f"{data_path}/{VAL_DIR}: no val shards for the held-out metrics")
    fs, _ = resolve_filesystem(urls[0])
    ds = pads.dataset([resolve_filesystem(u)[1] for u in urls], format="parquet", filesystem=fs)
    model.eval()
    device = next(model.parameters()).device
    cols = ("values", "segment_ids", "loss_mask")
    held, seen, counts_LE = HeldOut(), 0, None
    with torch.no_grad():
        for rb in ds.to_batches(columns=list(cols), batch_size=batch_size):
            if seen >= max_windows:
                break
            d = decode_batch({c: rb.column(c) for c in cols})
            d = {k: v[: max_windows - seen] for k, v in d.items()}
            seen += len(d["values"])
            w = split_windows(d["values"], d["segment_ids"], d["loss_mask"])
            t = {k: torch.from_numpy(np.array(v)).to(device) for k, v in w.items()}  # arrow-backed: read-only
            out = model(t["inputs"], segment_ids=t["segment_ids"], labels=t["labels"], loss_mask=t["loss_mask"])
            held.add(out, t["labels"], t["loss_mask"])
            if getattr(out, "expert_counts", None) is not None:
                c = out.expert_counts.detach().float().cpu()
                counts_LE = c if counts_LE is None else counts_LE + c
    m = held.metrics()
    if not m:
        raise ValueError(f"{data_path}/{VAL_DIR}: no held-out windows with observed targets")
    balance = expert_imbalance(counts_LE) if counts_LE is not None else []
    return HeldOutMeasures(m["eval_loss"], m["eval_mse"], [float(b) for b in balance])
