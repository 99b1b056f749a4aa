"""The checkpoint adapter: internal state dict <-> the published Time-MoE layout (spec section 1).

Internal layout differs in three places, converted here and nowhere else:
- ``self_attn.qkv_proj`` (fused) <-> ``self_attn.{q,k,v}_proj``;
- ``ffn_layer.router`` <-> ``ffn_layer.gate``; stacked ``ffn_layer.experts.{w} [E, ...]`` <->
  ``ffn_layer.experts.{e}.{w}.weight``;
- ``heads.weight [sum(h), D]`` (one fused projection) <-> ``lm_heads.{p}.out_layer.weight``.
Strict both ways: every key consumed, every shape checked, one error lists what is wrong.
"""
from __future__ import annotations

import torch

from model.config import TimeMoeConfig

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint's keys/shapes differ from the published layout."""


def published_shapes(config: TimeMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every published key and its shape, for this config."""
    D, H, KV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    F, Fe, E = config.intermediate_size, config.expert_intermediate_size, config.num_experts
    s: dict[str, tuple[int, ...]] = {
        "model.embed_layer.emb_layer.weight": (D, config.input_size),
        "model.embed_layer.gate_layer.weight": (D, config.input_size),
    }
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        s[p + "input_layernorm.weight"] = (D,)
        for name, n in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
            s[p + f"self_attn.{name}.weight"] = (n * hd, D)
            s[p + f"self_attn.{name}.bias"] = (n * hd,)
        s[p + "self_attn.o_proj.weight"] = (D, H * hd)
        s[p + "post_attention_layernorm.weight"] = (D,)
        f = p + "ffn_layer."
        if config.use_dense:
            s[f + "gate_proj.weight"], s[f + "up_proj.weight"], s[f + "down_proj.weight"] = (F, D), (F, D), (D, F)
            continue
        s[f + "gate.weight"] = (E, D)
        for e in range(E):
            s[f + f"experts.{e}.gate_proj.weight"] = (Fe, D)
            s[f + f"experts.{e}.up_proj.weight"] = (Fe, D)
            s[f + f"experts.{e}.down_proj.weight"] = (D, Fe)
        s[f + "shared_expert.gate_proj.weight"] = (F, D)
        s[f + "shared_expert.up_proj.weight"] = (F, D)
        s[f + "shared_expert.down_proj.weight"] = (D, F)
        s[f + "shared_expert_gate.weight"] = (1, D)
    s["model.norm.weight"] = (D,)
    for p, h in enumerate(config.horizon_lengths):
        s[f"lm_heads.{p}.out_layer.weight"] = (config.input_size * h, D)
    return s


def check_published(state: dict[str, torch.Tensor], config: TimeMoeConfig, source: str = "checkpoint") -> None:
    """Raise ONE error listing missing, unexpected and mis-shaped keys."""
    want = published_shapes(config)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    misshaped = sorted(f"{k}: got {tuple(state[k].shape)}, expected {want[k]}"
                       for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or misshaped:
        parts = [f"{source} does not match the Time-MoE layout for this config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(parts))


def to_published(internal: dict[str, torch.Tensor], config: TimeMoeConfig) -> dict[str, torch.Tensor]:
    """Internal state dict -> published keys (contiguous tensors, ready for safetensors)."""
    out: dict[str, torch.Tensor] = {}
    hd = config.head_dim
    sizes = [config.num_attention_heads * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd]
    for k, v in internal.items():
        if ".self_attn.qkv_proj." in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split(sizes, dim=0)):
                out[k.replace("qkv_proj", name)] = part
        elif k.endswith(".ffn_layer.router.weight"):
            out[k.replace(".router.", ".gate.")] = v
        elif ".ffn_layer.experts." in k:
            prefix, w = k.rsplit(".", 1)
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.{w}.weight"] = v[e]
        elif k == "heads.weight":
            for p, part in enumerate(v.split(list(config.horizon_lengths), dim=0)):
                out[f"lm_heads.{p}.out_layer.weight"] = part
        else:
            out[k] = v
    return {k: t.detach().contiguous() for k, t in out.items()}


def from_published(state: dict[str, torch.Tensor], config: TimeMoeConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Published keys -> internal state dict, after the strict check."""
    check_published(state, config, source)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for l in range(config.num_hidden_layers):
        a = f"model.layers.{l}.self_attn."
        for suffix in ("weight", "bias"):
            parts = [a + f"{n}.{suffix}" for n in ("q_proj", "k_proj", "v_proj")]
            out[a + f"qkv_proj.{suffix}"] = torch.cat([state[p] for p in parts], dim=0)
            used.update(parts)
        if config.use_dense:
            continue
        f = f"model.layers.{l}.ffn_layer."
        out[f + "router.weight"] = state[f + "gate.weight"]
        used.add(f + "gate.weight")
        for w in EXPERT_WEIGHTS:
            keys = [f + f"experts.{e}.{w}.weight" for e in range(config.num_experts)]
            out[f + f"experts.{w}"] = torch.stack([state[k] for k in keys])
            used.update(keys)
    heads = [f"lm_heads.{p}.out_layer.weight" for p in range(len(config.horizon_lengths))]
    out["heads.weight"] = torch.cat([state[k] for k in heads], dim=0)
    used.update(heads)
    for k, v in state.items():
        if k not in used:
            out[k] = v
    return out
