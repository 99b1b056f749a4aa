"""Model numerics against independent slow references (CPU, fp32, tight tolerances)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import TimeMoeConfig, TimeMoeModel
from model.attention import apply_rope, rope_cos_sin, segment_positions
from model.flops import count_parameters, mfu, training_flops_per_point
from model.moe import GroupedExperts, LocalDispatcher, MoeFeedForward, SwiGLU, naive_routed_experts, top_k_experts

torch.set_num_threads(2)


def tiny(**kw) -> TimeMoeConfig:
    return TimeMoeConfig.preset("tiny", **kw)


def make_model(seed: int = 0, **kw) -> TimeMoeModel:
    torch.manual_seed(seed)
    m = TimeMoeModel(tiny(**kw)).eval()
    # a non-trivial router, so that routing differs between tokens
    with torch.no_grad():
        for layer in m.model.layers:
            if isinstance(layer.ffn_layer, MoeFeedForward):
                layer.ffn_layer.router.weight.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("name,total,active", [
    ("timemoe-50m", 113.35, 49.65), ("timemoe-200m", 453.20, 198.39), ("timemoe-ultra", 2416.55, 1057.59)])
def test_presets_reproduce_published_parameter_counts(name, total, active):
    c = count_parameters(TimeMoeConfig.preset(name))
    assert abs(c.total / 1e6 - total) <= 0.01 and abs(c.active / 1e6 - active) <= 0.01
    dense = count_parameters(TimeMoeConfig.preset("dense-" + name.split("-")[1]))
    assert dense.total == dense.active == c.active  # dense twin: same active params, exactly


def test_configs_that_differ_only_in_training_fields_forecast_the_same():
    """``same_forward``: the aux-loss scope and factor, dropout and init do not change a forecast
    from the same weights; a shape change does."""
    base = TimeMoeConfig.preset("tiny")
    trained_otherwise = dataclasses.replace(base, router_aux_loss_scope="per_layer", router_aux_loss_factor=0.1,
                                            attention_dropout=0.1, initializer_range=0.05)
    assert base.same_forward(trained_otherwise) and trained_otherwise.same_forward(base)
    assert not base.same_forward(dataclasses.replace(base, num_experts_per_tok=1))
    assert not base.same_forward(dataclasses.replace(base, use_dense=True))
    torch.manual_seed(0)
    a = TimeMoeModel(base).eval()
    b = TimeMoeModel(trained_otherwise).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(a.generate(x, 16), b.generate(x, 16))


def test_count_parameters_matches_a_real_model_and_flops_formula():
    cfg = tiny()
    m = TimeMoeModel(cfg)
    assert count_parameters(cfg).total == sum(p.numel() for p in m.parameters())
    n_active = count_parameters(cfg).active
    assert training_flops_per_point(cfg, 512) == 6 * n_active + 6 * cfg.num_hidden_layers * 512 * cfg.hidden_size
    assert mfu(1e6, cfg, 512, peak_flops=1e12) == pytest.approx(training_flops_per_point(cfg, 512) * 1e6 / 1e12)


def test_segment_positions_restart_per_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def _packed_batch(lengths: list[int], L: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    series = [torch.randn(n + 1, generator=g) for n in lengths]
    inputs, labels = torch.zeros(1, L), torch.zeros(1, L)
    seg, mask = torch.zeros(1, L, dtype=torch.long), torch.zeros(1, L, dtype=torch.bool)
    t = 0
    for i, s in enumerate(series):
        n = len(s) - 1
        inputs[0, t : t + n], labels[0, t : t + n] = s[:-1], s[1:]
        seg[0, t : t + n], mask[0, t : t + n] = i + 1, True
        t += n
    return series, inputs, labels, seg, mask


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_window_equals_each_series_alone(backend):
    m = make_model(attn_implementation=backend)
    lengths = [37, 70, 20]
    series, inputs, labels, seg, mask = _packed_batch(lengths, L=140)
    out = m(inputs, segment_ids=seg, labels=labels, loss_mask=mask)
    t = 0
    for s in series:
        n = len(s) - 1
        alone = m(s[None, :-1], labels=s[None, 1:])
        for h, p in alone.predictions.items():
            torch.testing.assert_close(out.predictions[h][0, t : t + n], p[0], rtol=1e-5, atol=1e-5)
        # per-segment head loss from the packed run == the series' own loss
        one_seg = seg.clone()
        one_seg[seg != seg[0, t]] = 0
        packed_one = m(inputs, segment_ids=seg, labels=labels, loss_mask=mask & (one_seg > 0))
        for h in alone.head_losses:
            assert torch.allclose(packed_one.head_losses[h], alone.head_losses[h], rtol=1e-5)
        t += n


def test_sdpa_matches_eager_reference_on_packed_inputs_with_grads():
    torch.manual_seed(3)
    seg = torch.tensor([[1] * 10 + [2] * 30 + [3] * 20 + [0] * 4, [1] * 64])
    x = torch.randn(2, 64)
    grads = {}
    outs = {}
    for backend in ("eager", "sdpa"):
        m = make_model(attn_implementation=backend).train()
        out = m(x, segment_ids=seg, labels=torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
        out.loss.backward()
        outs[backend] = out.predictions[64]
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    torch.testing.assert_close(outs["sdpa"], outs["eager"], rtol=1e-5, atol=1e-6)
    for n in grads["eager"]:
        torch.testing.assert_close(grads["sdpa"][n], grads["eager"][n], rtol=1e-4, atol=1e-6)


def test_unpacked_is_causal_path_matches_one_segment_mask():
    m = make_model()
    x = torch.randn(2, 50)
    a = m(x).predictions[8]
    b = m(x, segment_ids=torch.ones(2, 50, dtype=torch.long), attn_implementation="eager").predictions[8]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_experts_equal_naive_loop_outputs_and_grads(grouped, monkeypatch):
    import model.moe as moe

    if not grouped:
        monkeypatch.setattr(moe, "_use_grouped_mm", lambda x: False)
    torch.manual_seed(0)
    E, D, Fe, T, K = 5, 16, 24, 40, 2
    experts = GroupedExperts(E, D, Fe)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(T, D, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 gets no token
    w = torch.rand(T, K, requires_grad=True)
    y = LocalDispatcher()(x, idx, w, experts)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    for t in [x, w, *experts.parameters()]:
        t.grad = None
    y_ref = naive_routed_experts(x, idx, w, experts)
    y_ref.backward(g)
    refs = [x.grad, w.grad] + [p.grad for p in experts.parameters()]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_fused_gate_up_equals_two_projections_outputs_and_grads():
    """The shared expert and the dense FFN run gate and up as one GEMM: the written-out formula
    with two separate matmuls is the reference, for the output and every gradient."""
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = ffn(x)
    g = torch.randn_like(y)
    y.backward(g)
    grads = [x.grad.clone()] + [p.grad.clone() for p in ffn.parameters()]
    x.grad = None
    Wg, Wu, Wd = (p.detach().clone().requires_grad_(True) for p in
                  (ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight))
    y_ref = (F.silu(x @ Wg.T) * (x @ Wu.T)) @ Wd.T
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, [x.grad, Wg.grad, Wu.grad, Wd.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rope_rotates_each_frequency_pair_by_position_times_frequency():
    """Reference: the pair (x_i, x_{i + hd/2}) as one complex number, multiplied by
    exp(i * position * theta^(-2i/hd)); applied on ``[B, H, L, hd]``."""
    B, L, H, hd, theta = 2, 9, 3, 8, 10000.0
    x = torch.randn(B, H, L, hd, dtype=torch.float64)
    pos = torch.stack([torch.arange(L), torch.arange(L).flip(0) * 7])
    cos, sin = rope_cos_sin(pos, hd, theta, torch.float64)
    got = apply_rope(x, cos, sin)
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle_BLf = pos[..., None].double() * freq
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(angle_BLf), angle_BLf)[:, None]
    # the table is computed in fp32 (as the released code does), hence fp32 tolerances
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_experts_equals_topk_and_sends_ties_to_the_lower_expert(k):
    """The router's choice against ``torch.topk`` (values distinct: the same experts in the same
    order); with ties, the lower expert id first, where topk's order is unspecified."""
    g = torch.Generator().manual_seed(k)
    probs = torch.randn(500, 8, generator=g).softmax(dim=-1)
    assert torch.equal(top_k_experts(probs, k), probs.topk(k, dim=-1).indices)
    tied = torch.tensor([[0.1, 0.3, 0.3, 0.1, 0.2, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0]])
    assert top_k_experts(tied, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    # never the same expert twice, even where every probability is equal
    flat = top_k_experts(torch.full((4, 8), 0.125), k)
    assert all(len(set(row)) == k for row in flat.tolist())


def test_moe_block_matches_spec_formula():
    torch.manual_seed(0)
    cfg = tiny()
    moe = MoeFeedForward(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(1, 12, cfg.hidden_size)
    y, logits, idx = moe(x)
    xt = x[0]
    p = torch.softmax(xt @ moe.router.weight.T, -1)
    w, i = p.topk(cfg.num_experts_per_tok, -1)  # not renormalised
    ref = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for j in range(w.shape[1]):
            e = int(i[t, j])
            h = F.silu(xt[t] @ moe.experts.gate_proj[e].T) * (xt[t] @ moe.experts.up_proj[e].T)
            ref[t] += w[t, j] * (h @ moe.experts.down_proj[e].T)
        ref[t] += torch.sigmoid(xt[t] @ moe.shared_expert_gate.weight.T) * moe.shared_expert(xt[t])
    torch.testing.assert_close(y[0], ref, rtol=1e-4, atol=3e-5)  # |y| ~ 1-10: fp32 summation order


def test_loss_hand_computed_on_one_layer_model():
    m = make_model(num_hidden_layers=1)
    g = torch.Generator().manual_seed(5)
    L = 40
    x, labels = torch.randn(2, L, generator=g), torch.randn(2, L, generator=g)
    seg = torch.tensor([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40])
    mask = torch.rand(2, L, generator=g) > 0.2
    mask &= seg > 0
    out = m(x, segment_ids=seg, labels=labels, loss_mask=mask)
    heads = []
    for h, pred in out.predictions.items():
        num, den = 0.0, 0
        for b in range(2):
            for t in range(L):
                for j in range(h):
                    u = t + j
                    if u < L and mask[b, u] and seg[b, u] == seg[b, t] and seg[b, t] > 0:
                        d = abs(float(pred[b, t, j].detach()) - float(labels[b, u]))
                        num += 0.5 * d * d if d <= 2.0 else 2.0 * (d - 0.5 * 2.0)
                        den += 1
        heads.append(num / den)
        assert float(out.head_losses[h]) == pytest.approx(num / den, rel=1e-5)
    logits = out.router_logits[0][(seg > 0).reshape(-1)]
    probs = torch.softmax(logits, -1)
    E, K = probs.shape[1], m.config.num_experts_per_tok
    chosen = torch.zeros(E)
    for row in probs.topk(K, -1).indices:
        chosen[row] += 1
    aux = E * float((chosen / len(probs) * probs.mean(0)).sum())
    assert float(out.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert float(out.loss) == pytest.approx(sum(heads) / len(heads) + 0.02 * aux, rel=1e-5)
    assert out.expert_counts.shape == (1, E) and int(out.expert_counts.sum()) == K * int((seg > 0).sum())


def test_aux_loss_pools_all_layers_and_balanced_router_gives_k():
    from model.loss import load_balancing_loss

    E, K = 4, 2
    # every expert picked equally often with uniform probabilities -> aux = K
    logits = torch.zeros(8, E)
    assert float(load_balancing_loss(logits, K)) == pytest.approx(K)
    m = make_model()
    out = m(torch.randn(2, 30))
    pooled = load_balancing_loss(torch.cat(out.router_logits), K)
    torch.testing.assert_close(out.aux_loss, pooled)
    # pooling matters: two layers each collapsed on different experts look balanced when pooled
    l1 = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(6, 1)
    l2 = torch.tensor([[0.0, 0.0, 5.0, 4.0]]).repeat(6, 1)
    pooled_aux = float(load_balancing_loss(torch.cat([l1, l2]), K))
    mean_aux = float(load_balancing_loss(l1, K) + load_balancing_loss(l2, K)) / 2
    assert pooled_aux == pytest.approx(K, rel=1e-6) and mean_aux > 3.9  # per layer: collapsed (~E)


def test_per_layer_aux_loss_sees_collapsed_layers_that_pooling_hides():
    from model.loss import load_balancing_loss, router_aux_loss

    K = 2
    # two layers, each sending every token to its own two experts: balanced when pooled
    l1 = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(6, 1).requires_grad_()
    l2 = torch.tensor([[0.0, 0.0, 5.0, 4.0]]).repeat(6, 1).requires_grad_()
    pooled = router_aux_loss([l1, l2], K, scope="pooled")
    per_layer = router_aux_loss([l1, l2], K, scope="per_layer")
    assert float(pooled) == pytest.approx(K, rel=1e-6)
    assert float(per_layer) == pytest.approx(float(load_balancing_loss(l1, K) + load_balancing_loss(l2, K)) / 2)
    # pooled: the hot experts' logits get (almost) no push; per layer: they are pushed down
    g_pooled = torch.autograd.grad(pooled, l1)[0][0]
    g_layer = torch.autograd.grad(per_layer, l1)[0][0]
    assert g_pooled.abs().max() < 1e-6
    assert g_layer[0] > 5e-4 and g_layer[1] > 5e-4 and g_layer[2] < 0 and g_layer[3] < 0
    with pytest.raises(ValueError, match="scope"):
        router_aux_loss([l1], K, scope="global")


def test_model_per_layer_aux_scope_is_the_mean_over_layers_with_the_padding_mask():
    from model.loss import load_balancing_loss

    m = make_model(router_aux_loss_scope="per_layer")
    seg = torch.tensor([[1] * 10 + [2] * 12 + [0] * 8])
    out = m(torch.randn(1, 30), segment_ids=seg)
    keep = (seg > 0).reshape(-1)
    want = torch.stack([load_balancing_loss(l, 2, keep) for l in out.router_logits]).mean()
    torch.testing.assert_close(out.aux_loss, want)
    with pytest.raises(ValueError, match="router_aux_loss_scope"):
        make_model(router_aux_loss_scope="global")


def test_dense_twin_has_no_router_and_no_aux():
    m = TimeMoeModel(tiny(use_dense=True, intermediate_size=259))
    out = m(torch.randn(1, 20), labels=torch.randn(1, 20))
    assert out.aux_loss is None and out.expert_counts is None and out.router_logits == ()
    assert float(out.loss) == pytest.approx(float(torch.stack(list(out.head_losses.values())).mean()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_clear_error(bad):
    m = make_model()
    x = torch.randn(2, 10)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=r"inputs holds 1 NaN/inf.*\[1, 3\]"):
        m(x)


def test_init_follows_spec():
    m = TimeMoeModel(TimeMoeConfig.preset("tiny", hidden_size=128, intermediate_size=256))
    assert torch.all(m.model.norm.weight == 1)
    assert torch.all(m.model.layers[0].self_attn.qkv_proj.bias == 0)
    w = m.model.layers[0].ffn_layer.experts.gate_proj
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(m.heads.weight.std()) - 0.02) < 0.003


def test_config_roundtrips_json_yaml_and_presets(tmp_path):
    for name in TimeMoeConfig.preset_names():
        c = TimeMoeConfig.preset(name)
        c.save_json(tmp_path / "c.json")
        assert TimeMoeConfig.from_json(tmp_path / "c.json") == c
        assert TimeMoeConfig.from_yaml(c.to_yaml()) == c
    d = TimeMoeConfig.preset("tiny").to_hf_dict()
    assert d["model_type"] == "time_moe" and d["architectures"] == ["TimeMoeForPrediction"]
    with pytest.raises(ValueError, match="model_type"):
        TimeMoeConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        TimeMoeConfig.preset("tiny", num_attention_heads=5)
    assert dataclasses.replace(TimeMoeConfig.preset("tiny"), num_experts=8).num_experts == 8
