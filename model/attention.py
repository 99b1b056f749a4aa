"""Causal self-attention with RoPE over packed windows.

Legend: B batch, L query length, S key length (L + cached), D hidden, H query heads,
KV key/value heads, hd head dim, NL layers, P positions.

Packing: ``segment_ids [B, S]`` (0 = padding, 1..k = series). A query attends to key j iff
j is not in its future and both carry the same segment id, so attention never crosses a series.
Padding attends to padding (finite, ignored by the loss) so no row is fully masked.

Backends (``attn_implementation``):
- ``eager``: the math written out (scores, mask, fp32 softmax); the test reference.
- ``sdpa``: ``F.scaled_dot_product_attention``; ``is_causal=True`` when the rows hold one
  series each (no mask tensor at all), else a boolean block-diagonal causal mask ``[B,1,L,S]``.
- ``flex``: FlexAttention with a block mask built from segment ids (no dense L x S mask);
  CUDA only in practice: on CPU it needs torch.compile (~90 s to compile, measured).
- ``auto``: ``flex`` on CUDA for packed training rows, ``sdpa`` otherwise.

Decoding (``KVCache``): the keys and values of every layer live in one buffer allocated at the
generation's final length and written in place; the L new queries of a step are the LAST L of
the S keys, so for one-series rows the mask is "causal, aligned to the bottom right"
(``causal_lower_right``), which SDPA's fused kernels apply without a mask tensor.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from model.config import TimeMoeConfig

# --------------------------------------------------------------------------- RoPE


def rope_cos_sin(position_ids_BL: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, L, hd]`` for integer positions; computed in fp32 then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids_BL.device, dtype=torch.float32) / head_dim)
    freqs_BLh = position_ids_BL.float()[..., None] * inv_freq
    emb = torch.cat([freqs_BLh, freqs_BLh], dim=-1)  # "rotate_half" layout: cat(freqs, freqs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(num_positions: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[P, hd]`` of positions 0..P-1, computed once per generation: a step takes its
    rows by slicing (one-series rows) or gathering (left-padded rows), the same values that
    ``rope_cos_sin`` gives."""
    return rope_cos_sin(torch.arange(num_positions, device=device), head_dim, theta, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLd: torch.Tensor, cos_BLd: torch.Tensor, sin_BLd: torch.Tensor) -> torch.Tensor:
    return x_BHLd * cos_BLd[:, None] + rotate_half(x_BHLd) * sin_BLd[:, None]


def segment_positions(segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its segment: restarts at 0 where the id changes."""
    B, L = segment_ids_BL.shape
    idx_L = torch.arange(L, device=segment_ids_BL.device)
    starts_BL = torch.ones_like(segment_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    start_idx_BL = torch.cummax(torch.where(starts_BL, idx_L, 0), dim=1).values
    return idx_L - start_idx_BL


# --------------------------------------------------------------------------- masks


def block_causal_mask(q_seg_BL: torch.Tensor, k_seg_BS: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, L, S]``: True = may attend. Queries are the LAST L of the S keys."""
    L, S = q_seg_BL.shape[1], k_seg_BS.shape[1]
    q_pos = torch.arange(S - L, S, device=q_seg_BL.device)
    causal_LS = torch.arange(S, device=q_seg_BL.device)[None, :] <= q_pos[:, None]
    return causal_LS[None] & (q_seg_BL[:, :, None] == k_seg_BS[:, None, :])


def eager_attention(q_BHLd, k_BHSd, v_BHSd, mask_BLS: torch.Tensor | None) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(hd) + mask) v with the softmax in fp32."""
    L, S = q_BHLd.shape[2], k_BHSd.shape[2]
    scores = (q_BHLd.float() @ k_BHSd.float().transpose(-2, -1)) / math.sqrt(q_BHLd.shape[-1])
    if mask_BLS is None:
        mask_BLS = torch.ones(L, S, dtype=torch.bool, device=q_BHLd.device).tril(S - L)[None]
    scores = scores.masked_fill(~mask_BLS[:, None], float("-inf"))
    return (scores.softmax(dim=-1) @ v_BHSd.float()).to(q_BHLd.dtype)


def flex_block_mask(q_seg_BL: torch.Tensor, k_seg_BS: torch.Tensor):
    """FlexAttention block mask (same rule as ``block_causal_mask``); built once per forward
    and shared by all layers, since building it costs about as much as a layer's attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = q_seg_BL.shape
    S = k_seg_BS.shape[1]
    off = S - L

    def mask_mod(b, h, qi, kj):
        return (kj <= qi + off) & (q_seg_BL[b, qi] == k_seg_BS[b, kj])

    return create_block_mask(mask_mod, B, None, L, S, device=q_seg_BL.device)


