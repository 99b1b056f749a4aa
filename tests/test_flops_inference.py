"""``model.flops.generate_flops_per_window`` against an independent count: torch's FlopCounterMode
around a real ``generate`` of a tiny model on the CPU.

The two counts differ in known, exact ways, which the test adds back before comparing:
- the flop counter counts the full ``m x (c + m)`` rectangle of every forward's attention matmuls
  (it sees ``q @ k^T`` and ``p @ v`` of the eager backend, masked or not); our formula counts the
  causal part, ``m*c + m*(m+1)/2`` (every forward's last layer has one query, the same for both);
- the counter counts matmuls only, so the norm weights and the q/k/v biases, which our "2 FLOPs
  per active parameter" includes, are missing from it (in every forward the last layer's norms,
  its query bias and the final norm are visited by the last position only).
With those two terms the counts agree exactly (relative 1e-12).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import TimeMoeConfig, TimeMoeModel, horizon_schedule, moe
from model.flops import count_parameters, generate_flops_per_window


def counter_view(cfg: TimeMoeConfig, context: int, horizon: int) -> float:
    """What FlopCounterMode should see for one window, derived from our formula."""
    D, NL = cfg.hidden_size, cfg.num_hidden_layers
    steps = horizon_schedule(horizon, cfg.horizon_lengths)
    fed = [context] + steps[:-1]
    norms = (2 * NL + 1) * D
    biases = NL * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    last_layer_one_position = (3 * D + cfg.num_attention_heads * cfg.head_dim) * sum(m - 1 for m in fed)
    # m(c+m) - (mc + m(m+1)/2) per layer and forward, except every forward's last layer (one query)
    full_minus_causal = (NL - 1) * sum(m * (m - 1) / 2 for m in fed)
    return (generate_flops_per_window(cfg, context, horizon)
            - 2 * ((norms + biases) * sum(fed) - last_layer_one_position) + 4 * D * full_minus_causal)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("context,horizon", [(40, 1), (40, 45), (64, 96), (33, 200)])
def test_generate_flops_match_flop_counter(monkeypatch, dense, context, horizon):
    # the per-expert loop runs plain matmuls, which the counter knows (it has no grouped_mm rule)
    monkeypatch.setattr(moe, "_use_grouped_mm", lambda x: False)
    cfg = TimeMoeConfig.preset("tiny", attn_implementation="eager", use_dense=dense)
    torch.manual_seed(0)
    model = TimeMoeModel(cfg).eval()
    B = 3
    x = torch.randn(B, context).cumsum(1)
    with FlopCounterMode(display=False) as counter:
        model.generate(x, horizon)
    assert counter.get_total_flops() == pytest.approx(B * counter_view(cfg, context, horizon), rel=1e-12)


def test_paper_pair_closed_form():
    """50M at 512/96 (steps 64, 32): prefill + one decode of 64 tokens + two heads, by hand (the
    last layer of both forwards for the last position only, past its keys and values)."""
    cfg = TimeMoeConfig.preset("timemoe-50m")
    D, NL = 384, 12
    n_body = count_parameters(cfg).active - D * (1 + 8 + 32 + 64)
    kv = 2 * 384 * (384 + 1)  # the last layer's key/value projections (weights and biases)
    last_layer_active = (n_body - 2 * D - D) // NL  # every layer alike; minus embedding (2D) and final norm
    prefill = (2 * n_body * 512 + 4 * NL * D * (512 * 513 / 2)
               - 2 * (last_layer_active - kv + D) * 511 - 4 * D * (512 * 513 / 2 - 512))
    decode = (2 * n_body * 64 + 4 * NL * D * (64 * 512 + 64 * 65 / 2)
              - 2 * (last_layer_active - kv + D) * 63 - 4 * D * (64 * 512 + 64 * 65 / 2 - (512 + 64)))
    heads = 2 * D * (64 + 32)
    assert generate_flops_per_window(cfg, 512, 96) == pytest.approx(prefill + decode + heads, rel=1e-12)
    # more context or horizon never costs less
    assert generate_flops_per_window(cfg, 3072, 720) > generate_flops_per_window(cfg, 2048, 336) > prefill
