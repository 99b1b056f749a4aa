"""Model -> training engine, in ONE ordered function (:func:`parallelize`). Reading it tells
you the whole recipe:

1. expert parallel (``pipeline.parallel.expert_parallel``: shard experts, all-to-all dispatcher, groups)
2. activation checkpointing of each decoder layer (optional)
3. per-layer ``torch.compile`` (optional)
4. ZeRO-3 only: MoE blocks become leaf modules, so ZeRO gathers an MoE block's parameters at
   once instead of hooking each expert (which data-dependent routing would desynchronise)
5. AdamW param groups (+ DeepSpeed MoE groups when EP > 1), LR schedule
6. ``deepspeed.initialize`` with the generated config

Inference has its own, shorter recipe: :func:`compile_for_inference` (compiled prefill, no
DeepSpeed), used by ``benchmarks/evaluate_gpu.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from model.config import TRAINING_ONLY_FIELDS
from pipeline.config import ModelSection, TrainConfig
from pipeline.parallel import optim
from pipeline.parallel.deepspeed_config import deepspeed_config, skips_nonfinite_on_device
from pipeline.parallel.expert_parallel import apply_expert_parallel, split_moe_param_groups


def init_distributed(use_gpu: bool) -> None:
    """Process group for DeepSpeed: nccl on GPU, gloo on CPU."""
    import deepspeed
    import torch.distributed as dist

    if not use_gpu:
        # The CPU shared-memory comm op compiles for ~25 s on first use and gloo does not need
        # it (stack.md: same results without it). Patched before the early return below: under
        # Ray Train the process group already exists, and DeepSpeed still builds the op when
        # deepspeed.initialize wraps that group (~40 s per run with 2 workers on 2 cores).
        import importlib

        # Not `import deepspeed.comm.torch as m`: that resolves the attribute `torch` of
        # deepspeed.comm, which is the torch library itself, and patches the wrong module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if dist.is_initialized():
        return
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def model_config(section: ModelSection) -> Any:
    from model import TimeMoeConfig

    cfg = TimeMoeConfig.preset(section.preset)
    if section.overrides:
        names = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(section.overrides) - names)
        if unknown:
            raise ValueError(f"model.overrides: unknown TimeMoeConfig field(s) {unknown}")
        cfg = dataclasses.replace(cfg, **section.overrides)
    return cfg


# TimeMoeConfig fields that change how a model trains or runs, not the shape of its weights:
# taken from the run's config even when the weights come from a checkpoint (model.init_from).
# The training-only ones are the config's own list; the kernel choice and the cache come on top.
RUNTIME_FIELDS = TRAINING_ONLY_FIELDS + ("attn_implementation", "use_cache")


def build_model(section: ModelSection, seed: int) -> nn.Module:
    """Same seed on every rank -> identical initial weights everywhere. With ``init_from``, every
    rank loads the same checkpoint instead; its shape must match the preset + overrides."""
    from model import TimeMoeModel

    torch.manual_seed(seed)
    cfg = model_config(section)
    if not section.init_from:
        return TimeMoeModel(cfg)
    loaded = TimeMoeModel.from_pretrained(section.init_from)
    have, want = loaded.config.to_dict(), cfg.to_dict()
    differ = sorted(k for k in want if k not in RUNTIME_FIELDS and have.get(k) != want[k])
    if differ:
        raise ValueError(f"model.init_from={section.init_from}: the checkpoint's "
                         + ", ".join(f"{k}={have.get(k)!r}" for k in differ)
                         + f" differ from model.preset={section.preset!r} + overrides ("
                         + ", ".join(f"{k}={want[k]!r}" for k in differ) + ")")
    model = TimeMoeModel(cfg)  # built from the run's config, so the runtime fields take effect
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the longest ``nn.ModuleList`` in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers")
    return list(max(lists, key=len))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward. The forward is wrapped in place (no wrapper
    module), so parameter names, checkpoints and the exported layout stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        inner = layer.forward
        layer.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def compile_expert_parallel_parts(moe: nn.Module, routed_experts: bool = True) -> None:
    """With expert parallelism the dispatcher runs outside the layer's graph (its split sizes
    change every step), and so would everything it calls: the shared expert (called from the
    dispatcher to overlap the exchange) and the routed experts. Compile them on their own, the
    routed experts with a dynamic row count (the rows a rank receives vary per step and chunk),
    so that their SwiGLU is fused as in the ep = 1 layer's graph."""
    moe.shared_expert.compile()
    if routed_experts:
        moe.experts.compile(dynamic=True)


