"""AdamW with decay / no-decay parameter groups and the warm-up + cosine learning-rate schedule.

Paper recipe: AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1, linear warm-up then cosine.
Norm weights and biases (all parameters with fewer than 2 dims) are not decayed: decaying a
norm's gain pulls it towards 0, which is a different model, not regularisation. Expert stacks
(3-D) and linear weights (2-D) decay.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from pipeline.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Named groups ``decay`` / ``no_decay`` (names are needed by DeepSpeed's MoE grouping)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` (the first step already moves the weights),
    then cosine from 1 down to ``min_lr_ratio`` at ``max_steps``; flat at the floor after.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class FiniteStepAdamW(torch.optim.AdamW):
    """Fused AdamW that skips a step whose gradients are not all finite, decided on the device:
    parameters, moments and the step count stay as they were (the fused kernel's ``found_inf``),
    and the host never waits for the verdict. It replaces DeepSpeed's bf16 overflow check, which
    launches an inf/nan test per gradient tensor and reads the flag on the host every step.

    DeepSpeed steps the optimizer one parameter group at a time, after clipping every group by
    the GLOBAL norm (a non-finite norm zeroes the finite groups' gradients): with
    ``global_grad_norm`` set (``pipeline.parallel.parallelize`` points it at the engine's norm of
    this step), a non-finite global norm skips every group, not only those holding the bad values."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.global_grad_norm: Callable[[], Any] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        norm = self.global_grad_norm() if self.global_grad_norm is not None else None
        if not torch.is_tensor(norm):  # no engine norm: this group's own gradients decide
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.stack(torch._foreach_norm(grads)) if grads else None
        if norm is not None:
            self.found_inf = (~torch.isfinite(norm.detach()).all()).float()  # read by the fused kernel
        return super().step(closure)


def build_optimizer(groups: list[dict], cfg: OptimSection, skip_nonfinite_on_device: bool = False) -> torch.optim.Optimizer:
    """AdamW; with ``skip_nonfinite_on_device`` the fused :class:`FiniteStepAdamW` (the GPU
    training path, where DeepSpeed's own bf16 check is off)."""
    kind = FiniteStepAdamW if skip_nonfinite_on_device else torch.optim.AdamW
    return kind(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (DeepSpeed does it at accumulation boundaries)."""
    warmup = min(cfg.warmup_steps, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup, max_steps, cfg.min_lr_ratio)
    )
