"""The training objective (spec section 2), kept in one place.

Legend: B batch, L window length, h head horizon, E experts, K top-k, N pooled router rows.

For head h, position t, step j (0..h-1): the target is ``labels[t+j]``; it counts only while
``t+j < L``, ``loss_mask[t+j]`` is true and ``segment_ids[t+j] == segment_ids[t] > 0``
(``preprocessing.schema.split_windows`` defines labels/loss_mask that way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    topk_idx_NK = probs_NE.topk(top_k, dim=-1).indices
    chosen_NE = F.one_hot(topk_idx_NK, E).float().sum(dim=1)
    w_N = torch.ones_like(probs_NE[:, 0]) if keep_N is None else keep_N.float()
    n = w_N.sum().clamp_min(1.0)
    f_E = (chosen_NE * w_N[:, None]).sum(dim=0) / n
    P_E = (probs_NE * w_N[:, None]).sum(dim=0) / n
    return E * (f_E * P_E).sum()
