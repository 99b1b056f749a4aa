"""Time-MoE: a decoder-only transformer over point tokens with multi-resolution output heads.

Legend: B batch, L tokens per row, S keys (cached + new), D hidden, E experts, K top-k,
T = B*L tokens, h a head's horizon, NL layers.

    x_BL --embed: silu(gate(x)) * emb(x)--> h_BLD
         --NL x [h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h))]--> RMSNorm --> heads (one Linear
         D -> sum(h), split per horizon) --> predictions {h: [B, L, h]}

The FFN is ``model.moe.MoeFeedForward`` (sparse) or one SwiGLU (``use_dense``). The loss is in
``model.loss``, the checkpoint adapter in ``model.checkpoint``, attention in ``model.attention``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import checkpoint as ckpt
from model.attention import (
    Attention,
    KVCache,
    flex_block_mask,
    resolve_backend,
    rope_cos_sin,
    rope_table,
    segment_positions,
)
from model.config import TimeMoeConfig
from model.forecast import horizon_schedule, prepare_contexts
from model.loss import head_loss, router_aux_loss
from model.moe import MoeFeedForward, SwiGLU


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the variance in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class PointEmbedding(nn.Module):
    """One token per time point: ``silu(gate_layer(x)) * emb_layer(x)``, no biases."""

    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        self.emb_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)
        self.gate_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)

    def forward(self, x_BL: torch.Tensor) -> torch.Tensor:
        x_BL1 = x_BL[..., None]
        return F.silu(self.gate_layer(x_BL1)) * self.emb_layer(x_BL1)


class DecoderLayer(nn.Module):
    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_layer = SwiGLU(config.hidden_size, config.intermediate_size) if config.use_dense else MoeFeedForward(config)

    def forward(self, h_BLD, rope_BLd, q_seg_BL, k_seg_BS, kv_cache=None, backend=None, block_mask=None,
                last_only=False):
        """Returns ``(h_BLD, router_logits_TE | None, topk_idx_TK | None, (k, v))``; ``kv_cache`` is
        this layer's ``attention.LayerCache`` when decoding, None otherwise. ``last_only``: the
        keys/values of every position, the hidden state of the last one only (``[B, 1, D]``)."""
        a, new_kv = self.self_attn(self.input_layernorm(h_BLD), rope_BLd, q_seg_BL, k_seg_BS, kv_cache,
                                   backend, block_mask, last_only)
        h_BLD = (h_BLD[:, -1:] if last_only else h_BLD) + a
        if isinstance(self.ffn_layer, MoeFeedForward):
            f, logits_TE, idx_TK = self.ffn_layer(self.post_attention_layernorm(h_BLD))
        else:
            f, logits_TE, idx_TK = self.ffn_layer(self.post_attention_layernorm(h_BLD)), None, None
        return h_BLD + f, logits_TE, idx_TK, new_kv


class TimeMoeDecoder(nn.Module):
    """Embedding, the decoder layers and the final norm (checkpoint prefix ``model.``)."""

    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        self.embed_layer = PointEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_backend = config.attn_implementation

    def forward(self, x_BL, position_ids_BL=None, q_seg_BL=None, k_seg_BS=None, kv_cache: KVCache | None = None,
                backend: str | None = None, rope_BLd: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns ``(h_BLD, router logits per layer, expert ids per layer)``. ``rope_BLd`` (cos, sin
        of the query positions) replaces ``position_ids_BL`` when the caller has them already.

        With a ``kv_cache`` the L tokens extend it: at ``length == 0`` (the prefill) every layer runs
        cache-free, exactly the training forward, and its keys/values are copied into the cache
        afterwards, so the prefill is one pure graph per layer for ``torch.compile``; later calls
        (decode steps) write into the cache inside attention. ``length`` then grows by L.

        With a cache (the prefill and every decode step) the last layer runs its attention output
        and FFN for the last position only (its keys and values still for every position, into
        the cache): generation reads only that hidden state, and everything else the last layer
        computes would be thrown away. Such a call then returns ``[B, 1, D]``."""
        h = self.embed_layer(x_BL)
        prefill = kv_cache is not None and kv_cache.length == 0
        block_mask = None
        if q_seg_BL is not None and resolve_backend(backend or self.attn_backend, x_BL.device, True) == "flex":
            block_mask = flex_block_mask(q_seg_BL, k_seg_BS)  # once for all layers
        if rope_BLd is None and len(self.layers):
            attn = self.layers[0].self_attn
            rope_BLd = rope_cos_sin(position_ids_BL, attn.head_dim, attn.rope_theta, h.dtype)
        logits, idxs = [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_kv = kv_cache.layer(i) if kv_cache is not None and not prefill else None
            h, lg, ix, kv = layer(h, rope_BLd, q_seg_BL, k_seg_BS, layer_kv, backend, block_mask,
                                  kv_cache is not None and i == last)
            if prefill:
                kv_cache.fill(i, *kv)
            logits.append(lg)
            idxs.append(ix)
        if kv_cache is not None:
            kv_cache.length += x_BL.shape[1]
        return self.norm(h), logits, idxs


@dataclass
class TimeMoeOutput:
    loss: torch.Tensor | None  # mean head loss + router_aux_loss_factor * aux_loss
    head_losses: dict[int, torch.Tensor]
    aux_loss: torch.Tensor | None  # None for dense models
    predictions: dict[int, torch.Tensor]  # horizon -> [B, L, h]
    router_logits: tuple[torch.Tensor, ...] = ()  # per layer [B*L, E]
    expert_counts: torch.Tensor | None = None  # [NL, E] non-padding tokens routed to each expert
    hidden_states: torch.Tensor | None = field(default=None, repr=False)  # [B, L, D] after final norm


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.is_cuda:
        # no host sync on the training hot path: the assertion fails asynchronously (the CUDA
        # error names this message); data from the data plane is finite by construction
        torch._assert_async(torch.isfinite(x).all(), f"{what} holds NaN/inf values")
        return
    bad = ~torch.isfinite(x)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} holds {int(bad.sum())} NaN/inf value(s) (first at index {where}); "
                         "clean or mask them before calling the model")


