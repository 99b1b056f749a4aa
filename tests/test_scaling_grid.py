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


def test_families_and_seeds_expand_with_stable_identity():
    grid = dataclasses.replace(GRID, families=("sparse", "dense", "sparse_per_layer"), seeds=(0, 1))
    trials = G.expand_grid(grid, training={"optim": {"lr": 1e-3}})
    assert len(trials) == 3 * 4 * 3 * 2
    assert len({t.config_hash() for t in trials}) == len(trials)
    assert len({t.name for t in trials}) == len(trials)
    # Seed 0 of a seeded grid is the trial of the grid without seeds: same hash, same name.
    plain = {(t.family, t.size, t.budget_points): t for t in G.expand_grid(GRID, training={"optim": {"lr": 1e-3}})}
    by_key = {(t.family, t.size, t.budget_points, t.seed): t for t in trials}
    for (fam, size, budget), old in plain.items():
        assert by_key[(fam, size, budget, 0)].config_hash() == old.config_hash()
        assert by_key[(fam, size, budget, 0)].name == old.name
        assert by_key[(fam, size, budget, 1)].name == old.name + "-seed1"
    # The per-layer family is the sparse model with the per-layer aux loss: same parameters,
    # same FLOPs, another hash.
    for (fam, size, budget, seed), t in by_key.items():
        if fam != "sparse_per_layer":
            continue
        twin = by_key[("sparse", size, budget, seed)]
        assert t.model_config().router_aux_loss_scope == "per_layer"
        assert twin.model_config().router_aux_loss_scope == "pooled"
        assert {k: v for k, v in t.model.items() if k != "router_aux_loss_scope"} == \
            {k: v for k, v in twin.model.items() if k != "router_aux_loss_scope"}
        assert (t.n_total, t.n_active, t.flops_per_point) == (twin.n_total, twin.n_active, twin.flops_per_point)
        assert t.config_hash() != twin.config_hash()
    with pytest.raises(ValueError, match="seeds must be distinct"):
        dataclasses.replace(GRID, seeds=(0, 0))


def test_committed_8gpu_records_still_match_their_trials():
    """The 24 records of the 8-GPU sweep were written before router_aux_loss_scope and the seed
    axis existed: their hashes must still be trials of configs/sweep-8gpu-offline.yaml, or
    ``jobs.sweep --import-records`` would refuse them as foreign."""
    import glob
    from pathlib import Path

    from pipeline.scaling_laws.offline import read_records
    from pipeline.scaling_laws.sweep import SweepConfig, plan_trials

    root = Path(__file__).resolve().parents[1]
    plans = {p.config_hash: p for p in plan_trials(SweepConfig.from_yaml(root / "configs" / "sweep-8gpu-offline.yaml"))}
    records = read_records(sorted(glob.glob(str(root / "benchmarks/results/sweep-8gpu-offline/records-*.jsonl"))))
    assert len(records) == 24
    for r in records:
        assert r.config_hash in plans, r.trial
        assert plans[r.config_hash].spec.name == r.trial and r.record.seed == 0


def test_committed_families_records_are_trials_of_the_families_plan():
    """Every committed record of the families study is a trial of configs/sweep-families-1gpu.yaml
    (else the import would call it foreign) with the plan's points and FLOPs, trained on the
    study's mixture (>= 1e8 KernelSynth training points, so the 1e8-point trials never repeat a row)."""
    import glob
    from pathlib import Path

    from pipeline.scaling_laws.offline import read_records
    from pipeline.scaling_laws.sweep import SweepConfig, plan_trials

    root = Path(__file__).resolve().parents[1]
    plans = {p.config_hash: p for p in plan_trials(SweepConfig.from_yaml(root / "configs" / "sweep-families-1gpu.yaml"))}
    records = read_records(sorted(glob.glob(str(root / "benchmarks/results/sweep-families-1gpu/records-*.jsonl"))))
    assert records, "no committed records"
    for r in records:
        p = plans[r.config_hash]
        assert p.spec.name == r.trial and r.record.seed == p.spec.seed and r.record.family == p.spec.family
        assert r.record.points_seen == p.points_seen
        assert r.record.training_flops == pytest.approx(p.spec.flops_per_point * p.points_seen, rel=1e-9)
        assert r.record.data_mixture["synthetic/kernelsynth"] >= 1e8
        assert r.trials_per_gpu >= 1 and r.record.heldout_loss > 0


def test_seed_axis_sets_the_training_seed():
    from pipeline.scaling_laws.sweep import SweepConfig, plan_trials

    raw = {"sweep": {"name": "x"}, "grid": {"base_preset": "tiny", "head_dim": 16, "window_length": 64,
                                             "num_experts": 4, "sizes": [{"name": "xs", "layers": 1, "hidden": 32}],
                                             "budgets": [1024], "seeds": [0, 2],
                                             "families": ["sparse", "sparse_per_layer"]},
           "training": {"train": {"global_batch_size": 4, "seed": 1234}}}
    plans = plan_trials(SweepConfig.from_dict(raw))
    assert [(p.spec.family, p.spec.seed, p.train_config["train"]["seed"]) for p in plans] == [
        ("sparse", 0, 1234), ("sparse", 2, 1236), ("sparse_per_layer", 0, 1234), ("sparse_per_layer", 2, 1236)]
    assert plans[2].train_config["model"]["overrides"]["router_aux_loss_scope"] == "per_layer"
    assert "router_aux_loss_scope" not in plans[0].train_config["model"]["overrides"]