def apply_compile(model: nn.Module, expert_parallel: bool = False) -> None:
    """Compile per layer: the layers are identical, so one graph is reused and a graph break
    in the dispatcher stays local. With expert parallelism the parts the dispatcher calls are
    compiled on their own (:func:`compile_expert_parallel_parts`)."""
    for layer in decoder_layers(model):
        layer.compile()
    if expert_parallel:
        for module in model.modules():
            if hasattr(module, "dispatcher") and isinstance(getattr(module, "shared_expert", None), nn.Module):
                compile_expert_parallel_parts(module)


DECODE_MODES = ("eager", "dynamic", "automatic")


def compile_for_inference(model: nn.Module, decode: str = "eager") -> nn.Module:
    """Compile a model for ``generate``, in place: each decoder layer's PREFILL (the cache-free
    forward over the context, see ``model.modeling.TimeMoeDecoder``) with static shapes, one
    graph per (batch, context) shape shared by the identical layers. Decode steps change the key
    length every step, so a static graph would recompile per step: they run ``decode="eager"``,
    or ``"dynamic"`` compiled with symbolic shapes (the cache write and attention stay eager
    between two graphs), or ``"automatic"``: compiled static first, and what then changes between
    calls becomes symbolic on the first recompile (torch.compile's default). A decode step's
    tensors keep their shapes (the step's new values); only the cache's fill level moves. Keep
    batches at a fixed size (``forecast(fixed_batch=True)``).

    Experts the grouped GEMM cannot run (fp32 on CUDA, or any compiled fp32) take the per-expert
    loop, whose split sizes come from the routing; it runs outside the graphs, since traced it
    would specialise on the sizes and recompile every batch."""
    from model.attention import Attention
    from model.moe import GroupedExperts

    if decode not in DECODE_MODES:
        raise ValueError(f"compile_for_inference: decode={decode!r} not in {DECODE_MODES}")
    # one graph per shape and layer kind: the default limits would silently fall back to eager
    # after a few (batch, context) shapes
    dynamo = torch._dynamo.config
    for name, limit in (("recompile_limit", 256), ("cache_size_limit", 256),  # the older names
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), limit))
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module._forward_loop = torch.compiler.disable(module._forward_loop)
        if decode != "eager" and isinstance(module, Attention):
            module.attend_cached = torch.compiler.disable(module.attend_cached)
    for layer in decoder_layers(model):
        eager = layer.forward
        prefill = torch.compile(eager, dynamic=False)
        step = eager if decode == "eager" else torch.compile(eager, dynamic=True if decode == "dynamic" else None)
        layer.forward = functools.partial(_prefill_or_decode, prefill, step)
    return model


def _prefill_or_decode(prefill, decode, h_BLD, rope_BLd, q_seg_BL, k_seg_BS, kv_cache=None, *args):
    return (prefill if kv_cache is None else decode)(h_BLD, rope_BLd, q_seg_BL, k_seg_BS, kv_cache, *args)


def moe_leaf_classes() -> list[type]:
    from model.moe import MoeFeedForward

    return [MoeFeedForward]


def merge_nested(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` laid over it, nested dicts merged key by key (a new dict)."""
    out = dict(base)
    for key, value in patch.items():
        out[key] = merge_nested(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parallelize(model: nn.Module, cfg: TrainConfig, world_size: int, use_gpu: bool,
                deepspeed_overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Return ``(engine, ep_info)``; ``ep_info`` is None when EP = 1. ``deepspeed_overrides`` are
    laid over the generated DeepSpeed config (benchmarks compare DeepSpeed settings with it)."""
    import deepspeed

    par = cfg.parallel
    ep_info = None
    if par.ep_size > 1:  # 1.

        ep_info = apply_expert_parallel(model, ep_size=par.ep_size, ep_chunks=par.ep_chunks)
    if par.activation_checkpointing:  # 2.
        apply_activation_checkpointing(model)
    if par.compile:  # 3.
        apply_compile(model, expert_parallel=ep_info is not None)
    if par.zero_stage == 3:  # 4.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, moe_leaf_classes())
    groups = optim.param_groups(model, cfg.optim.weight_decay)  # 5.
    if ep_info is not None:

        groups = split_moe_param_groups(groups)
    optimizer = optim.build_optimizer(groups, cfg.optim, skips_nonfinite_on_device(par, use_gpu))
    scheduler = optim.build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    ds_cfg = deepspeed_config(par, cfg.train, cfg.optim, world_size, cfg.grad_accum_steps(world_size), use_gpu)
    if deepspeed_overrides:
        ds_cfg = merge_nested(ds_cfg, deepspeed_overrides)
    engine, _, _, _ = deepspeed.initialize(  # 6.
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    if isinstance(optimizer, optim.FiniteStepAdamW):
        # ZeRO sets this step's global norm before it steps the groups (None while it is off)
        optimizer.global_grad_norm = lambda: getattr(engine.optimizer, "_global_grad_norm", None)
    return engine, ep_info
