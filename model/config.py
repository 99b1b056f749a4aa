"""TimeMoeConfig: the model's hyper-parameters under the published ``config.json`` names.

Presets are named values in code (``TimeMoeConfig.preset("timemoe-50m")``). The dense twins
(``dense-*``) keep layers/width/heads and replace every MoE FFN by ONE SwiGLU whose width makes
the ACTIVE parameter count equal to the sparse model's:

    sparse FFN, active per layer = k * 3*D*(F/k)  (routed experts)  + 3*D*F  (shared expert)
                                   + E*D  (router)  + D  (shared-expert gate)  = 6DF + (E+1)D
    dense  FFN per layer         = 3*D*F_d
    => F_d = 2F + (E+1)/3, which is the integer 2F + 3 for E = 8: active counts match exactly.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_TYPE = "time_moe"
ARCHITECTURES = ["TimeMoeForPrediction"]
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex")
# Fields that act only while training (initial weights, dropout, the router's aux loss): two
# configs that differ only here compute the same forecasts at the same cost from the same weights.
TRAINING_ONLY_FIELDS = ("initializer_range", "attention_dropout", "apply_aux_loss", "router_aux_loss_factor",
                        "router_aux_loss_scope")


@dataclass
class TimeMoeConfig:
    input_size: int = 1
    hidden_size: int = 384
    intermediate_size: int = 1536
    horizon_lengths: tuple[int, ...] = (1, 8, 32, 64)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    hidden_act: str = "silu"
    num_experts_per_tok: int = 2
    num_experts: int = 8
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    use_dense: bool = False
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    apply_aux_loss: bool = True
    router_aux_loss_factor: float = 0.02
    # Not a published field: which attention kernel runs (see model/attention.py, docs/model.md).
    attn_implementation: str = "auto"
    # Not a published field: "pooled" (the spec) or "per_layer" aux loss (model/loss.py, router_aux_loss).
    router_aux_loss_scope: str = "pooled"

    def __post_init__(self) -> None:
        self.horizon_lengths = tuple(int(h) for h in self.horizon_lengths)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        errors = []
        if self.input_size != 1:
            errors.append(f"input_size={self.input_size}: only univariate point tokens (1) are supported")
        if self.hidden_size % self.num_attention_heads:
            errors.append(f"hidden_size={self.hidden_size} not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            errors.append(f"num_attention_heads={self.num_attention_heads} not a multiple of num_key_value_heads={self.num_key_value_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            errors.append("head_dim must be even for RoPE")
        if not self.horizon_lengths or min(self.horizon_lengths) < 1:
            errors.append(f"horizon_lengths={self.horizon_lengths} must be positive")
        if not self.use_dense and not (1 <= self.num_experts_per_tok <= self.num_experts):
            errors.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            errors.append(f"attn_implementation={self.attn_implementation!r} not in {ATTN_IMPLEMENTATIONS}")
        if self.router_aux_loss_scope not in ("pooled", "per_layer"):
            errors.append(f"router_aux_loss_scope={self.router_aux_loss_scope!r} not in ('pooled', 'per_layer')")
        if errors:
            raise ValueError("invalid TimeMoeConfig: " + "; ".join(errors))

    def same_forward(self, other: "TimeMoeConfig") -> bool:
        """True when ``other`` differs from this config only in ``TRAINING_ONLY_FIELDS``."""
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name not in TRAINING_ONLY_FIELDS)

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_intermediate_size(self) -> int:
        """Routed expert width: F // k (the code and checkpoints; the paper's Table 2 is wrong)."""
        return self.intermediate_size // self.num_experts_per_tok

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset_names(cls) -> list[str]:
        return list(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TimeMoeConfig":
        if name not in _PRESETS:
            raise KeyError(f"unknown TimeMoeConfig preset {name!r}; known: {list(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["horizon_lengths"] = list(self.horizon_lengths)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The published ``config.json`` content."""
        d = self.to_dict()
        return {"model_type": MODEL_TYPE, "architectures": list(ARCHITECTURES), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TimeMoeConfig":
        """Accepts published config.json dicts: extra HF keys (torch_dtype, transformers_version,
        auto_map, ...) are ignored; a wrong model_type is an error."""
        mt = d.get("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ValueError(f"{source}: model_type={mt!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "TimeMoeConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_hf_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "TimeMoeConfig":
        import yaml

        p = Path(text_or_path) if not isinstance(text_or_path, str) or "\n" not in text_or_path else None
        if p is not None and p.exists():
            return cls.from_dict(yaml.safe_load(p.read_text()) or {}, source=str(p))
        return cls.from_dict(yaml.safe_load(str(text_or_path)) or {}, source="yaml")


def dense_width(hidden_size: int, intermediate_size: int, num_experts: int) -> int:
    """Dense SwiGLU width with the sparse model's active parameters (module docstring)."""
    return round(2 * intermediate_size + (num_experts + 1) / 3)


_BASE = dict(horizon_lengths=(1, 8, 32, 64), max_position_embeddings=4096, num_experts=8, num_experts_per_tok=2)
_SPARSE = {
    "timemoe-50m": dict(_BASE, num_hidden_layers=12, num_attention_heads=12, hidden_size=384, intermediate_size=1536),
    "timemoe-200m": dict(_BASE, num_hidden_layers=12, num_attention_heads=12, hidden_size=768, intermediate_size=3072),
    "timemoe-ultra": dict(_BASE, num_hidden_layers=36, num_attention_heads=16, hidden_size=1024, intermediate_size=4096),
}
_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: trains hundreds of steps in well under a minute on 2 cores.
    "tiny": dict(horizon_lengths=(1, 8, 32, 64), max_position_embeddings=4096, num_hidden_layers=2,
                 num_attention_heads=4, hidden_size=64, intermediate_size=128, num_experts=4, num_experts_per_tok=2),
    **_SPARSE,
}
for _name, _cfg in _SPARSE.items():
    _PRESETS["dense-" + _name.split("-", 1)[1]] = dict(
        _cfg, use_dense=True,
        intermediate_size=dense_width(_cfg["hidden_size"], _cfg["intermediate_size"], _cfg["num_experts"]))
