"""Expert parallelism (EP) for Time-MoE under DeepSpeed ZeRO-1/2, applied from outside the model.

The model (``model/``) stays plain PyTorch: each MoE layer owns a router, grouped experts
(stacked ``gate_proj/up_proj [E, F_e, D]``, ``down_proj [E, D, F_e]``) and a dispatcher object.
EP only (1) slices the stacked expert tensors so EP rank r keeps experts
``[r*E/ep, (r+1)*E/ep)``, (2) swaps the dispatcher for the all-to-all one
(:mod:`pipeline.parallel.ep_dispatch`) and (3) hands over the process group. Attention, router, shared
expert and its gate stay data parallel. See docs/expert_parallel.md for the AutoEP verdict.

Use, in this order (``pipeline/parallel/parallelize.py``)::

    deepspeed.init_distributed(dist_backend="gloo" | "nccl")         # 1. process group exists
    model = TimeMoeModel(cfg)                                          # same seed on every rank
    ep = apply_expert_parallel(model, ep_size=ep_size)                 # 2. shard + swap + DS groups
    groups = split_moe_param_groups(param_groups(model, 0.1))         # 3. dense + MoE param groups
    optimizer = torch.optim.AdamW(groups, lr=..., betas=(0.9, 0.95))
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    ...
    full = gather_expert_params(model, ep)   # collective on the EP group: full [E, ...] tensors

Contract with DeepSpeed (read from deepspeed 0.19.8 runtime/engine.py and zero/stage_1_and_2.py):

- Groups: ``apply_expert_parallel`` calls ``deepspeed.utils.groups._create_expert_and_data_parallel``
  (needs ``deepspeed.init_distributed`` first). Group name ``"ep_size_{ep}"``; EP groups are
  consecutive ranks ``[0..ep-1], [ep..2ep-1], ...``; expert-data-parallel (EDP) groups stride
  by ep, size world/ep.
- Expert params carry ``allreduce=False`` and ``group_name="ep_size_{ep}"`` (DeepSpeed's
  ``is_moe_param`` marks): ZeRO-1/2 reduces their gradients inside the EDP group only, and the
  engine broadcasts them at start-up inside the EDP group (not from global rank 0, which would
  overwrite the other EP ranks' experts).
- ``engine.has_moe_layers`` is decided by ``isinstance(module, deepspeed.moe.layer.MoE)``; we add
  a parameter-free :class:`_DeepSpeedMoEMarker` (a ``MoE`` subclass) as ``ep_marker`` under each
  MoE layer. It adds no state-dict keys.
- The optimizer must get param groups in which expert params sit in groups with ``"moe": True``
  and ``"name": group_name`` (``split_moe_param_groups`` does this via
  ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``).
- Gradient scaling: ZeRO divides every gradient, expert ones included, by the full data-parallel
  world size and sums expert gradients over the EDP group. The all-to-all backward already
  brings every rank's token contributions to the expert's owner, so this equals the ep=1 mean
  (checked by tests/test_expert_parallel.py: ep=2 vs ep=1 weights match after 5 steps).
- ZeRO-3 is refused by DeepSpeed for native MoE groups ("Native DeepSpeed MoE is not supported
  with ZeRO Stage 3"); use ZeRO-1 or ZeRO-2 with EP > 1.
- With ep_size == 1 this is a no-op (LocalDispatcher, no MoE groups): pure data parallel.
- Checkpoints: ``engine.save_checkpoint`` writes the module state of rank 0 only, which holds
  only EP rank 0's experts; use :func:`gather_expert_params` (or per-EP-rank files) to save
  full expert tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.parallel.ep_dispatch import AllToAllDispatcher

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertParallelInfo:
    """What EP did to the model; pass it to ``gather_expert_params``."""

    ep_size: int
    ep_rank: int
    num_experts: int
    num_local_experts: int
    group_name: str | None  # DeepSpeed group name ("ep_size_{ep}"), None when ep_size == 1
    ep_group: Any = None  # torch process group of the all-to-all
    expert_data_parallel_group: Any = None  # where expert gradients are reduced
    moe_layers: list[str] = field(default_factory=list)  # module names of the MoE layers (at apply time)
    # the experts modules themselves: names change if wrappers (activation checkpointing) come later
    expert_modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def local_experts(self) -> range:
        return range(self.ep_rank * self.num_local_experts, (self.ep_rank + 1) * self.num_local_experts)


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE layers = modules with a ``dispatcher`` and grouped ``experts`` holding stacked weights."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if hasattr(module, "dispatcher") and experts is not None and all(
            isinstance(getattr(experts, w, None), nn.Parameter) and getattr(experts, w).dim() == 3 for w in EXPERT_WEIGHTS
        ):
            found.append((name, module))
    return found


def _deepspeed_marker_class():
    from deepspeed.moe.layer import MoE

    class _DeepSpeedMoEMarker(MoE):
        """Parameter-free stand-in that makes DeepSpeed's engine see an MoE layer
        (``engine.has_moe_layers``) and use the EDP groups; it is never called."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)  # skip MoE.__init__: it would build a gate and experts
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                raise RuntimeError(f"DeepSpeed group {self.expert_group_name} is missing: "
                                   "call apply_expert_parallel after deepspeed.init_distributed")

        def forward(self, *args, **kwargs):
            raise RuntimeError("_DeepSpeedMoEMarker is a marker for DeepSpeed, not a layer")

    return _DeepSpeedMoEMarker


