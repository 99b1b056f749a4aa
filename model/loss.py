"""The training objective (spec section 2), kept in one place.

Legend: B batch, L window length, h head horizon, E experts, K top-k, N pooled router rows.

For head h, position t, step j (0..h-1): the target is ``labels[t+j]``; it counts only while
``t+j < L``, ``loss_mask[t+j]`` is true and ``segment_ids[t+j] == segment_ids[t] > 0``
(``preprocessing.schema.split_windows`` defines labels/loss_mask that way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.moe import top_k_experts

HUBER_DELTA = 2.0


def shifted_targets(labels_BL: torch.Tensor, valid_BL: torch.Tensor, segment_ids_BL: torch.Tensor,
                    h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, L, h]`` (``labels[t+j]``) and their mask (same segment, observed, in window)."""
    B, L = labels_BL.shape
    lab = F.pad(labels_BL, (0, h)).unfold(1, h, 1)[:, :L]  # [B, L, h]
    ok = F.pad(valid_BL, (0, h), value=False).unfold(1, h, 1)[:, :L]
    seg = F.pad(segment_ids_BL, (0, h), value=-1).unfold(1, h, 1)[:, :L]
    same = (seg == segment_ids_BL[:, :, None]) & (segment_ids_BL[:, :, None] > 0)
    return lab, ok & same


def head_loss(pred_BLh: torch.Tensor, labels_BL: torch.Tensor, valid_BL: torch.Tensor,
              segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """Masked mean of the Huber(delta 2) loss of one head, in fp32."""
    h = pred_BLh.shape[-1]
    target_BLh, mask_BLh = shifted_targets(labels_BL, valid_BL, segment_ids_BL, h)
    elem = F.huber_loss(pred_BLh.float(), target_BLh.float(), reduction="none", delta=HUBER_DELTA)
    m = mask_BLh.to(elem.dtype)
    return (elem * m).sum() / m.sum().clamp_min(1.0)


def load_balancing_loss(router_logits_NE: torch.Tensor, top_k: int, keep_N: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral aux loss over router logits pooled from ALL layers: ``E * sum_e f_e * P_e``
    with f_e the share of tokens whose top-k slots chose e (summed over slots) and P_e the mean
    router probability, both over the rows where ``keep_N`` (non-padding) is true. A balanced
    router gives K. Means are masked sums (no boolean indexing: no host sync on GPU)."""
    E = router_logits_NE.shape[-1]
    probs_NE = router_logits_NE.float().softmax(dim=-1)
    topk_idx_NK = top_k_experts(probs_NE, top_k)  # the router's own choice
    chosen_NE = F.one_hot(topk_idx_NK, E).float().sum(dim=1)
    w_N = torch.ones_like(probs_NE[:, 0]) if keep_N is None else keep_N.float()
    n = w_N.sum().clamp_min(1.0)
    f_E = (chosen_NE * w_N[:, None]).sum(dim=0) / n
    P_E = (probs_NE * w_N[:, None]).sum(dim=0) / n
    return E * (f_E * P_E).sum()


AUX_LOSS_SCOPES = ("pooled", "per_layer")


def router_aux_loss(router_logits_per_layer: list[torch.Tensor], top_k: int, keep_T: torch.Tensor | None = None,
                    scope: str = "pooled") -> torch.Tensor:
    """The model's aux loss. ``"pooled"`` (the spec, the released code): one
    :func:`load_balancing_loss` over all layers' logits concatenated. It only balances the
    experts' load summed over layers, so every layer may keep sending all its tokens to the same
    k experts (measured: every layer of 50M/200M/ultra from initialisation through 400 steps,
    docs/expert_parallel.md). ``"per_layer"`` (not in the spec; opt-in): the mean over layers of
    each layer's loss, which pushes every layer towards balance, as expert parallelism needs
    (the EP rank owning a hot expert does that layer's expert work for everyone)."""
    if scope == "per_layer":
        return torch.stack([load_balancing_loss(l, top_k, keep_T) for l in router_logits_per_layer]).mean()
    if scope != "pooled":
        raise ValueError(f"router aux loss scope {scope!r} not in {AUX_LOSS_SCOPES}")
    keep_N = None if keep_T is None else keep_T.repeat(len(router_logits_per_layer))
    return load_balancing_loss(torch.cat(router_logits_per_layer), top_k, keep_N)
