"""The DeepSpeed JSON config, generated from the typed sections (never hand-written).

The optimizer and LR scheduler are built by ``pipeline.parallel.optim`` and handed to
``deepspeed.initialize``, so this config only carries batch geometry, ZeRO, precision and
gradient clipping.
"""
from __future__ import annotations

from typing import Any

from pipeline.config import OptimSection, ParallelSection, TrainSection


def resolve_precision(parallel: ParallelSection, use_gpu: bool) -> str:
    """``auto`` is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if parallel.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return parallel.precision


def skips_nonfinite_on_device(parallel: ParallelSection, use_gpu: bool) -> bool:
    """Whether the optimizer guards against non-finite gradients itself (bf16 on GPU)."""
    return use_gpu and resolve_precision(parallel, use_gpu) == "bf16"


def deepspeed_config(
    parallel: ParallelSection,
    train: TrainSection,
    optim: OptimSection,
    world_size: int,
    grad_accum_steps: int,
    use_gpu: bool,
) -> dict[str, Any]:
    precision = resolve_precision(parallel, use_gpu)
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage in (1, 2):
        # Reduce in buckets while backward runs; contiguous grads keep the reduce simple. On one
        # worker there is nothing to reduce, and the per-parameter hooks that fill the buckets
        # cost host time the device waits for (docs/benchmarks.md, the loop against the step).
        overlap = use_gpu and world_size > 1
        zero.update(overlap_comm=overlap, contiguous_gradients=overlap, reduce_bucket_size=int(5e7))
    if parallel.zero_stage == 3:
        zero.update(
            overlap_comm=use_gpu,
            contiguous_gradients=True,
            # Small models: gather everything up front instead of prefetching piecewise.
            stage3_param_persistence_threshold=int(1e5),
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_batch_size": train.micro_batch_size * world_size * grad_accum_steps,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        # On GPU the optimizer skips non-finite steps itself, on the device
        # (optim.FiniteStepAdamW, see skips_nonfinite_on_device); DeepSpeed's check would read
        # a flag on the host after an inf/nan test per gradient tensor, every step.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": not skips_nonfinite_on_device(parallel, use_gpu)},
        "fp16": {"enabled": False},
        # Our AdamW is torch's; ZeRO only vets DeepSpeed's own optimizers.
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,  # we log ourselves
        "seed": train.seed,
    }
