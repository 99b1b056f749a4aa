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


def released_attention() -> str:
    """The attention the released code runs here: FlashAttention-2 when ``flash_attn`` imports
    (its training recipe), else its eager implementation (it has no SDPA path)."""
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        return "eager"


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
                    router_aux_loss_factor=c.router_aux_loss_factor, attn_implementation=attention)
    model = cls(rc)
    state = ckpt.to_published({k: v.detach().float().cpu() for k, v in ours.state_dict().items()}, c)
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    return model.train() if train else model.eval()