def _create_deepspeed_groups(ep_size: int) -> tuple[str, Any, Any]:
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name, groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def apply_expert_parallel(model: nn.Module, ep_size: int, ep_group=None, ep_chunks: int = 1) -> ExpertParallelInfo:
    """Shard every MoE layer's experts over ``ep_size`` ranks and swap in the all-to-all dispatcher.

    Call on the full, identically initialised model on every rank, after
    ``deepspeed.init_distributed`` and before ``deepspeed.initialize``. ``ep_group=None``
    (the training path) creates DeepSpeed's EP/EDP groups and marks the model for ZeRO;
    an explicit ``ep_group`` (a torch process group of ``ep_size`` ranks) is for use without
    DeepSpeed (inference, dispatcher tests): no DeepSpeed groups, no marker. ``ep_chunks``: the
    dispatcher's pipelining depth (:class:`pipeline.parallel.ep_dispatch.AllToAllDispatcher`).
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers (a dense model?); use ep_size=1")
    num_experts = layers[0][1].experts.gate_proj.shape[0]
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
    if ep_size == 1:
        return ExpertParallelInfo(1, 0, num_experts, num_experts, None, moe_layers=[n for n, _ in layers],
                                  expert_modules=[m.experts for _, m in layers])
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel(ep_size>1) needs torch.distributed initialised "
                           "(deepspeed.init_distributed) first")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")

    group_name, edp_group, marker_cls = None, None, None
    if ep_group is None:
        group_name, ep_group, edp_group = _create_deepspeed_groups(ep_size)
        marker_cls = _deepspeed_marker_class()
    elif dist.get_world_size(ep_group) != ep_size:
        raise ValueError(f"ep_group has {dist.get_world_size(ep_group)} ranks, expected ep_size={ep_size}")
    ep_rank = dist.get_rank(ep_group)
    n_local = num_experts // ep_size
    local = slice(ep_rank * n_local, (ep_rank + 1) * n_local)

    for name, moe in layers:
        experts = moe.experts
        if experts.gate_proj.shape[0] != num_experts:
            raise ValueError(f"{name}: {experts.gate_proj.shape[0]} experts, expected {num_experts} "
                             "(apply_expert_parallel called twice?)")
        for w in EXPERT_WEIGHTS:
            full = getattr(experts, w)
            shard = nn.Parameter(full.detach()[local].clone(), requires_grad=full.requires_grad)
            if group_name is not None:
                shard.allreduce = False  # DeepSpeed's is_moe_param mark: reduce in the EDP group
                shard.group_name = group_name
            setattr(experts, w, shard)
        for attr in ("num_experts", "num_local_experts"):  # keep the experts' own count consistent
            if isinstance(getattr(experts, attr, None), int):
                setattr(experts, attr, n_local)
        moe.dispatcher = AllToAllDispatcher(ep_group, ep_size, num_experts, chunks=ep_chunks)
        if marker_cls is not None:
            moe.ep_marker = marker_cls(num_experts, ep_size)

    return ExpertParallelInfo(ep_size, ep_rank, num_experts, n_local, group_name, ep_group, edp_group,
                              [n for n, _ in layers], [m.experts for _, m in layers])


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def split_moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Turn the trainer's own param groups (each with a unique ``"name"``) into DeepSpeed MoE
    groups: expert params move to copies of their group with ``moe=True, name=group_name``.
    Identity when no param is an expert param (ep_size == 1)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for i, g in enumerate(param_groups):
        if "name" not in g:
            raise ValueError(f"param group {i} needs a 'name' for DeepSpeed's MoE grouping")
    if not any(is_expert_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    groups = split_params_into_different_moe_groups_for_optimizer([dict(g) for g in param_groups])
    return [g for g in groups if g["params"]]


def _iter_expert_params(model: nn.Module, info: ExpertParallelInfo) -> Iterable[tuple[str, nn.Parameter]]:
    """(current name in ``model``, shard) for every expert weight, in layer order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    for experts in info.expert_modules:
        for w in EXPERT_WEIGHTS:
            p = getattr(experts, w)
            if id(p) not in name_of:
                raise ValueError(f"expert weight {w} of a sharded layer is not a parameter of the given model")
            yield name_of[id(p)], p


@torch.no_grad()
def gather_expert_params(model: nn.Module, info: ExpertParallelInfo) -> dict[str, torch.Tensor]:
    """Full ``[E, ...]`` expert tensors by parameter name (e.g. ``...ffn_layer.experts.gate_proj``).
    A collective over the EP group: every EP rank must call it. Pass the bare model
    (``engine.module``); with ZeRO-1/2 the module's params are the up-to-date full weights."""
    out = {}
    for name, p in _iter_expert_params(model, info):
        if info.ep_size == 1:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(info.ep_size)]
        dist.all_gather(parts, p.detach().contiguous(), group=info.ep_group)
        out[name] = torch.cat(parts, dim=0)
    return out
