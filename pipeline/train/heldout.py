"""The held-out metrics: one definition, used by the training loop's evaluation
(``eval_loss`` / ``eval_mse``) and by every scaling-law trial's summary.

- **held-out loss**: the mean over the horizon heads of their masked Huber losses
  (``model.loss.head_loss``), averaged over batches. This is the forecasting objective WITHOUT
  the router's auxiliary loss: a sparse model and its dense twin are compared on the same
  quantity, and a change of the aux factor does not move it.
- **held-out MSE**: the squared error of the 1-step head's prediction on the observed targets
  (the loss mask), in normalised units, averaged over points.
"""
from __future__ import annotations

from typing import Any

import torch


class HeldOut:
    """Running sums of the held-out metrics over batches (``add``), for one rank or, after an
    all-reduce of :attr:`sums`, for all."""

    def __init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, squared error, points

    def add(self, out: Any, labels_BL: torch.Tensor, loss_mask_BL: torch.Tensor) -> None:
        """``out``: the model's output for one batch (``head_losses``, ``predictions``)."""
        loss = torch.stack([v.float() for v in out.head_losses.values()]).mean()
        pred_BL = out.predictions[min(out.predictions)][..., 0].float()
        mask_BL = loss_mask_BL.bool()
        err = ((pred_BL - labels_BL.float()) ** 2)[mask_BL]
        self.sums += torch.tensor([float(loss), 1.0, float(err.sum()), float(mask_BL.sum())], dtype=torch.float64)

    def metrics(self) -> dict[str, float]:
        """``{"eval_loss", "eval_mse"}``, or ``{}`` when no batch (or no observed point) was seen."""
        loss_sum, batches, sq_err, points = self.sums.tolist()
        if batches == 0 or points == 0:
            return {}
        return {"eval_loss": loss_sum / batches, "eval_mse": sq_err / points}
