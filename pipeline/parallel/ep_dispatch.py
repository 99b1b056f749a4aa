"""All-to-all token dispatcher for expert parallelism (EP), dropless, variable splits.

The MoE layer (``model.moe.MoeFeedForward``) owns a dispatcher object and calls it as
``dispatcher(x_TD, topk_idx_TK, topk_weight_TK, experts, concurrent_branch) -> y_TD`` (the routed
output plus ``concurrent_branch()``, the gated shared expert). With EP = 1 that is
``model.moe.LocalDispatcher``; ``pipeline.parallel.expert_parallel.apply_expert_parallel`` swaps in
:class:`AllToAllDispatcher` when EP > 1. Nothing here knows about DeepSpeed: the dispatcher
only receives the expert-parallel process group.

Legend: T tokens on this rank, K = top-k, D hidden, E global experts, El = E / ep local experts,
S = ep_size (source/destination ranks of the EP group), N rows after top-k expansion (T*K),
R rows received by this rank.

Data flow of one layer (one host wait, see ``_exchange_counts``); with ``chunks`` > 1 the same per
chunk of tokens, pipelined (see :class:`AllToAllDispatcher`)::

    K copies per token, sorted by global expert  --all_to_all(counts)-->  counts_recv_SE  (host waits for these)
    x_sorted_ND                   --all_to_all(rows)--->   x_recv_RD  [by (source rank, local expert)]
                                  (shared expert runs meanwhile on the compute stream; in the
                                   backward pass the same exchange overlaps the shared expert's backward)
    regroup by local expert -> experts(x_local_RD, tokens_per_local_expert) -> y_local_RD -> undo regroup
    y_recv_RD                     --all_to_all(rows)--->   y_sorted_ND
    unsort -> y_TKD; y_TD = sum_k w_k * y_TKD[:, k]

Every permutation is a gather whose backward is the inverse gather (``model.moe.permute_rows``):
indexing's backward would be an accumulating scatter-add, which serialises on the GPU.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from model.moe import combine_copies, copies_by_expert, permute_rows

_COMPILED: dict[str, Callable] = {}


def _static_part(fn: Callable, x: torch.Tensor) -> Callable:
    """The parts before and after the exchange have static shapes (T tokens, N = T*K copies), so
    on CUDA they run compiled (fused, as inside ep = 1's compiled layer) although the
    dispatcher itself is kept out of torch.compile. Eager elsewhere: CPU/gloo runs need no C++
    toolchain and tests stay fast."""
    if not x.is_cuda:
        return fn
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


def regroup_by_local_expert(counts_recv_SE: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Permutation taking received rows from (source rank, local expert) blocks to
    (local expert, source rank) blocks, i.e. contiguous per local expert as the grouped
    experts expect. ``x_local = x_recv[perm]``; ``y_recv[perm] = y_local`` undoes it.
    ``rows`` (the total, known on the host) spares ``repeat_interleave`` a device sync."""
    s, el = counts_recv_SE.shape
    expert_of_row_R = torch.repeat_interleave(
        torch.arange(el, device=counts_recv_SE.device).repeat(s), counts_recv_SE.reshape(-1), output_size=rows
    )
    return torch.argsort(expert_of_row_R, stable=True)


class _Exchange:
    """State shared by the two halves of an overlapped exchange (:func:`start_all_to_all` and
    :func:`finish_all_to_all`): the forward work handle, then the backward one with its buffers."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group) -> None:
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = None
        self.grad_work = None
        self.grad_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (sent, received), alive until the wait


class _StartAllToAll(torch.autograd.Function):
    """Forward: start the exchange. Backward: wait for the gradient exchange that
    :class:`_FinishAllToAll`'s backward started, and hand its result on."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        out = x_ND.new_empty((sum(exchange.out_splits),) + tuple(x_ND.shape[1:]))
        exchange.work = dist.all_to_all_single(out, x_ND.contiguous(), exchange.out_splits, exchange.in_splits,
                                               group=exchange.group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, _placeholder: torch.Tensor):
        exchange = ctx.exchange
        exchange.grad_work.wait()
        grad_in = exchange.grad_buffers[1]
        exchange.grad_work, exchange.grad_buffers = None, None
        return grad_in, None


class _FinishAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: *start* the gradient's exchange and return at once.

    Autograd runs ready nodes latest-created first. The nodes created between the start and the
    finish (the shared expert) are therefore run after this backward and before
    ``_StartAllToAll``'s, i.e. while the gradient rows are in flight: the backward mirror of the
    forward overlap."""

    @staticmethod
    def forward(ctx, out_ND: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        exchange.work.wait()
        exchange.work = None
        return out_ND.view_as(out_ND)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        exchange = ctx.exchange
        send = grad_out.contiguous()
        grad_in = send.new_empty((sum(exchange.in_splits),) + tuple(send.shape[1:]))
        exchange.grad_work = dist.all_to_all_single(grad_in, send, exchange.in_splits, exchange.out_splits,
                                                    group=exchange.group, async_op=True)
        exchange.grad_buffers = (send, grad_in)
        # what _StartAllToAll.backward receives and ignores: it takes the exchanged gradient instead
        return grad_out, None


def start_all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple[torch.Tensor, _Exchange]:
    """Start sending ``in_splits[r]`` rows to rank r of ``group`` and receiving ``out_splits[r]``
    from it (``all_to_all_single`` with unequal splits; the backward pass is the same exchange
    with the splits swapped). Work queued before :func:`finish_all_to_all` overlaps it, in the
    forward and (mirrored) in the backward pass. Read the rows only through
    ``finish_all_to_all``'s result."""
    exchange = _Exchange(out_splits, in_splits, group)
    return _StartAllToAll.apply(x_ND, exchange), exchange


def finish_all_to_all(started_ND: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
    return _FinishAllToAll.apply(started_ND, exchange)


class _SplitsOnHost:
    """The split sizes on their way to the host. On CUDA the copy is asynchronous into pinned
    memory and ``get()`` waits for an event recorded right after it, i.e. for the count exchange
    only, not for the work queued behind it (``.tolist()`` would wait for the whole stream)."""

    def __init__(self, splits_2S: torch.Tensor) -> None:
        self._event = None
        if splits_2S.is_cuda:
            self._host = torch.empty(splits_2S.shape, dtype=splits_2S.dtype, pin_memory=True)
            self._host.copy_(splits_2S, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = splits_2S

    def get(self) -> list[list[int]]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


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
    ``[r * El, (r + 1) * El)``. Not an nn.Module: it holds no parameters, only the group.

    ``concurrent_branch`` (the shared expert) is queued on the compute stream right after the
    row exchange is started, so it runs while the rows are in flight; its backward likewise runs
    while the gradient of those rows travels back.

    ``chunks = C > 1`` pipelines the layer: the tokens are split into C chunks, each exchanged
    on its own, so chunk c's experts run while chunk c+1's rows arrive and chunk c-1's outputs
    leave; the backward pass mirrors it (see :class:`_FinishAllToAll`). Only the last chunk's
    return trip stays exposed. Costs: C smaller grouped GEMMs per layer, C exchanges each way."""

    def __init__(self, group, ep_size: int, num_experts: int, chunks: int = 1) -> None:
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        if chunks < 1:
            raise ValueError(f"chunks={chunks}: must be >= 1")
        self.group = group
        self.ep_size = ep_size
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.chunks = chunks
        self.last_rows_received = 0  # rows this rank's experts got in the last call (load probes)

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, num_experts={self.num_experts}, chunks={self.chunks})"

    def _exchange_counts(self, counts_CE: torch.Tensor) -> torch.Tensor:
        """Tell every rank how many rows it gets from us per chunk and local expert; returns
        ``counts_recv_CSE``. The split sizes must then reach the host before the row exchanges
        can be issued (``_SplitsOnHost``): one host wait per layer, for this exchange only.
        Removing it entirely needs fixed-capacity splits or a device-side all-to-all-v
        (NVSHMEM/DeepEP kernels)."""
        c, s, el = counts_CE.shape[0], self.ep_size, self.num_local_experts
        send_SCEl = counts_CE.view(c, s, el).transpose(0, 1).contiguous()  # blocks by destination rank
        recv_SCEl = torch.empty_like(send_SCEl)
        dist.all_to_all_single(recv_SCEl, send_SCEl, group=self.group)  # counts carry no gradient
        return recv_SCEl.transpose(0, 1)

    def _local_experts(self, experts, x_recv_RD: torch.Tensor, counts_recv_SE: torch.Tensor, rows: int) -> torch.Tensor:
        """The received rows through this rank's experts, returned in the order received."""
        if self.num_local_experts == 1:  # rows already contiguous for the one local expert
            return _run_experts(experts, x_recv_RD, counts_recv_SE.sum(0))
        perm_R = regroup_by_local_expert(counts_recv_SE, rows)
        inverse_R = torch.argsort(perm_R)
        y_local_RD = _run_experts(experts, permute_rows(x_recv_RD, perm_R, inverse_R), counts_recv_SE.sum(0))
        return permute_rows(y_local_RD, inverse_R, perm_R)

    @torch.compiler.disable  # dynamic split sizes + collectives: eager, one graph break per layer
    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts,
                 concurrent_branch: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        # the data movement of model.moe.LocalDispatcher (gathers only, no scatter-add in
        # forward or backward), with the two exchanges inserted around the experts, per chunk.
        # Every rank issues the same collectives in the same order (chunks is fixed, not data
        # dependent; an empty chunk still exchanges), which NCCL requires.
        copies = [_static_part(copies_by_expert, x_TD)(x_c, idx_c, self.num_experts) for x_c, idx_c in
                  zip(torch.tensor_split(x_TD, self.chunks), torch.tensor_split(topk_idx_TK, self.chunks))]
        counts_CE = torch.stack([counts_E for *_, counts_E in copies])
        counts_recv_CSE = self._exchange_counts(counts_CE)
        splits_2CS = torch.stack([counts_CE.view(self.chunks, self.ep_size, -1).sum(2), counts_recv_CSE.sum(2)])
        in_splits_CS, out_splits_CS = _SplitsOnHost(splits_2CS).get()
        self.last_rows_received = sum(map(sum, out_splits_CS))

        arriving = [start_all_to_all(x_sorted_ND, out_splits, in_splits, self.group)
                    for (x_sorted_ND, *_), in_splits, out_splits in zip(copies, in_splits_CS, out_splits_CS)]
        side_TD = concurrent_branch() if concurrent_branch is not None else None
        leaving = []
        for (started_RD, exchange), counts_recv_SE, in_splits, out_splits in zip(
                arriving, counts_recv_CSE, in_splits_CS, out_splits_CS):
            y_recv_RD = self._local_experts(experts, finish_all_to_all(started_RD, exchange), counts_recv_SE,
                                            sum(out_splits))
            leaving.append(start_all_to_all(y_recv_RD, in_splits, out_splits, self.group))
        y_sorted = [finish_all_to_all(started_ND, exchange) for started_ND, exchange in leaving]
        y_parts = [_static_part(combine_copies, y_ND)(y_ND, order_N, inverse_N, w_c)
                   for y_ND, (_, order_N, inverse_N, _), w_c in
                   zip(y_sorted, copies, torch.tensor_split(topk_weight_TK, self.chunks))]
        y_TD = y_parts[0] if len(y_parts) == 1 else torch.cat(y_parts)
        return y_TD if side_TD is None else y_TD + side_TD
