"""Checkpoint layout (published key names/shapes), strict loading errors, generate and forecast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import TimeMoeConfig, TimeMoeModel, horizon_schedule
from model.moe import MoeFeedForward

torch.set_num_threads(2)


def make_model(seed: int = 0, **kw) -> TimeMoeModel:
    torch.manual_seed(seed)
    m = TimeMoeModel(TimeMoeConfig.preset("tiny", **kw)).eval()
    with torch.no_grad():  # a non-trivial router and heads, so outputs differ token by token
        for layer in m.model.layers:
            if isinstance(layer.ffn_layer, MoeFeedForward):
                layer.ffn_layer.router.weight.normal_(0, 1.0)
        m.heads.weight.normal_(0, 0.2)
    return m


def expected_keys(c: TimeMoeConfig) -> dict[str, tuple]:
    """Written from spec section 1, independently of model/checkpoint.py."""
    D, F, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok
    hd = D // c.num_attention_heads
    keys = {"model.embed_layer.emb_layer.weight": (D, 1), "model.embed_layer.gate_layer.weight": (D, 1),
            "model.norm.weight": (D,)}
    for l in range(c.num_hidden_layers):
        p = f"model.layers.{l}."
        keys.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                     p + "self_attn.o_proj.weight": (D, c.num_attention_heads * hd)})
        for n, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
            keys[p + f"self_attn.{n}_proj.weight"] = (heads * hd, D)
            keys[p + f"self_attn.{n}_proj.bias"] = (heads * hd,)
        if c.use_dense:
            keys.update({p + "ffn_layer.gate_proj.weight": (F, D), p + "ffn_layer.up_proj.weight": (F, D),
                         p + "ffn_layer.down_proj.weight": (D, F)})
            continue
        keys[p + "ffn_layer.gate.weight"] = (E, D)
        for e in range(E):
            keys.update({p + f"ffn_layer.experts.{e}.gate_proj.weight": (F // k, D),
                         p + f"ffn_layer.experts.{e}.up_proj.weight": (F // k, D),
                         p + f"ffn_layer.experts.{e}.down_proj.weight": (D, F // k)})
        keys.update({p + "ffn_layer.shared_expert.gate_proj.weight": (F, D),
                     p + "ffn_layer.shared_expert.up_proj.weight": (F, D),
                     p + "ffn_layer.shared_expert.down_proj.weight": (D, F),
                     p + "ffn_layer.shared_expert_gate.weight": (1, D)})
    for i, h in enumerate(c.horizon_lengths):
        keys[f"lm_heads.{i}.out_layer.weight"] = (h, D)
    return keys


@pytest.mark.parametrize("dense", [False, True])
def test_save_load_roundtrip_published_layout(tmp_path, dense):
    m = make_model(use_dense=dense, num_key_value_heads=2)
    m.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(m.config)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "time_moe" and cfg["architectures"] == ["TimeMoeForPrediction"]
    m2 = TimeMoeModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 30)
    for h, p in m(x).predictions.items():
        assert torch.equal(p, m2(x).predictions[h])
    bf = TimeMoeModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf.heads.weight.dtype == torch.bfloat16


def test_loading_a_wrong_checkpoint_lists_every_problem(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.ffn_layer.gate.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    state["lm_heads.9.out_layer.weight"] = torch.zeros(1, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        TimeMoeModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "missing (1): model.layers.1.ffn_layer.gate.weight" in msg
    assert "unexpected (1): lm_heads.9.out_layer.weight" in msg
    assert "mis-shaped (1): model.layers.0.self_attn.q_proj.weight: got (3, 64), expected (64, 64)" in msg


@pytest.mark.parametrize("horizon,steps", [
    (24, [8, 8, 8]), (96, [64, 32]), (45, [32, 8, 1, 1, 1, 1, 1]), (336, [64] * 5 + [8, 8]),
    (100, [64, 32, 1, 1, 1, 1]), (720, [64] * 11 + [8, 8])])
def test_greedy_schedule(horizon, steps):
    assert horizon_schedule(horizon, [1, 8, 32, 64]) == steps
    assert horizon_schedule(5, [8, 32]) == [8]  # none fits: smallest head, truncated


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_generate_cache_equals_no_cache_and_padded_rows_equal_alone(backend):
    m = make_model(attn_implementation=backend)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(23, generator=g)
    for horizon in (45, 100):
        alone_a = m.generate(a[None], horizon, use_cache=False)
        torch.testing.assert_close(m.generate(a[None], horizon, use_cache=True), alone_a, rtol=1e-5, atol=1e-5)
        alone_b = m.generate(b[None], horizon)
        batch = torch.zeros(2, 50)
        batch[0], batch[1, -23:] = a, b
        mask = torch.zeros(2, 50, dtype=torch.bool)
        mask[0], mask[1, -23:] = True, True
        for cache in (True, False):
            out = m.generate(batch, horizon, attention_mask=mask, use_cache=cache)
            assert out.shape == (2, horizon)
            torch.testing.assert_close(out[0], alone_a[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[1], alone_b[0], rtol=1e-5, atol=1e-5)


def test_generate_first_step_is_the_head_on_the_last_position():
    m = make_model()
    x = torch.randn(3, 40)
    out = m.generate(x, 8)
    torch.testing.assert_close(out, m(x).predictions[8][:, -1], rtol=1e-5, atol=1e-6)


def test_forecast_is_affine_equivariant_and_handles_unequal_lengths():
    m = make_model()
    g = np.random.default_rng(0)
    xs = [np.sin(np.arange(n) / 5) + 0.1 * g.standard_normal(n) for n in (120, 64, 90)]
    f = m.forecast(xs, 20)
    assert f.shape == (3, 20) and np.isfinite(f).all()
    f2 = m.forecast([3.0 * x + 7.0 for x in xs], 20)
    np.testing.assert_allclose(f2, 3.0 * f + 7.0, rtol=1e-5, atol=1e-5)
    # z-scoring: forecast == generate on the z-scored context, mapped back
    x = xs[1]
    z = (x - x.mean()) / x.std()
    raw = m.generate(torch.tensor(z, dtype=torch.float32)[None], 20)[0].double().numpy()
    np.testing.assert_allclose(f[1], raw * x.std() + x.mean(), rtol=1e-5, atol=1e-5)
    # unequal lengths in one batch == each alone; batch_size splits do not change results
    for i, x in enumerate(xs):
        np.testing.assert_allclose(m.forecast([x], 20)[0], f[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.forecast(xs, 20, batch_size=2), f, rtol=1e-5, atol=1e-5)
    # context_length keeps only the last N points; a [B, T] array works too
    np.testing.assert_allclose(m.forecast([xs[0]], 20, context_length=64)[0], m.forecast([xs[0][-64:]], 20)[0], rtol=1e-6)
    arr = np.stack([xs[0][:64], xs[1]])
    np.testing.assert_allclose(m.forecast(arr, 20), m.forecast(list(arr), 20), rtol=1e-6)


def test_forecast_nan_policy():
    m = make_model()
    x = np.sin(np.arange(80) / 4.0)
    base = m.forecast([x], 16)[0]
    # leading NaNs are dropped
    np.testing.assert_allclose(m.forecast([np.r_[np.nan, np.nan, x]], 16)[0], base, rtol=1e-5, atol=1e-6)
    # interior NaNs are linearly interpolated
    y = x.copy()
    y[40] = np.nan
    filled = x.copy()
    filled[40] = 0.5 * (x[39] + x[41])
    np.testing.assert_allclose(m.forecast([y], 16)[0], m.forecast([filled], 16)[0], rtol=1e-5, atol=1e-6)
    # trailing NaNs are forecast too: the result starts right after the given array
    t = np.r_[x[:-3], [np.nan] * 3]
    longer = m.forecast([x[:-3]], 19)[0]
    np.testing.assert_allclose(m.forecast([t], 16)[0], longer[3:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="series 1 has no finite value"):
        m.forecast([x, np.full(10, np.nan)], 4)