# FlexAttention tile settings by head dim (Triton kernel options: ``fwd_*`` for the forward kernel,
# ``bwd_*`` for the backward one), chosen by benchmarks/flex_tiles.py at the training step's
# shapes and equal to the defaults' outputs within bf16 rounding (docs/benchmarks.md,
# "FlexAttention's tiles"). Every block size divides the block mask's 128. Not applied unless an
# ``Attention``'s ``flex_kernel_options`` is set: whether they speed up the whole step is
# measured by ``benchmarks/train_step.py --variants compiled compiled_tiles``.
TUNED_FLEX_TILES: dict[int, dict[str, int]] = {
    32: {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
         "bwd_num_warps": 4, "bwd_num_stages": 3},
    64: {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
         "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
         "bwd_num_warps": 4, "bwd_num_stages": 3},
}

_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def resolve_backend(name: str, device: torch.device, packed: bool) -> str:
    """Which kernel ``auto`` means on this device (docs/model.md records the table)."""
    if name != "auto":
        return name
    return "flex" if (device.type == "cuda" and packed) else "sdpa"


# --------------------------------------------------------------------------- KV cache


class LayerCache(NamedTuple):
    """One layer's slice of a :class:`KVCache`: buffers ``[B, KV, S_max, hd]``, ``start`` filled."""

    k_BKSd: torch.Tensor
    v_BKSd: torch.Tensor
    start: int


class KVCache:
    """Keys and values of every layer for one generation: ``k``/``v [NL, B, KV, S_max, hd]``,
    allocated once at the final length and written in place; ``length`` positions are filled.
    (Growing per-layer tensors with ``torch.cat`` copies the whole cache at every step.)"""

    def __init__(self, num_layers: int, batch: int, n_kv: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device) -> None:
        self.k = torch.empty(num_layers, batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.length)

    def fill(self, i: int, k_BKLd: torch.Tensor, v_BKLd: torch.Tensor) -> None:
        """Layer ``i``'s keys/values of a cache-free forward over the first L positions."""
        L = k_BKLd.shape[2]
        self.k[i, :, :, :L] = k_BKLd
        self.v[i, :, :, :L] = v_BKLd


# --------------------------------------------------------------------------- module


