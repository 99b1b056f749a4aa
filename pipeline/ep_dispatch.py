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

    K copies per token, sorted by global expert  --all_to_all(counts)-->  counts_recv_SE  (the sync: .tolist())
    x_sorted_ND                   --all_to_all(rows)--->   x_recv_RD  [by (source rank, local expert)]
    regroup by local expert -> experts(x_local_RD, tokens_per_local_expert) -> y_local_RD -> undo regroup
    y_recv_RD                     --all_to_all(rows)--->   y_sorted_ND
    unsort -> y_TKD; y_TD = sum_k w_k * y_TKD[:, k]

Every permutation is a gather whose backward is the inverse gather (``model.moe.permute_rows``):
indexing's backward would be a scatter-add, which was 30% of a step on an H100.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.moe import permute_rows, sort_by_expert


def regroup_by_local_expert(counts_recv_SE: torch.Tensor) -> torch.Tensor:
    """Permutation taking received rows from (source rank, local expert) blocks to
    (local expert, source rank) blocks, i.e. contiguous per local expert as the grouped
    experts expect. ``x_local = x_recv[perm]``; ``y_recv[perm] = y_local`` undoes it."""
    s, el = counts_recv_SE.shape
    expert_of_row_R = torch.repeat_interleave(
        torch.arange(el, device=counts_recv_SE.device).repeat(s), counts_recv_SE.reshape(-1)
    )
    return torch.argsort(expert_of_row_R, stable=True)


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

    @torch.compiler.disable  # dynamic split sizes + collectives: eager, one graph break per layer
    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts) -> torch.Tensor:
        # the data movement of model.moe.LocalDispatcher (gathers only, no scatter-add in
        # forward or backward), with the two exchanges inserted around the experts
        T, K = topk_idx_TK.shape
        order_N, inverse_N, counts_E = sort_by_expert(topk_idx_TK, self.num_experts)
        copies_ND = x_TD[:, None, :].expand(T, K, x_TD.shape[1]).reshape(T * K, -1)
        x_sorted_ND = permute_rows(copies_ND, order_N, inverse_N)
        counts_recv_SE = self._exchange_counts(counts_E)
        splits = torch.stack([counts_E.view(self.ep_size, -1).sum(1), counts_recv_SE.sum(1)])
        in_splits, out_splits = splits.tolist()  # host sync (see _exchange_counts)

        x_recv_RD = all_to_all(x_sorted_ND, out_splits, in_splits, self.group)
        perm_R = regroup_by_local_expert(counts_recv_SE)
        inverse_R = torch.argsort(perm_R)
        y_local_RD = _run_experts(experts, permute_rows(x_recv_RD, perm_R, inverse_R), counts_recv_SE.sum(0))
        y_recv_RD = permute_rows(y_local_RD, inverse_R, perm_R)
        y_sorted_ND = all_to_all(y_recv_RD, in_splits, out_splits, self.group)
        y_TKD = permute_rows(y_sorted_ND, inverse_N, order_N).view(T, K, -1)
        # weight in the router's dtype (fp32), return in the activations' dtype
        return (y_TKD.to(topk_weight_TK.dtype) * topk_weight_TK[..., None]).sum(dim=1).to(y_sorted_ND.dtype)
