"""The scaling grid: model sizes from a few knobs, dense twins, data budgets, trial specs.

A size is two knobs, (layers, hidden size); everything else follows fixed rules so a grid stays
readable: heads = hidden / head_dim (kv heads = heads), intermediate = ffn_mult x hidden, experts
and top-k fixed, every other field (horizons, rope, norms, ...) from a base preset.

Dense twin (the Time-MoE paper's comparison): same layers and hidden size, ``use_dense=True``,
and the single SwiGLU width chosen so that its ACTIVE parameter count matches the sparse model's
active count. A sparse layer's active FFN is router + k routed experts of width F/k + the shared
expert of width F + its gate, about 6DF + D(E+1); a dense SwiGLU of width F_d is 3 D F_d, so
F_d ~ 2F + (E+1)/3. The width is solved exactly against ``model.flops.count_parameters``, never
against a formula of our own.

Families: ``dense`` (the twin above), ``sparse`` (the spec's MoE with its aux loss pooled over all
layers) and ``sparse_per_layer`` (the same MoE with the aux loss computed per layer and averaged,
``router_aux_loss_scope="per_layer"``): with the pooled loss every layer may route most tokens
to 2 of 8 experts, which a per-layer loss forbids (docs/scaling.md).

A budget is a number of training points seen (window positions with a target); each trial is
(family, size, budget, seed) with a content hash that identifies it across sweep re-runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import typed_config
from model import TimeMoeConfig
from model.flops import count_parameters, training_flops_per_point
from pipeline.scaling_laws.families import DEFAULT_FAMILIES, DENSE, FAMILIES, SPARSE, SPARSE_PER_LAYER  # noqa: F401

# Model fields added after trials were first recorded, with the value that reproduces the older
# behaviour. A trial whose model has that value leaves the field out of its hash, so records made
# before the field existed still match their trials (the committed 8-GPU sweep's records were made
# before router_aux_loss_scope existed).
HASH_NEUTRAL_MODEL_FIELDS: dict[str, Any] = {"router_aux_loss_scope": "pooled"}


@dataclass(frozen=True)
class SizeKnobs:
    """One model size of the grid."""

    name: str
    num_hidden_layers: int
    hidden_size: int


@dataclass(frozen=True)
class GridConfig:
    """The sweep's grid section: sizes x budgets x families, and the rules that expand knobs."""

    sizes: tuple[SizeKnobs, ...]
    budgets: tuple[int, ...]  # training points seen per trial
    families: tuple[str, ...] = DEFAULT_FAMILIES
    # Every (family, size, budget) cell is trained once per seed. Seed s trains with
    # train.seed + s (init and data order); seed 0 is the sweep's train.seed itself, so its
    # hash and name are those of a sweep without seeds.
    seeds: tuple[int, ...] = (0,)
    base_preset: str = "tiny"
    head_dim: int = 64
    ffn_mult: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    window_length: int = 512
    dense_width_multiple: int = 1  # round the dense twin's width to a multiple of this
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sizes or not self.budgets:
            raise ValueError("grid: need at least one size and one budget")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"grid: unknown families {sorted(unknown)}; expected a subset of {FAMILIES}")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"grid: size names must be unique, got {names}")
        for s in self.sizes:
            if s.hidden_size % self.head_dim:
                raise ValueError(f"grid: size {s.name!r}: hidden_size {s.hidden_size} is not a multiple "
                                 f"of head_dim {self.head_dim}")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"grid: budgets must be positive point counts, got {list(self.budgets)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"grid: seeds must be distinct non-negative integers, got {list(self.seeds)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "GridConfig":
        """From the YAML section, whose sizes are written ``{name, layers, hidden}``."""
        d = dict(d or {})
        sizes = []
        for i, s in enumerate(d.pop("sizes", None) or []):
            if not isinstance(s, dict) or set(s) != {"name", "layers", "hidden"}:
                raise typed_config.ConfigError(f"{where}: grid.sizes[{i}]: expected the keys name, layers, hidden; got {s!r}")
            sizes.append({"name": s["name"], "num_hidden_layers": s["layers"], "hidden_size": s["hidden"]})
        return typed_config.build(cls, {"sizes": sizes, **d}, where, "grid")


def sparse_config(grid: GridConfig, size: SizeKnobs) -> TimeMoeConfig:
    """The sparse (MoE) model of one grid size."""
    base = TimeMoeConfig.preset(grid.base_preset)
    heads = size.hidden_size // grid.head_dim
    return dataclasses.replace(
        base,
        hidden_size=size.hidden_size,
        intermediate_size=grid.ffn_mult * size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_experts=grid.num_experts,
        num_experts_per_tok=grid.num_experts_per_tok,
        use_dense=False,
        **grid.model_overrides,
    )


def dense_twin(sparse: TimeMoeConfig, multiple: int = 1) -> TimeMoeConfig:
    """The dense model with the sparse model's layers/hidden size and equal ACTIVE parameters.

    Active parameters are affine in the dense width, so two evaluations of the model's own
    counter give the exact solution; the nearest admissible width (floor or ceil) wins.
    """
    target = count_parameters(sparse).active

    def active(width: int) -> int:
        return count_parameters(dataclasses.replace(sparse, use_dense=True, intermediate_size=width)).active

    w0, w1 = sparse.intermediate_size, 2 * sparse.intermediate_size
    p0, p1 = active(w0), active(w1)
    slope = (p1 - p0) / (w1 - w0)
    guess = w0 + (target - p0) / slope
    lo = max(multiple, int(guess // multiple) * multiple)
    best = min((lo, lo + multiple), key=lambda w: (abs(active(w) - target), w))
    return dataclasses.replace(sparse, use_dense=True, intermediate_size=best)


def model_config(grid: GridConfig, size: SizeKnobs, family: str) -> TimeMoeConfig:
    """The model of one family at one grid size."""
    cfg = sparse_config(grid, size)
    if family == DENSE:
        return dense_twin(cfg, grid.dense_width_multiple)
    if family == SPARSE_PER_LAYER:
        return dataclasses.replace(cfg, router_aux_loss_scope="per_layer")
    return cfg


@dataclass(frozen=True)
class TrialSpec:
    """One (family, size, budget, seed) trial: everything that determines its result."""

    family: str
    size: str
    budget_points: int
    window_length: int
    model: dict[str, Any]  # TimeMoeConfig fields, published names
    n_total: int
    n_active: int
    flops_per_point: float
    training: dict[str, Any] = field(default_factory=dict)  # sweep-wide training settings
    seed: int = 0  # index on the grid's seed axis (train.seed + seed is the training seed)

    @property
    def name(self) -> str:
        base = f"{self.family}-{self.size}-{self.budget_points:.0e}".replace("+", "")
        return f"{base}-seed{self.seed}" if self.seed else base

    @property
    def training_flops(self) -> float:
        return self.flops_per_point * self.budget_points

    def config_hash(self) -> str:
        """Content hash over everything that changes the trial's outcome (not its name).

        Seed 0 and model fields at their ``HASH_NEUTRAL_MODEL_FIELDS`` value stay out of the
        payload, so trials recorded before the seed axis and those fields existed keep their hash."""
        model = {k: v for k, v in self.model.items()
                 if not (k in HASH_NEUTRAL_MODEL_FIELDS and v == HASH_NEUTRAL_MODEL_FIELDS[k])}
        payload = {"family": self.family, "budget_points": self.budget_points,
                   "window_length": self.window_length, "model": model, "training": self.training}
        if self.seed:
            payload["seed"] = self.seed
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def model_config(self) -> TimeMoeConfig:
        known = {f.name for f in dataclasses.fields(TimeMoeConfig)}
        return TimeMoeConfig(**{k: v for k, v in self.model.items() if k in known})


def _config_dict(cfg: TimeMoeConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def expand_grid(grid: GridConfig, training: dict[str, Any] | None = None) -> list[TrialSpec]:
    """All trials of the grid, ordered by family, size, budget (smallest first), seed."""
    trials: list[TrialSpec] = []
    for family in grid.families:
        for size in grid.sizes:
            cfg = model_config(grid, size, family)
            counts = count_parameters(cfg)
            fpp = float(training_flops_per_point(cfg, grid.window_length))
            for budget in sorted(grid.budgets):
                for seed in grid.seeds:
                    trials.append(TrialSpec(
                        family=family, size=size.name, budget_points=int(budget),
                        window_length=grid.window_length, model=_config_dict(cfg),
                        n_total=int(counts.total), n_active=int(counts.active),
                        flops_per_point=fpp, training=dict(training or {}), seed=int(seed),
                    ))
    return trials


def format_grid(trials: list[TrialSpec]) -> str:
    """A readable table of the grid (printed by the sweep job before it starts)."""
    lines = [f"{'trial':<34} {'layers':>6} {'hidden':>6} {'ffn':>6} {'N_total':>12} {'N_active':>12} "
             f"{'points':>10} {'FLOPs':>10}"]
    for t in trials:
        lines.append(f"{t.name:<34} {t.model['num_hidden_layers']:>6} {t.model['hidden_size']:>6} "
                     f"{t.model['intermediate_size']:>6} {t.n_total:>12,} {t.n_active:>12,} "
                     f"{t.budget_points:>10.2e} {t.training_flops:>10.2e}")
    return "\n".join(lines)
