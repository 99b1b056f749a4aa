"""The shipped training recipes (configs/*.yaml for pretraining) load, validate and describe the
paper's recipe: a typo in a recipe otherwise surfaces only once a GPU cluster is booked."""
from __future__ import annotations

from pathlib import Path

import pytest

from model import TimeMoeConfig
from model.flops import count_parameters
from pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPU_RECIPES = {"timemoe-50m.yaml": "timemoe-50m", "timemoe-200m.yaml": "timemoe-200m", "timemoe-ultra.yaml": "timemoe-ultra"}


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe_is_the_papers_recipe(name):
    cfg = load_config(str(CONFIGS / name), [])
    assert cfg.model.preset == GPU_RECIPES[name]
    # 100k steps x 1024 windows x 4096 points, AdamW 1e-3 / (0.9, 0.95) / wd 0.1, 10k warm-up, bf16
    assert cfg.train.max_steps == 100_000 and cfg.train.global_batch_size == 1024
    assert TimeMoeConfig.preset(cfg.model.preset).max_position_embeddings == 4096
    assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
        1e-3, (0.9, 0.95), 0.1, 10_000)
    assert cfg.parallel.precision == "bf16" and cfg.scaling.use_gpu and cfg.parallel.compile
    accum = cfg.grad_accum_steps(cfg.scaling.num_workers)  # raises unless the batch divides
    assert accum * cfg.train.micro_batch_size * cfg.scaling.num_workers == 1024


def test_every_training_config_loads_and_validates():
    names = [p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("sweep", "quickstart"))]
    assert set(GPU_RECIPES) | {"tiny-cpu.yaml"} <= set(names)
    for name in names:
        cfg = load_config(str(CONFIGS / name), [])
        cfg.validate()
        assert count_parameters(TimeMoeConfig.preset(cfg.model.preset)).total > 0
