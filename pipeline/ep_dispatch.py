"""All-to-all token dispatcher for expert parallelism (EP), dropless, variable splits.

The MoE layer (``model.moe.MoeFeedForward``) owns a dispatcher object and calls it as
``dispatcher(x_TD, topk_idx_TK, topk_weight_TK, experts) -> y_TD``. With EP = 1 that is
``model.moe.LocalDispatcher``; ``pipeline.expert_parallel.apply_expert_parallel`` swaps in
:class:`AllToAllDispatcher` when EP > 1. Nothing here knows about DeepSpeed: the dispatcher
only receives the expert-parallel process group.

Legend: T tokens on this rank, K = top-k, D hidden, E global experts, El = E / ep local experts,
S = ep_size (source/destination ranks of the EP group), N rows after top-k expansion (T*K),
R rows received by this rank.

Data flow of one layer (one host sync, see ``_exchange_counts``)::

    rows sorted by global expert  --all_to_all(counts)-->  counts_recv_SE      (the sync: .tolist())
    x_sorted_ND                   --all_to_all(rows)--->   x_recv_RD  [by (source rank, local expert)]
    regroup by local expert -> experts(x_local_RD, tokens_per_local_expert) -> y_local_RD -> undo regroup
    y_recv_RD                     --all_to_all(rows)--->   y_sorted_ND
    y_TD = sum_k w_k * y  (index_add over the token each row came from)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DispatchPlan:
    """Where this rank's token copies go: pure function of the router's choice."""

    order_N: torch.Tensor  # permutation of the T*K (token, slot) pairs, sorted by global expert
    token_of_row_N: torch.Tensor  # token index of each sorted row
    counts_E: torch.Tensor  # rows this rank sends to each global expert


def plan_dispatch(topk_idx_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the (token, slot) pairs by global expert; stable so the order is deterministic."""
    k = topk_idx_TK.shape[1]
    flat_N = topk_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return DispatchPlan(order_N=order_N, token_of_row_N=order_N // k, counts_E=counts_E)


def regroup_by_local_expert(counts_recv_SE: torch.Tensor) -> torch.Tensor:
    """Permutation taking received rows from (source rank, local expert) blocks to
    (local expert, source rank) blocks, i.e. contiguous per local expert as the grouped
    experts expect. ``x_local = x_recv[perm]``; ``y_recv[perm] = y_local`` undoes it."""
    s, el = counts_recv_SE.shape
    expert_of_row_R = torch.repeat_interleave(
        torch.arange(el, device=counts_recv_SE.device).repeat(s), counts_recv_SE.reshape(-1)
    )
    return torch.argsort(expert_of_row_R, stable=True)


def combine(y_sorted_ND: torch.Tensor, plan: DispatchPlan, topk_weight_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its (not renormalised) router weight and sum per token.
    The product is taken in the router's dtype (fp32), the sum in the activations' dtype."""
    w_N = topk_weight_TK.reshape(-1)[plan.order_N]
    weighted_ND = (y_sorted_ND.to(w_N.dtype) * w_N[:, None]).to(y_sorted_ND.dtype)
    y_TD = y_sorted_ND.new_zeros(num_tokens, y_sorted_ND.shape[1])
    return y_TD.index_add(0, plan.token_of_row_N, weighted_ND)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with unequal splits: the backward pass is the same
    exchange with the splits swapped. Written out (rather than torch.distributed.nn) so that
    empty splits and the group handling are explicit and tested."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send ``in_splits[r]`` rows to rank r of ``group``, receive ``out_splits[r]`` from it."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def _run_experts(experts, x_RD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Run the grouped experts; a rank that receives no row at all (every token routed
    elsewhere) runs one zero row instead, because grouped_mm's backward rejects empty inputs.
    A zero row is exact: it adds nothing to any output or weight gradient, and the experts
    still get (zero) gradients, so every rank reduces the same parameter set."""
    if x_RD.shape[0] > 0:
        return experts(x_RD, tokens_per_expert)
    counts = tokens_per_expert.clone()
    counts[0] = 1
    # cat (not a fresh tensor): the empty x_RD must stay in the graph, or this rank would skip
    # the backward all-to-all that the other ranks wait in (a deadlock, seen in testing)
    padded_1D = torch.cat([x_RD, x_RD.new_zeros(1, x_RD.shape[1])])
    return experts(padded_1D, counts)[:0]


class AllToAllDispatcher:
    """Dropless expert-parallel dispatch: every routed copy of a token travels to the rank
    owning its expert and back. Rank r of the EP group owns global experts
    ``[r * El, (r + 1) * El)``. Not an nn.Module: it holds no parameters, only the group."""

    def __init__(self, group, ep_size: int, num_experts: int) -> None:
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        self.group = group
        self.ep_size = ep_size
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, num_experts={self.num_experts})"

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Tell every rank how many rows it gets from us per local expert. This is the one
        host-device sync per layer: the split sizes must reach the host (``.tolist()`` in
        ``__call__``) before the row exchange can be issued. Removing it needs fixed-capacity
        splits (pad each (rank, expert) block to a capacity known in advance) or a device-side
        all-to-all-v (e.g. NVSHMEM/DeepEP kernels)."""
        counts_recv = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_recv, counts_E, group=self.group)  # counts carry no gradient
        return counts_recv.view(self.ep_size, self.num_local_experts)

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts) -> torch.Tensor:
        plan = plan_dispatch(topk_idx_TK, self.num_experts)
        x_sorted_ND = x_TD[plan.token_of_row_N]
        counts_recv_SE = self._exchange_counts(plan.counts_E)
        splits = torch.stack([plan.counts_E.view(self.ep_size, -1).sum(1), counts_recv_SE.sum(1)])
        in_splits, out_splits = splits.tolist()  # host sync (see _exchange_counts)

        x_recv_RD = all_to_all(x_sorted_ND, out_splits, in_splits, self.group)
        perm_R = regroup_by_local_expert(counts_recv_SE)
        y_local_RD = _run_experts(experts, x_recv_RD[perm_R], counts_recv_SE.sum(0))
        y_recv_RD = torch.empty_like(y_local_RD).index_copy(0, perm_R, y_local_RD)
        y_sorted_ND = all_to_all(y_recv_RD, in_splits, out_splits, self.group)
        return combine(y_sorted_ND, plan, topk_weight_TK, x_TD.shape[0])
