"""Which weights a run trains, applied to a plain ``TimeMoeModel`` from outside before the
training engine is built (``train.finetune`` of the training config).

Methods (``pipeline.config.FinetuneSection.method``):

- ``full``: every weight trains.
- ``linear_probe``: only the output heads train; the backbone is frozen.
- ``lora``: the pretrained weights are frozen and low-rank updates train instead,
  ``W' = W + (alpha / r) * B @ A`` with ``A [r, in]`` (small random) and ``B [out, r]`` (zeros,
  so training starts exactly at the pretrained model), on the attention projections
  (``qkv_proj``, ``o_proj``) and on every expert projection (``gate_proj``, ``up_proj``,
  ``down_proj`` of the routed experts, one ``A``/``B`` pair per expert, and of the shared expert).
  The output heads train fully (they are small and forecast-specific).

Why our own LoRA and not ``peft``: peft wraps ``nn.Linear``; our routed experts are stacked
``[E, out, in]`` tensors run by one grouped GEMM, which peft cannot adapt. A parametrization
(``torch.nn.utils.parametrize``) keeps the model's forward and its grouped GEMM untouched (the
adapted weight is computed once per forward), works for both kinds of weight, and merges back
into plain weights (:func:`merge_lora`) so that the exported checkpoint has the published layout
and loads anywhere without this module.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from model import TimeMoeModel
from model.moe import GroupedExperts
from pipeline.config import FinetuneSection

LORA_LINEARS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class LowRankDelta(nn.Module):
    """``W -> W + scale * B @ A`` for a weight ``[out, in]`` or a stack ``[E, out, in]``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        *stack, out_dim, in_dim = weight.shape
        self.scale = alpha / rank
        a = torch.empty(*stack, rank, in_dim, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(a.view(-1, in_dim), a=math.sqrt(5))  # as LoRA does: A random, B zero
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(*stack, out_dim, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def apply_finetune_method(model: TimeMoeModel, section: FinetuneSection) -> dict[str, int]:
    """Freeze and adapt ``model`` in place for ``section.method``; returns the parameter counts
    ``{"trainable": ..., "frozen": ...}`` (what the job logs)."""
    if section.method not in ("full", "linear_probe", "lora"):
        raise ValueError(f"finetune.method {section.method!r}: expected full, linear_probe or lora")
    if section.method == "lora" and section.lora_rank < 1:
        raise ValueError(f"finetune.lora_rank must be >= 1, got {section.lora_rank}")
    if section.method != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        model.heads.weight.requires_grad_(True)
    if section.method == "lora":
        for module in list(model.modules()):
            names = EXPERT_WEIGHTS if isinstance(module, GroupedExperts) else (
                ("weight",) if isinstance(module, nn.Linear) and _lora_target(model, module) else ())
            for name in names:
                delta = LowRankDelta(getattr(module, name), section.lora_rank, section.lora_alpha)
                parametrize.register_parametrization(module, name, delta, unsafe=True)
                getattr(module.parametrizations, name).original.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


def _lora_target(model: TimeMoeModel, linear: nn.Linear) -> bool:
    """An attention projection or a shared-expert projection (the heads train fully instead)."""
    if linear is model.heads:
        return False
    name = next((n for n, m in model.named_modules() if m is linear), "")
    return name.rsplit(".", 1)[-1] in LORA_LINEARS


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every low-rank update into its weight (in place) and remove the parametrizations:
    the model is a plain ``TimeMoeModel`` again, with the fine-tuned weights."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_state_dict(state: dict[str, torch.Tensor], section: FinetuneSection) -> dict[str, torch.Tensor]:
    """A (gathered) state dict of a LoRA-adapted model with every low-rank update folded into its
    weight, under the plain model's key names: what the export saves."""
    scale = section.lora_alpha / section.lora_rank
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".parametrizations." not in key:
            out[key] = value
            continue
        prefix, rest = key.split(".parametrizations.", 1)
        name, part = rest.split(".", 1)
        if part == "original":
            a, b = state[f"{prefix}.parametrizations.{name}.0.A"], state[f"{prefix}.parametrizations.{name}.0.B"]
            out[f"{prefix}.{name}"] = value + scale * (b @ a)
    return out