class TimeMoeModel(nn.Module):
    """The full model: ``self.model`` (decoder) and ``self.heads`` (all output heads fused)."""

    def __init__(self, config: TimeMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TimeMoeDecoder(config)
        self.heads = nn.Linear(config.hidden_size, config.input_size * sum(config.horizon_lengths), bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
        elif hasattr(m, "gate_proj") and isinstance(getattr(m, "gate_proj"), nn.Parameter):  # GroupedExperts
            for p in m.parameters(recurse=False):
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ heads
    def _head_slices(self) -> dict[int, slice]:
        out, start = {}, 0
        for h in self.config.horizon_lengths:
            out[h] = slice(start, start + h)
            start += h
        return out

    def head(self, h_BLD: torch.Tensor, horizon: int) -> torch.Tensor:
        """One head's prediction ``[..., h]`` (uses only that head's rows of the fused weight)."""
        return F.linear(h_BLD, self.heads.weight[self._head_slices()[horizon]])

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        inputs: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        attn_implementation: str | None = None,
    ) -> TimeMoeOutput:
        """``inputs [B, L]`` (or ``[B, L, 1]``); ``segment_ids [B, L]`` (0 = padding) packs several
        series per row; ``labels``/``loss_mask`` as ``preprocessing.schema.split_windows`` makes them."""
        x_BL = inputs[..., 0] if inputs.dim() == 3 else inputs
        if x_BL.dim() != 2:
            raise ValueError(f"inputs must be [B, L] or [B, L, 1], got shape {tuple(inputs.shape)}")
        _check_finite(x_BL, "inputs")
        x_BL = x_BL.to(self.heads.weight.dtype)
        B, L = x_BL.shape
        if segment_ids is not None:
            seg_BL = segment_ids.to(x_BL.device).long()
            pos_BL = segment_positions(seg_BL)
        else:
            seg_BL = None
            pos_BL = torch.arange(L, device=x_BL.device).expand(B, L)
        h_BLD, logits, idxs = self.model(x_BL, pos_BL, seg_BL, seg_BL, backend=attn_implementation)
        preds_BLH = self.heads(h_BLD)
        predictions = {h: preds_BLH[..., s] for h, s in self._head_slices().items()}

        cfg = self.config
        keep_T = None if seg_BL is None else (seg_BL > 0).reshape(-1)
        aux, counts = None, None
        if not cfg.use_dense:
            aux = router_aux_loss(list(logits), cfg.num_experts_per_tok, keep_T, cfg.router_aux_loss_scope)
            counts = torch.stack([self._expert_counts(ix, keep_T) for ix in idxs])

        loss, head_losses = None, {}
        if labels is not None:
            labels_BL = (labels[..., 0] if labels.dim() == 3 else labels).to(x_BL.device)
            valid_BL = torch.ones_like(labels_BL, dtype=torch.bool) if loss_mask is None else loss_mask.to(x_BL.device).bool()
            seg_loss_BL = torch.ones_like(labels_BL, dtype=torch.long) if seg_BL is None else seg_BL
            head_losses = {h: head_loss(p, labels_BL, valid_BL, seg_loss_BL) for h, p in predictions.items()}
            loss = torch.stack(list(head_losses.values())).mean()
            if aux is not None and cfg.apply_aux_loss:
                loss = loss + cfg.router_aux_loss_factor * aux
        return TimeMoeOutput(loss, head_losses, aux, predictions, tuple(l for l in logits if l is not None), counts, h_BLD)

    def _expert_counts(self, idx_TK: torch.Tensor, keep_T: torch.Tensor | None) -> torch.Tensor:
        E, K = self.config.num_experts, idx_TK.shape[1]
        w = torch.ones(idx_TK.numel(), dtype=torch.long, device=idx_TK.device) if keep_T is None \
            else keep_T.long().repeat_interleave(K)
        return torch.zeros(E, dtype=torch.long, device=idx_TK.device).index_add(0, idx_TK.reshape(-1), w)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, context: torch.Tensor, horizon: int, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True, attn_implementation: str | None = None) -> torch.Tensor:
        """Raw autoregressive forecast ``[B, horizon]`` of the given (already scaled) values.

        Greedy multi-resolution schedule (``model.forecast.horizon_schedule``): each step runs
        the largest head that fits and appends all its values. Left padding: ``attention_mask``
        ``[B, T]`` (1 = real); positions count from each row's first real point.

        With the cache (default): one prefill over the context, then per step only the new
        values go through the model, against a ``KVCache`` sized for the whole generation.
        ``use_cache=False`` re-runs the full sequence every step: the slow reference."""
        x_BT = context[..., 0] if context.dim() == 3 else context
        dev, dtype = self.heads.weight.device, self.heads.weight.dtype
        x_BT = x_BT.to(dev, dtype)
        B, T = x_BT.shape
        if attention_mask is not None:
            mask_BT = attention_mask.to(dev).bool()
            if mask_BT.shape != x_BT.shape:
                raise ValueError(f"attention_mask shape {tuple(mask_BT.shape)} != context shape {(B, T)}")
            x_BT = torch.where(mask_BT, x_BT, torch.zeros_like(x_BT))
        else:
            mask_BT = None
        _check_finite(x_BT, "context")
        steps = horizon_schedule(horizon, self.config.horizon_lengths)
        if not use_cache:
            return self._generate_uncached(x_BT, mask_BT, steps, attn_implementation)[:, :horizon]

        attn = self.model.layers[0].self_attn
        S_max = T + sum(steps[:-1])  # the last step's values are never fed back
        cache = KVCache(len(self.model.layers), B, attn.n_kv, S_max, attn.head_dim, dtype, dev)
        cos_Pd, sin_Pd = rope_table(S_max, attn.head_dim, attn.rope_theta, dtype, dev)
        backend = attn_implementation
        if mask_BT is not None:
            seg_BS = torch.ones(B, S_max, dtype=torch.long, device=dev)  # 1 = real, 0 = left padding
            seg_BS[:, :T] = mask_BT.long()
            pos_BS = (seg_BS.cumsum(1) - 1).clamp_min(0)
            # a step's few queries against a growing key length: a dense [B, L, S] mask is small,
            # and FlexAttention would compile a new kernel for every key length
            if resolve_backend(backend or self.config.attn_implementation, dev, True) == "flex":
                backend = "sdpa"
        new_x, outs = x_BT, []
        for h in steps:
            a, b = cache.length, cache.length + new_x.shape[1]
            if mask_BT is None:  # one series per row: positions a..b-1 for every row
                rope, q_seg, k_seg = (cos_Pd[a:b][None], sin_Pd[a:b][None]), None, None
            else:
                pos_BL = pos_BS[:, a:b]
                rope, q_seg, k_seg = (cos_Pd[pos_BL], sin_Pd[pos_BL]), seg_BS[:, a:b], seg_BS[:, :b]
            step_backend = attn_implementation if a == 0 else backend
            hid, _, _ = self.model(new_x, None, q_seg, k_seg, cache, step_backend, rope)
            new_x = self.head(hid[:, -1], h)
            outs.append(new_x)
        return torch.cat(outs, dim=1)[:, :horizon]

    def _generate_uncached(self, x_BT, mask_BT, steps: list[int], attn_implementation) -> torch.Tensor:
        """The reference: the full sequence through the model at every step, no cache."""
        B = x_BT.shape[0]
        full_x, full_m, outs = x_BT, mask_BT, []
        for h in steps:
            if full_m is not None:
                seg_BS = full_m.long()
                pos_BS = (seg_BS.cumsum(1) - 1).clamp_min(0)
            else:
                seg_BS, pos_BS = None, torch.arange(full_x.shape[1], device=x_BT.device).expand(B, -1)
            hid, _, _ = self.model(full_x, pos_BS, seg_BS, seg_BS, None, attn_implementation)
            step_Bh = self.head(hid[:, -1], h)
            outs.append(step_Bh)
            full_x = torch.cat([full_x, step_Bh], dim=1)
            if full_m is not None:
                full_m = torch.cat([full_m, torch.ones_like(step_Bh, dtype=torch.bool)], dim=1)
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def forecast(self, series, horizon: int, context_length: int | None = None, batch_size: int = 64,
                 fixed_batch: bool = False) -> np.ndarray:
        """User-facing forecast: ``series`` is a list of 1-D arrays (unequal lengths, NaNs
        allowed; policy in ``model.forecast``) or a ``[B, T]`` array. Each context is z-scored
        (mean/std over its points), forecast with ``generate`` and mapped back. Returns numpy
        ``[B, horizon]`` (float64).

        ``fixed_batch``: a short last batch is padded to ``batch_size`` rows (copies of its last
        row, dropped from the result), so every ``generate`` call has the same shape and a model
        compiled for static shapes compiles once."""
        if isinstance(series, torch.Tensor):
            series = series.detach().cpu().numpy()
        if isinstance(series, np.ndarray):
            if series.ndim == 1:
                series = series[None]
            if series.ndim != 2:
                raise ValueError(f"forecast: array input must be [B, T], got shape {series.shape}")
        if len(series) == 0:
            return np.zeros((0, horizon))
        out = []
        for start in range(0, len(series), batch_size):
            pb = prepare_contexts(series[start : start + batch_size], context_length)
            n = len(pb.mean_B)
            values_BT, mask_BT = pb.values_BT, pb.mask_BT
            if fixed_batch and n < batch_size:
                pad = np.full(batch_size - n, n - 1)
                values_BT = np.concatenate([values_BT, values_BT[pad]])
                mask_BT = np.concatenate([mask_BT, mask_BT[pad]])
            extra = int(pb.missing_tail_B.max())
            mask = None if mask_BT.all() else torch.from_numpy(mask_BT)
            pred = self.generate(torch.from_numpy(values_BT), horizon + extra, attention_mask=mask)
            pred = pred[:n].cpu().double().numpy()
            # the values after each row's missing tail (trailing NaNs are part of the future)
            rows = np.take_along_axis(pred, pb.missing_tail_B[:, None] + np.arange(horizon), axis=1)
            out.append(rows * pb.scale_B[:, None] + pb.mean_B[:, None])
        return np.concatenate(out)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` in the published layout and key names."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.save_json(d / "config.json")
        state = ckpt.to_published({k: v.cpu() for k, v in self.state_dict().items()}, self.config)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "TimeMoeModel":
        """Load a published-layout directory. ``dtype`` None -> float32 (checkpoints may be bf16)."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d}: missing {name} (expected config.json + model.safetensors)")
        config = TimeMoeConfig.from_json(d / "config.json")
        try:
            published = load_file(str(d / "model.safetensors"))
        except Exception as err:  # safetensors' own error names neither the file nor the cause clearly
            raise ValueError(f"{d / 'model.safetensors'}: not a readable safetensors file ({err})") from None
        state = ckpt.from_published(published, config, source=str(d / "model.safetensors"))
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype or torch.float32)
