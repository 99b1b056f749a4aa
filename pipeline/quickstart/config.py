"""The quickstart's typed configuration (``configs/quickstart*.yaml``) and the held-out series it
evaluates on when no benchmark folder is given."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import typed_config
from preprocessing.config import PreprocessConfig
from preprocessing.synthetic import kernelsynth, random_walk, seasonal

HELDOUT_FAMILIES = {"synth_seasonal": seasonal, "synth_kernel": kernelsynth, "synth_walk": random_walk}


@dataclass
class CorpusStage:
    """The embedded synthetic corpus, generated when the job gets no ``--input``."""

    seed: int = 0
    scale: float = 1.0  # 1.0 = 352 series, ~1.3M points


@dataclass
class TrainStage:
    config: str = "configs/tiny-cpu.yaml"  # a pipeline.config.TrainConfig YAML
    overrides: list[str] = field(default_factory=list)  # applied before the CLI's key=value arguments


@dataclass
class EvalStage:
    horizons: list[int] = field(default_factory=lambda: [96])
    context: int | None = None  # None: the paper's context for each horizon
    stride: int = 96
    device: str | None = None  # None: auto (pipeline.evaluation.inference); the CLI's --device wins
    dtype: str | None = None
    batch_size: int | None = None
    compile: str | bool = "auto"  # pipeline.evaluation.inference: auto/on/off compiled prefill; the CLI's --compile wins
    workers: int | str = "auto"  # pipeline.evaluation.workers: auto, N or 0
    heldout_seed: int = 10_000  # synthetic held-out series when no --benchmarks is given
    baselines: list[str] = field(default_factory=lambda: ["naive", "seasonal_naive"])


@dataclass
class RegisterStage:
    name: str = "timemoe-quickstart"


@dataclass
class QuickstartConfig:
    """``configs/quickstart.yaml``: one section per stage; ``preprocess`` is a
    ``preprocessing.config.PreprocessConfig`` whose inputs and output the job sets."""

    corpus: CorpusStage = field(default_factory=CorpusStage)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainStage = field(default_factory=TrainStage)
    eval: EvalStage = field(default_factory=EvalStage)
    register: RegisterStage = field(default_factory=RegisterStage)


def load_quickstart_config(path: str | Path) -> QuickstartConfig:
    return typed_config.load(QuickstartConfig, path)


def write_heldout_benchmarks(out_dir: str | Path, seed: int = 10_000, rows: int = 4000,
                             channels: int = 3) -> list[str]:
    """Benchmark-style CSVs (``date`` column + channels, hourly) of synthetic series drawn with a
    seed the training corpus never uses; ``pipeline.evaluation.benchmark_data`` reads them with its 70/10/20
    split. Returns the dataset names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dates = pd.date_range("2020-01-01", periods=rows, freq="h")
    names = []
    for i, (name, family) in enumerate(HELDOUT_FAMILIES.items()):
        rng = np.random.default_rng([seed, i])
        x_CT = family(rng, channels, rows)
        df = pd.DataFrame({"date": dates.strftime("%Y-%m-%d %H:%M:%S")})
        for c in range(channels):
            df[f"ch{c}"] = np.round(x_CT[c].astype(np.float64), 6)
        df.to_csv(out / f"{name}.csv", index=False)
        names.append(name)
    return names
