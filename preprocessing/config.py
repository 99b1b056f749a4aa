"""Typed configuration of the preprocessing job (cleaning, normalisation, packing, output).

Each stage receives only its own section (``CleanConfig`` to ``clean``, ``PackConfig`` to
``pack`` ...); ``PreprocessConfig`` is the root that the CLI builds from YAML plus flags.
YAML layout mirrors the dataclasses::

    inputs: [/data/time300b]
    output: s3://bucket/prepared
    seed: 0
    clean: {window: 128, max_zero_ratio: 0.2, min_run_length: 256}
    normalize: {method: zscore, scope: run}
    pack: {window_length: 4096, min_chunk_length: 32}
    mixture: {weights: {nature: 0.3, energy: 2.5}}
    provenance: {"synthetic/kernelsynth_gp-*": synthetic/kernelsynth}   # report: real vs generated
    task_resources: {data: 1}   # Ray custom resources of every read/clean/pack task (placement)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import typed_config


@dataclass
class CleanConfig:
    """Time-300B's Algorithm 2 plus the corpus-level filters. Every rule can be switched off."""

    window: int = 128                 # non-overlapping quality windows
    max_zero_ratio: float = 0.2       # drop a window if share of x == 0 exceeds this
    max_diff1_zero_ratio: float = 0.2  # ... share of zeros of x[1:] - x[:-1]
    max_diff2_zero_ratio: float = 0.2  # ... share of zeros of x[2:] - x[:-2]
    min_run_length: int = 256         # joined runs of kept windows shorter than this are dropped
    min_series_length: int = 256      # raw series shorter than this are dropped first
    # A trailing window shorter than ``window``: "check" = judged by the same ratios over its
    # own points (kept if it passes); "drop" = always dropped (reason partial_window).
    partial_window: Literal["check", "drop"] = "check"
    window_rules: bool = True         # False: skip the window ratios (still split at NaN/Inf)
    # Robust bound: a finite point farther from the series' median than this many times the
    # 99th percentile of |x - median| is dropped like a NaN (reason outlier); 0 = off.
    # docs/data.md gives the measurements behind 1000.
    outlier_limit: float = 1000.0
    dedup: bool = True                # exact-duplicate series removal (hash of raw values)


@dataclass
class ContaminationConfig:
    """Drop training series sharing >= ``min_match`` consecutive values with a benchmark's test
    split. ``benchmarks`` are CSV paths (ETTh*/ETTm* use the fixed ETT test rows, others the
    last 20%). Empty = guard off (the product needs no benchmark files at run time)."""

    benchmarks: list[str] = field(default_factory=list)
    min_match: int = 64


@dataclass
class NormalizeConfig:
    method: Literal["zscore", "max", "none"] = "zscore"
    # "run": statistics of each cleaned run (the segments that are packed); "series": of all
    # kept points of the series (closest to the released code, which z-scores whole sequences).
    scope: Literal["run", "series"] = "run"


@dataclass
class PackConfig:
    window_length: int = 4096         # rows hold window_length + 1 points
    min_chunk_length: int = 32        # a tail chunk shorter than this is dropped (short_tail)
    pack_batch_chunks: int = 2048     # chunks bin-packed together (best-fit decreasing)
    val_fraction: float = 0.01        # share of series (by key hash) held out to val/


@dataclass
class MixtureConfig:
    """Per-domain sampling weights applied to training chunks: 2.5 = every chunk twice plus a
    50% (hash-chosen) sample once more; 0.3 = a 30% sample. Unlisted domains get ``default``."""

    weights: dict[str, float] = field(default_factory=dict)
    default: float = 1.0

    def weight(self, domain: str) -> float:
        return float(self.weights.get(domain, self.default))


@dataclass
class OutputConfig:
    rows_per_shard: int = 1024
    compression: str = "zstd"
    compression_level: int | None = 1


@dataclass
class PreprocessConfig:
    inputs: list[str] = field(default_factory=list)
    output: str = ""
    catalog: str | None = None
    seed: int = 0
    fail_fast: bool = False
    clean: CleanConfig = field(default_factory=CleanConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    output_options: OutputConfig = field(default_factory=OutputConfig)
    # Ray custom resources that every preprocessing task (read, dedup pass, clean, pack/write)
    # asks for, on top of its CPU: ``{data: 1}`` keeps them on the cluster's cpu_data nodes
    # (cluster.yaml, docs/cluster.md "Placing work"). Empty: any node with a free CPU.
    task_resources: dict[str, float] = field(default_factory=dict)
    # Where the data comes from, for the report's ``provenance`` block (real points vs each
    # generator's): glob on "domain/dataset" -> kind, e.g. {"synthetic/kernelsynth_gp-*":
    # "synthetic/kernelsynth"}. The first matching glob wins; a dataset no glob matches is "real".
    provenance: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return typed_config.to_yaml(self)


def config_from_dict(data: dict[str, Any], where: str = "config") -> PreprocessConfig:
    """A ``PreprocessConfig`` from plain data, every value type-checked (``typed_config``)."""
    return typed_config.build(PreprocessConfig, data, where)


def load_config(path: str | Path) -> PreprocessConfig:
    return typed_config.load(PreprocessConfig, path)


def validate(config: PreprocessConfig) -> None:
    """Reject configurations that cannot produce a meaningful run, naming the field."""
    if not config.inputs:
        raise ValueError("config.inputs is empty: give at least one --input")
    if not config.output:
        raise ValueError("config.output is empty: give --output")
    if config.clean.window < 3:
        raise ValueError(f"clean.window must be >= 3 (lag-2 differences), got {config.clean.window}")
    if config.pack.window_length < 2:
        raise ValueError(f"pack.window_length must be >= 2, got {config.pack.window_length}")
    if not 0.0 <= config.pack.val_fraction < 1.0:
        raise ValueError(f"pack.val_fraction must be in [0, 1), got {config.pack.val_fraction}")
    for domain, w in config.mixture.weights.items():
        if w < 0:
            raise ValueError(f"mixture.weights[{domain!r}] must be >= 0, got {w}")
    if config.normalize.method not in ("zscore", "max", "none"):
        raise ValueError(f"normalize.method must be zscore, max or none, got {config.normalize.method!r}")
    if config.normalize.scope not in ("run", "series"):
        raise ValueError(f"normalize.scope must be run or series, got {config.normalize.scope!r}")
    if not isinstance(config.task_resources, dict):
        raise ValueError(f"task_resources must be a mapping like {{data: 1}}, got {config.task_resources!r}")
    for name, amount in config.task_resources.items():
        if name in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"task_resources[{name!r}] must be a custom resource (not CPU/GPU) with an amount > 0, "
                             f"got {amount!r}")
    if not config.clean.outlier_limit >= 0:
        raise ValueError(f"clean.outlier_limit must be >= 0 (0 = off), got {config.clean.outlier_limit}")
    if config.clean.partial_window not in ("check", "drop"):
        raise ValueError(f"clean.partial_window must be check or drop, got {config.clean.partial_window!r}")
