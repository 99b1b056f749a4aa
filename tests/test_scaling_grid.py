"""Grid expansion: knobs -> configs, dense twins with equal ACTIVE parameters, trial hashes."""
from __future__ import annotations

import dataclasses

import pytest

import model
from pipeline.scaling_laws import grid as G

GRID = G.GridConfig.from_dict({
    "base_preset": "tiny", "head_dim": 16, "window_length": 64, "num_experts": 4, "num_experts_per_tok": 2,
    "sizes": [{"name": "xs", "layers": 1, "hidden": 32}, {"name": "s", "layers": 2, "hidden": 48},
              {"name": "m", "layers": 2, "hidden": 64}, {"name": "l", "layers": 3, "hidden": 96}],
    "budgets": [1024, 4096, 16384],
})


def _active_by_instantiation(cfg) -> int:
    """Slow independent reference: build the model, sum numels, drop the experts a token skips."""
    m = model.TimeMoeModel(cfg)
    total = sum(p.numel() for p in m.parameters())
    if cfg.use_dense:
        return total
    # Each routed expert is a SwiGLU of width F // k: 3 * D * (F // k) weights per expert per layer.
    per_expert = 3 * cfg.hidden_size * (cfg.intermediate_size // cfg.num_experts_per_tok)
    return total - cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert


def test_sparse_config_follows_the_knobs():
    cfg = G.sparse_config(GRID, GRID.sizes[2])
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    assert cfg.num_attention_heads == cfg.num_key_value_heads == 64 // 16
    assert cfg.intermediate_size == 4 * 64
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.use_dense) == (4, 2, False)
    base = model.TimeMoeConfig.preset("tiny")
    assert cfg.horizon_lengths == base.horizon_lengths and cfg.rope_theta == base.rope_theta


@pytest.mark.parametrize("size_index", [0, 1, 3])
def test_dense_twin_matches_active_parameters(size_index):
    from model.flops import count_parameters

    sparse = G.sparse_config(GRID, GRID.sizes[size_index])
    dense = G.dense_twin(sparse)
    assert dense.use_dense and dense.hidden_size == sparse.hidden_size
    assert dense.num_hidden_layers == sparse.num_hidden_layers
    a_sparse, a_dense = _active_by_instantiation(sparse), _active_by_instantiation(dense)
    assert count_parameters(sparse).active == a_sparse
    # One width step changes a dense model by 3 * D weights per layer: the twin is within half a step.
    step = 3 * dense.hidden_size * dense.num_hidden_layers
    assert abs(a_dense - a_sparse) <= step / 2
    # ... about 2F + (E + 1) / 3 wide (router + shared gate folded into the width).
    assert abs(dense.intermediate_size - (2 * sparse.intermediate_size + (sparse.num_experts + 1) / 3)) <= 1


def test_expand_grid_counts_hashes_and_flops():
    from model.flops import training_flops_per_point

    trials = G.expand_grid(GRID, training={"optim": {"lr": 1e-3}})
    assert len(trials) == 4 * 3 * 2
    hashes = [t.config_hash() for t in trials]
    assert len(set(hashes)) == len(hashes)
    again = G.expand_grid(GRID, training={"optim": {"lr": 1e-3}})
    assert [t.config_hash() for t in again] == hashes  # stable across processes/calls
    other = G.expand_grid(GRID, training={"optim": {"lr": 3e-4}})
    assert not set(t.config_hash() for t in other) & set(hashes)
    for t in trials:
        cfg = t.model_config()
        assert t.flops_per_point == pytest.approx(training_flops_per_point(cfg, 64))
        assert t.training_flops == pytest.approx(t.flops_per_point * t.budget_points)
    sparse = {(t.size, t.budget_points): t for t in trials if t.family == "sparse"}
    for t in trials:
        if t.family == "dense":
            twin = sparse[(t.size, t.budget_points)]
            assert t.n_total == t.n_active < twin.n_total
            assert abs(t.n_active - twin.n_active) <= 3 * t.model["hidden_size"] * t.model["num_hidden_layers"]
    assert "sparse-xs" in G.format_grid(trials)


def test_grid_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="'bad'.*not a multiple of head_dim 16"):
        G.GridConfig.from_dict({"head_dim": 16, "sizes": [{"name": "bad", "layers": 1, "hidden": 40}],
                                "budgets": [1]})
    with pytest.raises(ValueError, match=r"grid.sizes\[0\]: expected the keys name, layers, hidden"):
        G.GridConfig.from_dict({"sizes": [{"name": "x", "layers": 1}], "budgets": [1]})
    with pytest.raises(ValueError, match="unknown key 'bogus' in section 'grid'"):
        G.GridConfig.from_dict({"sizes": [{"name": "x", "layers": 1, "hidden": 64}], "budgets": [1], "bogus": 1})
    with pytest.raises(ValueError, match=r"grid.budgets\[0\]: expected int, got 'many'"):
        G.GridConfig.from_dict({"sizes": [{"name": "x", "layers": 1, "hidden": 64}], "budgets": ["many"]})
    grid = G.GridConfig.from_dict({"sizes": [{"name": "x", "layers": "1", "hidden": 64}], "budgets": ["1e8", 3.6e7]})
    assert grid.budgets == (100_000_000, 36_000_000) and grid.sizes[0].num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown families"):
        dataclasses.replace(GRID, families=("sparse", "moe"))
