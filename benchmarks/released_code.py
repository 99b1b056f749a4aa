"""The released Time-MoE code (github Time-MoE/Time-MoE, Apache-2.0), measured beside ours by the
benchmarks that compare with it (``evaluate_gpu.py``, ``train_step.py``). Its files are never
committed here: ``benchmarks/released_timemoe.sh`` puts them and the wheels they need
(transformers 4.40.1 and its pure-Python needs) under ``.reference/``; they are installed into a
scratch folder at run time. The released model always runs OUR weights (converted by
``model.checkpoint.to_published``), so outputs can be compared as well as speeds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from model import TimeMoeModel
from model import checkpoint as ckpt


def import_released(ref_dir: Path):
    """The released ``TimeMoeForPrediction`` and its config class, with transformers 4.40.1 from
    ``ref_dir/wheels`` installed into a scratch folder first on ``sys.path``."""
    site = Path(os.environ.get("REFSITE", "/tmp/refsite"))
    wheels = sorted(str(p) for p in (ref_dir / "wheels").glob("*.whl"))
    if wheels and not (site / "transformers").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *wheels], check=True)
    sys.path[:0] = [str(site), str(ref_dir)]
    import transformers

    transformers.logging.set_verbosity_error()
    from time_moe.models.configuration_time_moe import TimeMoeConfig as ReleasedConfig
    from time_moe.models.modeling_time_moe import TimeMoeForPrediction

    return TimeMoeForPrediction, ReleasedConfig, transformers.__version__


# The released code's FlashAttention-2 path run on PyTorch's own copy of the FlashAttention-2
# kernels (SDPA's flash backend), where the ``flash_attn`` package is not installed
FLASH_VIA_SDPA = "flash_attention_2/sdpa"


def released_attention() -> str:
    """The attention the released code runs here: FlashAttention-2 (its training recipe) from
    ``flash_attn`` when it imports, else from PyTorch's flash kernel on CUDA
    (:data:`FLASH_VIA_SDPA`), else its eager implementation (it has no SDPA path)."""
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        import torch

        return FLASH_VIA_SDPA if torch.cuda.is_available() else "eager"


def flash_attn_func_via_sdpa(q, k, v, dropout_p: float = 0.0, softmax_scale: float | None = None,
                             causal: bool = False):
    """``flash_attn.flash_attn_func``'s contract (``[B, L, H, D]`` in and out), computed by SDPA
    restricted to its FlashAttention-2 backend: no other kernel may stand in silently."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if causal and q.shape[1] != k.shape[1]:
        # flash-attn aligns the causal mask bottom-right, SDPA's is_causal top-left: equal only
        # for square attention, and a single query (a decode step) sees every key either way
        if q.shape[1] != 1:
            raise NotImplementedError("flash_attn_func_via_sdpa: causal attention with fewer queries than keys")
        causal = False
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def use_flash_via_sdpa(model) -> None:
    """Switch a released model built with eager attention to its own FlashAttention-2 class,
    whose ``flash_attn_func`` is :func:`flash_attn_func_via_sdpa`."""
    module = sys.modules[type(model).__module__]
    module.flash_attn_func = flash_attn_func_via_sdpa
    flash_cls = module.TIME_MOE_ATTENTION_CLASSES["flash_attention_2"]
    for sub in model.modules():
        if type(sub) is module.TIME_MOE_ATTENTION_CLASSES["eager"]:
            sub.__class__ = flash_cls
            sub._flash_attn_uses_top_left_mask = False  # the bottom-right causal mask of flash-attn >= 2.1


def build_released(classes, ours: TimeMoeModel, dtype, device, attention: str = "eager", train: bool = False):
    """The released model at our model's shape, holding our model's weights."""
    cls, config_cls, _ = classes
    c = ours.config
    rc = config_cls(input_size=1, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    horizon_lengths=list(c.horizon_lengths), num_hidden_layers=c.num_hidden_layers,
                    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                    num_experts_per_tok=c.num_experts_per_tok, num_experts=c.num_experts,
                    max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                    rope_theta=c.rope_theta, use_dense=c.use_dense, apply_aux_loss=not c.use_dense,
                    router_aux_loss_factor=c.router_aux_loss_factor,
                    attn_implementation="eager" if attention == FLASH_VIA_SDPA else attention)
    model = cls(rc)
    if attention == FLASH_VIA_SDPA:
        use_flash_via_sdpa(model)
    state = ckpt.to_published({k: v.detach().float().cpu() for k, v in ours.state_dict().items()}, c)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    return model.train() if train else model.eval()

