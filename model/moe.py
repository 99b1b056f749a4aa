"""The MoE feed-forward block: router -> token dispatcher -> grouped experts (+ shared expert).

Legend: T tokens (B*L), D hidden, E experts (E_local after expert-parallel slicing), K top-k,
F_e routed expert width (F // K), N = T*K routed token copies.

Per token x (spec section 1):
    p = softmax(router(x)) in fp32;  w, idx = topk(p, K)   (weights NOT renormalised; ``top_k_experts``)
    y = sum_k w_k * expert_{idx_k}(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
Dropless: every routed copy is computed (no capacity factor).

Contract with ``pipeline/`` (expert parallelism): ``MoeFeedForward`` owns ``.router``,
``.experts`` (``GroupedExperts``), ``.shared_expert``, ``.shared_expert_gate`` and
``.dispatcher``, called as ``dispatcher(x_TD, topk_idx_TK, topk_weight_TK, experts, shared) -> y_TD``
= routed output + ``shared()``. The shared expert is handed over as a thunk so that an
expert-parallel dispatcher can run it while tokens are in flight. An expert-parallel dispatcher
replaces ``.dispatcher`` and slices ``.experts``; nothing else in the model knows about it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TimeMoeConfig


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases: the shared expert and the dense FFN."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up as one GEMM of twice the width: at short K (the hidden size) a wider N
        # runs nearer the tensor cores' peak, and x is read once
        gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # torch 2.13 CPU: grouped_mm is correct forward and backward in fp32 (checked by tests).
    # CUDA kernels take bf16; other dtypes there fall back to the per-expert loop. Under
    # torch.compile the op's meta function accepts only bf16 (on any device), so compiled fp32
    # CPU code takes the loop too.
    if not hasattr(F, "grouped_mm"):
        return False
    if x.dtype == torch.bfloat16:
        return True
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: ``gate_proj/up_proj [E, F_e, D]``, ``down_proj [E, D, F_e]``.

    ``forward(x_sorted_TD, tokens_per_expert_E)``: rows are sorted by expert, expert e owns the
    e-th contiguous group. One grouped GEMM per projection, no host sync (offsets stay on device).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x_sorted_TD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if _use_grouped_mm(x_sorted_TD):
            offs_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
            # gate and up as one grouped GEMM of twice the width (see SwiGLU.forward); the
            # weights are concatenated per forward (a few MB), so parameters, checkpoints,
            # expert-parallel slicing and LoRA's parametrizations keep the two tensors
            gate_up_E2FD = torch.cat([self.gate_proj, self.up_proj], dim=1)
            gate, up = F.grouped_mm(x_sorted_TD, gate_up_E2FD.transpose(-2, -1), offs=offs_E).chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offs_E)
        return self._forward_loop(x_sorted_TD, tokens_per_expert_E)

    def _forward_loop(self, x_sorted_TD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Fallback: one matmul per expert (host sync on the split sizes)."""
        outs = []
        for e, x_e in enumerate(torch.split(x_sorted_TD, tokens_per_expert_E.tolist())):
            h = F.silu(x_e @ self.gate_proj[e].T) * (x_e @ self.up_proj[e].T)
            outs.append(h @ self.down_proj[e].T)
        return torch.cat(outs) if outs else x_sorted_TD.new_zeros(0, self.down_proj.shape[1])


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward is another gather (``grad[inverse]``) instead of the
    scatter-with-accumulate that indexing's backward uses: a permutation has no repeated index,
    so nothing needs accumulating (and an accumulating scatter serialises on the GPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in the order ``perm`` (``inverse`` is its inverse permutation)."""
    return _PermuteRows.apply(x, perm, inverse)


def top_k_experts(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The k most probable experts of every token, the most probable first, ``[T, k]``: k passes
    of argmax, each masking the expert the one before chose. A router has few experts, so under
    torch.compile these passes fuse with the softmax, where ``topk`` stays a sort kernel of its own;
    ties go to the lower expert id (topk leaves their order unspecified). Not differentiable: the
    weights are read from the probabilities by the caller."""
    p_TE = probs_TE.detach()
    experts_E = torch.arange(p_TE.shape[-1], device=p_TE.device)
    chosen = []
    for _ in range(k):
        idx_T = p_TE.argmax(dim=-1)
        chosen.append(idx_T)
        p_TE = p_TE.masked_fill(experts_E == idx_T[:, None], float("-inf"))
    return torch.stack(chosen, dim=-1)


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the N = T*K routed copies (copy n = token n // K, slot n % K): the order that groups
    them by expert, its inverse, and the copies per expert ``[E]``. No host sync (no bincount)."""
    flat_N = topk_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    # argsort of a permutation is its inverse; a scatter here became a slow sorted index_put under inductor
    inverse_N = torch.argsort(order_N)
    # a one-hot column sum: bincount syncs with the host, and index_add compiles to a sorted
    # index_put that serialises on the repeated indices
    counts_E = torch.nn.functional.one_hot(flat_N, num_experts).sum(dim=0)
    return order_N, inverse_N, counts_E


def copies_by_expert(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K routed copies of every token, grouped by expert: ``x_sorted_ND`` plus the order,
    its inverse and the copies per expert (what :func:`combine_copies` and the experts need)."""
    T, K = topk_idx_TK.shape
    order_N, inverse_N, counts_E = sort_by_expert(topk_idx_TK, num_experts)
    copies_ND = x_TD[:, None, :].expand(T, K, x_TD.shape[1]).reshape(T * K, -1)
    return permute_rows(copies_ND, order_N, inverse_N), order_N, inverse_N, counts_E


def combine_copies(y_sorted_ND: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor,
                   topk_weight_TK: torch.Tensor) -> torch.Tensor:
    """Undo :func:`copies_by_expert` on the experts' outputs and sum each token's K outputs
    weighted by its router probabilities: in the router's dtype (fp32), returned in the
    activations' dtype."""
    T, K = topk_weight_TK.shape
    y_TKD = permute_rows(y_sorted_ND, inverse_N, order_N).view(T, K, -1)
    return (y_TKD.to(topk_weight_TK.dtype) * topk_weight_TK[..., None]).sum(dim=1).to(y_sorted_ND.dtype)


class LocalDispatcher:
    """Expert parallel size 1: copy each token to its K slots, sort the copies by expert, run the
    grouped experts, unsort, and sum the K outputs weighted by the router probabilities. Only
    gathers (no scatter-add), so forward and backward are deterministic. Holds no state."""

    def __repr__(self) -> str:
        return "LocalDispatcher()"

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: GroupedExperts, concurrent_branch: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        x_sorted_ND, order_N, inverse_N, counts_E = copies_by_expert(x_TD, topk_idx_TK, experts.gate_proj.shape[0])
        y_TD = combine_copies(experts(x_sorted_ND, counts_E), order_N, inverse_N, topk_weight_TK)
        return y_TD if concurrent_branch is None else y_TD + concurrent_branch()


def naive_routed_experts(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                         experts: GroupedExperts) -> torch.Tensor:
    """Test oracle: a Python loop over experts and slots, as the released code does."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(experts.gate_proj.shape[0]):
        for slot in range(topk_idx_TK.shape[1]):
            sel = topk_idx_TK[:, slot] == e
            if sel.any():
                x = x_TD[sel]
                h = F.silu(x @ experts.gate_proj[e].T) * (x @ experts.up_proj[e].T)
                y_TD[sel] += topk_weight_TK[sel, slot, None].to(x.dtype) * (h @ experts.down_proj[e].T)
    return y_TD


class MoeFeedForward(nn.Module):
    """Router + dispatcher + grouped experts + gated shared expert."""

    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(D, config.num_experts, bias=False)  # checkpoint name: ffn_layer.gate
        self.experts = GroupedExperts(config.num_experts, D, config.expert_intermediate_size)
        self.shared_expert = SwiGLU(D, config.intermediate_size)
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)
        self.dispatcher = LocalDispatcher()

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]``, top-k (not renormalised) fp32 weights and expert ids."""
        logits_TE = self.router(x_TD)
        probs_TE = logits_TE.float().softmax(dim=-1)
        topk_idx_TK = top_k_experts(probs_TE, self.top_k)
        # the chosen probabilities by a one-hot product (exact: one non-zero term) rather than
        # topk's values, whose scatter backward compiled to a slow index_put
        onehot_TKE = torch.nn.functional.one_hot(topk_idx_TK, probs_TE.shape[-1]).to(probs_TE.dtype)
        topk_weight_TK = (onehot_TKE * probs_TE[:, None, :]).sum(dim=-1)
        return logits_TE, topk_weight_TK, topk_idx_TK

    def shared_branch(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The gated shared expert; the dispatcher receives it as a thunk (see the module doc)."""
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``y_BLD``, router logits ``[T, E]`` and expert ids ``[T, K]``."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        logits_TE, topk_weight_TK, topk_idx_TK = self.route(x_TD)

        y_TD = self.dispatcher(x_TD, topk_idx_TK, topk_weight_TK, self.experts, lambda: self.shared_branch(x_TD))
        return y_TD.view(B, L, D), logits_TE, topk_idx_TK