class Attention(nn.Module):
    """Multi-head attention (GQA allowed): biases on q, k, v, none on o; fused qkv projection
    (split into q_proj/k_proj/v_proj by the checkpoint adapter)."""

    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.backend = config.attn_implementation
        D = config.hidden_size
        self.qkv_proj = nn.Linear(D, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)
        # FlexAttention kernel options on CUDA (e.g. ``TUNED_FLEX_TILES[head_dim]``); None keeps
        # the kernel's defaults. Set from outside, like the MoE's dispatcher.
        self.flex_kernel_options: dict[str, int] | None = None

    def forward(
        self,
        x_BLD: torch.Tensor,
        rope_BLd: tuple[torch.Tensor, torch.Tensor],
        q_seg_BL: torch.Tensor | None,
        k_seg_BS: torch.Tensor | None,
        kv_cache: LayerCache | None = None,
        backend: str | None = None,
        block_mask=None,
        last_query_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``rope_BLd`` is ``rope_cos_sin`` of the query positions. ``q_seg``/``k_seg`` None means
        every row is one series (plain causal). With a cache the new keys/values are written at
        positions ``start .. start+L-1`` and ``k_seg_BS`` covers all ``start + L`` keys. Returns
        the output and this forward's keys/values (all S of them with a cache).

        ``last_query_only``: keys and values of all L positions (written to the cache when there
        is one), the output of the last one only, ``[B, 1, D]``."""
        B, L, _ = x_BLD.shape
        hd, nq = self.head_dim, self.n_heads * self.head_dim
        cos, sin = rope_BLd  # computed once per forward by the decoder, shared by all layers
        if last_query_only:  # keys/values for every position, the query of the last one only
            W, b = self.qkv_proj.weight, self.qkv_proj.bias
            q = F.linear(x_BLD[:, -1:], W[:nq], b[:nq])
            k, v = F.linear(x_BLD, W[nq:], b[nq:]).split([self.n_kv * hd, self.n_kv * hd], dim=-1)
            Lq = 1
        else:
            q, k, v = self.qkv_proj(x_BLD).split([nq, self.n_kv * hd, self.n_kv * hd], dim=-1)
            Lq = L
        q_BHLd = apply_rope(q.view(B, Lq, self.n_heads, hd).transpose(1, 2), cos[:, L - Lq:], sin[:, L - Lq:])
        k_BKLd = apply_rope(k.view(B, L, self.n_kv, hd).transpose(1, 2), cos, sin)
        v_BKLd = v.view(B, L, self.n_kv, hd).transpose(1, 2)
        if last_query_only:  # the last query is the last key: attend() masks it against all L
            L, block_mask = 1, None
            q_seg_BL = None if q_seg_BL is None else q_seg_BL[:, -1:]
        if kv_cache is not None:
            out, new_kv = self.attend_cached(q_BHLd, k_BKLd, v_BKLd, kv_cache, q_seg_BL, k_seg_BS, backend)
        else:
            out, new_kv = self.attend(q_BHLd, k_BKLd, v_BKLd, q_seg_BL, k_seg_BS, backend, block_mask), (k_BKLd, v_BKLd)
        out_BLD = out.transpose(1, 2).reshape(B, L, self.n_heads * hd)
        return self.o_proj(out_BLD), new_kv

    def attend_cached(self, q_BHLd, k_BKLd, v_BKLd, kv_cache: LayerCache, q_seg_BL, k_seg_BS, backend):
        """Write the L new keys/values at ``start .. start+L-1`` of the cache, attend to all
        ``start + L`` (with the L queries, or the last one alone: ``last_query_only``). Returns
        the output and the cache's filled keys/values (views)."""
        end = kv_cache.start + k_BKLd.shape[2]
        kv_cache.k_BKSd[:, :, kv_cache.start : end] = k_BKLd
        kv_cache.v_BKSd[:, :, kv_cache.start : end] = v_BKLd
        k_BKSd, v_BKSd = kv_cache.k_BKSd[:, :, :end], kv_cache.v_BKSd[:, :, :end]
        return self.attend(q_BHLd, k_BKSd, v_BKSd, q_seg_BL, k_seg_BS, backend, None), (k_BKSd, v_BKSd)

    def attend(self, q_BHLd, k_BKSd, v_BKSd, q_seg_BL, k_seg_BS, backend, block_mask) -> torch.Tensor:
        """``softmax(q k^T / sqrt(hd)) v`` under the module's mask rule; the L queries are the
        last L of the S keys. Returns ``[B, H, L, hd]``."""
        L, S = q_BHLd.shape[2], k_BKSd.shape[2]
        packed = q_seg_BL is not None
        which = resolve_backend(backend or self.backend, q_BHLd.device, packed)
        if which == "flex" and packed and L == 1:
            which = "sdpa"  # one query row: its dense [B, 1, S] mask is tiny, no block mask to build
        if which == "flex" and packed:
            if block_mask is None:
                block_mask = flex_block_mask(q_seg_BL, k_seg_BS)
            options = self.flex_kernel_options if q_BHLd.device.type == "cuda" else None
            return _compiled_flex()(q_BHLd, k_BKSd, v_BKSd, block_mask=block_mask, enable_gqa=self.n_kv != self.n_heads,
                                    kernel_options=options)
        rep = self.n_heads // self.n_kv
        k_BHSd = k_BKSd.repeat_interleave(rep, dim=1) if rep > 1 else k_BKSd
        v_BHSd = v_BKSd.repeat_interleave(rep, dim=1) if rep > 1 else v_BKSd
        mask = block_causal_mask(q_seg_BL, k_seg_BS) if packed else None
        if which == "eager":
            return eager_attention(q_BHLd, k_BHSd, v_BHSd, mask)
        if mask is None and L == S:
            return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, is_causal=True)
        if mask is None:  # cached decoding of one-series rows: the queries are the last L keys
            return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=causal_lower_right(L, S))
        return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask[:, None])
