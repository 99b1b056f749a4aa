"""CUDA-only checks of the compiled paths that CPU CI cannot reach (skipped without a GPU).

Run on a GPU node: ``python3 -m pytest -q tests/test_gpu.py``. The references are the
slow paths the CPU tests already trust: the per-expert loop and ``LocalDispatcher``.
"""
from __future__ import annotations

import os

import pytest
import torch

from model import TimeMoeConfig
from model.moe import GroupedExperts, LocalDispatcher, MoeFeedForward, naive_routed_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _experts(num_experts: int, dim: int, hidden: int) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts, dim, hidden)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.05)
    return experts.cuda().to(torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max().clamp_min(1e-6))


def test_routed_experts_compiled_with_dynamic_rows_match_the_eager_grouped_gemm():
    """What EP runs (``compile_expert_parallel_parts``): the grouped experts compiled with a
    dynamic row count, fed the ragged counts a rank receives (odd totals, empty experts, one
    row), forward and weight/input gradients against eager grouped_mm on the same weights."""
    from pipeline.parallel.parallelize import compile_expert_parallel_parts

    eager = _experts(4, 128, 256)
    compiled = _experts(4, 128, 256)

    class Holder(torch.nn.Module):  # what compile_expert_parallel_parts expects of an MoE layer
        def __init__(self, experts):
            super().__init__()
            self.experts = experts
            self.shared_expert = torch.nn.Identity()

    compile_expert_parallel_parts(Holder(compiled))
    for counts in ([37, 0, 101, 5], [1, 0, 0, 0], [0, 0, 0, 300], [64, 64, 64, 64], [3, 999, 2, 17]):
        counts_E = torch.tensor(counts, device="cuda")
        x = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
        x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_comp = eager(x_eager, counts_E), compiled(x_comp, counts_E)
        assert y_comp.shape == y_eager.shape
        assert _rel(y_comp, y_eager) < 2e-2, counts
        probe = torch.randn_like(y_eager, dtype=torch.float32)
        (y_eager.float() * probe).sum().backward()
        (y_comp.float() * probe).sum().backward()
        assert _rel(x_comp.grad, x_eager.grad) < 2e-2, counts
        for name in ("gate_proj", "up_proj", "down_proj"):
            ge, gc = getattr(eager, name).grad, getattr(compiled, name).grad
            assert _rel(gc, ge) < 2e-2, (counts, name)
        eager.zero_grad(), compiled.zero_grad()


def test_grouped_experts_on_cuda_match_the_per_expert_loop():
    experts = _experts(8, 64, 96)
    x = torch.randn(333, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, 8, (333, 2), device="cuda")
    w = torch.rand(333, 2, device="cuda")
    y = LocalDispatcher()(x, idx, w, experts)
    ref = naive_routed_experts(x.float(), idx, w, experts.float())
    assert _rel(y, ref) < 2e-2


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_all_to_all_dispatcher_on_a_group_of_one_equals_the_local_dispatcher(chunks):
    """The EP dispatcher over a one-rank NCCL group (every exchange a local copy) with its CUDA
    parts compiled (static parts, shared and routed experts): outputs and input, expert and
    shared-expert gradients equal LocalDispatcher's on the same layer."""
    import torch.distributed as dist

    from pipeline.parallel.ep_dispatch import AllToAllDispatcher
    from pipeline.parallel.parallelize import compile_expert_parallel_parts

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)
    cfg = TimeMoeConfig.preset("tiny")
    torch.manual_seed(0)
    layer = MoeFeedForward(cfg)  # parameters are initialised by the model, not the block
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.05)
    layer = layer.cuda().to(torch.bfloat16)
    T, K, E = 1000 + chunks, cfg.num_experts_per_tok, cfg.num_experts
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, E, (T, K), device="cuda")
    w = torch.rand(T, K, device="cuda")

    def run(dispatcher):
        xr = x.clone().requires_grad_()
        layer.zero_grad()
        y = dispatcher(xr, idx, w, layer.experts, lambda: layer.shared_branch(xr))
        (y.float() ** 2).sum().backward()
        return y.detach(), xr.grad, layer.experts.down_proj.grad.clone(), layer.shared_expert.up_proj.weight.grad.clone()

    ref = run(LocalDispatcher())
    compile_expert_parallel_parts(layer)
    got = run(AllToAllDispatcher(dist.group.WORLD, 1, E, chunks=chunks))
    for a, b in zip(got, ref):
        assert _rel(a, b) < 2e-2


def test_tuned_flex_tiles_match_the_default_kernels_in_the_packed_training_attention():
    """``TUNED_FLEX_TILES`` on the layer the training step runs (packed rows, compiled flex):
    output and q/k/v-path gradients equal to the default tiles' within bf16 rounding."""
    from model.attention import TUNED_FLEX_TILES, Attention, rope_cos_sin, segment_positions

    for preset in ("timemoe-50m", "timemoe-200m"):
        cfg = TimeMoeConfig.preset(preset, attn_implementation="flex")
        torch.manual_seed(0)
        default = Attention(cfg).cuda().to(torch.bfloat16)
        tuned = Attention(cfg).cuda().to(torch.bfloat16)
        tuned.load_state_dict(default.state_dict())
        tuned.flex_kernel_options = TUNED_FLEX_TILES[cfg.head_dim]
        B, L = 4, 4096
        seg = torch.repeat_interleave(torch.arange(1, 5, device="cuda"), L // 4).expand(B, L).contiguous()
        rope = rope_cos_sin(segment_positions(seg), cfg.head_dim, cfg.rope_theta, torch.bfloat16)
        x = torch.randn(B, L, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        probe = torch.randn(B, L, cfg.hidden_size, device="cuda")
        outs = []
        for layer in (default, tuned):
            x_in = x.clone().requires_grad_()
            y, _ = layer(x_in, rope, seg, seg)
            (y.float() * probe).sum().backward()
            outs.append((y, x_in.grad, layer.qkv_proj.weight.grad))
        for got, want in zip(outs[1], outs[0]):
            assert _rel(got, want) < 2e-2, preset
