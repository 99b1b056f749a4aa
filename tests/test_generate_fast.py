"""The fast ``generate`` (preallocated KV cache, lower-right causal decode attention, RoPE table
once per call) equals the slow reference ``generate(use_cache=False)``; ``compile_for_inference``
(compiled prefill, eager or dynamic-shape decode) equals eager; ``forecast``'s vectorised
preparation and ``fixed_batch`` padding change nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import TimeMoeConfig, TimeMoeModel, horizon_schedule
from model.attention import rope_cos_sin, rope_table
from model.forecast import prepare_contexts
from pipeline.parallel.parallelize import compile_for_inference

HORIZONS = (1, 45, 96, 200)  # one step; 32,8,1x5; 64,32; 64x3,8
assert horizon_schedule(200, (1, 8, 32, 64)) == [64, 64, 64, 8]


def tiny(backend: str = "sdpa", dtype=torch.float32, seed: int = 0) -> TimeMoeModel:
    torch.manual_seed(seed)
    return TimeMoeModel(TimeMoeConfig.preset("tiny", attn_implementation=backend)).eval().to(dtype)


def random_walks(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, generator=g).cumsum(1)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def left_padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros_like(x, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, x.shape[1] - n:] = True
    return torch.where(mask, x, 0.0), mask


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cached_generate_equals_uncached_reference(backend):
    m = tiny(backend)
    x = random_walks(3, 50)
    for horizon in HORIZONS:
        fast = m.generate(x, horizon)
        assert fast.shape == (3, horizon)
        torch.testing.assert_close(fast, m.generate(x, horizon, use_cache=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cached_generate_with_left_padding_equals_reference_and_rows_alone(backend):
    m = tiny(backend)
    x, mask = left_padded(random_walks(3, 50, seed=1), [50, 23, 37])
    for horizon in HORIZONS:
        fast = m.generate(x, horizon, attention_mask=mask)
        torch.testing.assert_close(fast, m.generate(x, horizon, attention_mask=mask, use_cache=False),
                                   rtol=1e-5, atol=1e-5)
        alone = m.generate(x[1:2, -23:], horizon)  # the padded row, unpadded
        torch.testing.assert_close(fast[1:2], alone, rtol=1e-5, atol=1e-5)


def test_rope_table_rows_are_rope_cos_sin():
    cos, sin = rope_table(300, 16, 10000.0, torch.float32, "cpu")
    pos = torch.tensor([[0, 5, 299], [7, 7, 100]])
    c, s = rope_cos_sin(pos, 16, 10000.0, torch.float32)
    assert torch.equal(cos[pos], c) and torch.equal(sin[pos], s)


def test_compiled_prefill_equals_eager():
    """fp32 compiled: the per-expert loop stays outside the graphs (no recompile per routing)."""
    eager = tiny()
    compiled = compile_for_inference(tiny())
    x = random_walks(4, 64, seed=2)
    for horizon in (45, 96):
        torch.testing.assert_close(compiled.generate(x, horizon), eager.generate(x, horizon), rtol=1e-4, atol=1e-4)
    xp, mask = left_padded(x, [64, 40, 64, 17])
    torch.testing.assert_close(compiled.generate(xp, 45, attention_mask=mask),
                               eager.generate(xp, 45, attention_mask=mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decode", ["dynamic", "automatic"])
def test_compiled_decode_equals_eager_bf16_and_stops_compiling(decode):
    """bf16: the grouped-GEMM experts inside the graphs; decode steps compiled with symbolic
    shapes (``dynamic``: 64, 32 and 8 new tokens share one graph) or static first
    (``automatic``: the cache's fill level becomes symbolic on the first recompile). Either way
    a generation of a shape already seen compiles nothing: no graph per decode step."""
    from torch._dynamo.utils import counters

    eager = tiny(dtype=torch.bfloat16)
    compiled = compile_for_inference(tiny(dtype=torch.bfloat16), decode=decode)
    x = random_walks(4, 64, seed=3)
    for horizon in (96, 200, 200):
        counters.clear()
        a, b = compiled.generate(x, horizon).float(), eager.generate(x, horizon).float()
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # bf16, fused vs unfused rounding
        assert (a - b).abs().mean() < 5e-3
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])


def test_forecast_vectorised_preparation_and_fixed_batch_change_nothing():
    g = np.random.default_rng(0)
    arr = np.cumsum(g.standard_normal((7, 90)), axis=1) * 3.0 + 5.0
    arr[2] = 4.0  # a constant row: only mean-centred
    fast, rows = prepare_contexts(arr, 64), prepare_contexts(list(arr), 64)
    for name in ("values_BT", "mask_BT", "mean_B", "scale_B", "missing_tail_B"):
        np.testing.assert_allclose(getattr(fast, name), getattr(rows, name), rtol=1e-12, atol=1e-6)
    m = tiny()
    ref = m.forecast(list(arr), 20, batch_size=3)
    np.testing.assert_allclose(m.forecast(arr, 20, batch_size=3), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.forecast(arr, 20, batch_size=3, fixed_batch=True), ref, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("padded", [False, True])
def test_every_forward_runs_the_last_layers_ffn_for_the_last_position_only(padded):
    """The last layer of the prefill and of every decode step: keys/values for every new position
    (the cache holds them, the next step attends to them), its FFN for the one position
    generation reads; the earlier layers see all new positions. (The forecasts' equality with the
    uncached reference is the tests above; here also with left padding.)"""
    m = tiny()
    rows: dict[int, list[int]] = {0: [], 1: []}
    hooks = [layer.ffn_layer.register_forward_hook(lambda mod, inp, out, i=i: rows[i].append(inp[0].shape[1]))
             for i, layer in enumerate(m.model.layers)]
    attn = m.model.layers[1].self_attn
    written, attend_cached = [], attn.attend_cached

    def recording(q, k, v, *args):  # the last layer's decode steps: queries, and keys into the cache
        written.append((q.shape[2], k.shape[2]))
        return attend_cached(q, k, v, *args)

    attn.attend_cached = recording
    x = random_walks(3, 64, seed=5)
    mask = None
    if padded:
        x, mask = left_padded(x, [64, 40, 17])
    # the prefill forecasts 64 values, a decode of those 64 the next 64, a decode of those the last 8
    out = m.generate(x, 136, attention_mask=mask)
    assert rows == {0: [64, 64, 64], 1: [1, 1, 1]}
    assert written == [(1, 64), (1, 64)]  # one query; the keys/values of every new position
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, m.generate(x, 136, attention_mask=mask, use_cache=False), rtol=1e-4, atol=1e-4)
