"""KernelSynth: synthetic series drawn from Gaussian-process priors with random composite kernels.

The method is the one Chronos (Ansari et al., 2024, "Chronos: Learning the Language of Time
Series", Section 4.2 and Algorithm 2) describes for growing a corpus with data that never
repeats; this is our own numpy implementation of that description:

1. draw J ~ U{1, ..., max_kernels} base kernels (with replacement) from a bank of linear, RBF,
   periodic, rational-quadratic and white-noise kernels with fixed hyper-parameter choices;
2. fold them into one kernel, joining each next kernel with + or x at random (a sum of
   kernels is a sum of independent processes; a product modulates one by another: seasonality
   whose amplitude grows with a trend, a trend with local wiggles);
3. draw a series of ``length`` points from GP(0, k) on t = 0 .. 1: x = chol(K + jitter I) z.

The exact Cholesky sample costs O(length^3) per composition (the generator's largest cost),
so a composition gives ``samples_per_kernel`` independent series (one factorisation, several z):
each is a distinct series, and compositions stay plentiful (a 1e8-point corpus of 1024-point
series draws ~27k of them at 4 samples each). Series that cleaning would throw away, or that
hold no signal (constant in float32, or more than ``max_flat_share`` of zero steps, the
Time-300B rule), are redrawn with a new composition, so every series written is usable.

Deterministic: group g (its composition and samples) comes from ``default_rng([seed, g])``, so
any range of groups can be produced alone, on any machine and in any number of processes, and
``generate(seed, n)`` equals the concatenation of its parts. Different seeds give different
series. Written in the Time-300B layout (``preprocessing.time300b``) under
``<out>/corpus/synthetic/<dataset>``, one dataset folder per worker (``<out>/corpus`` is the
preprocessing input), plus ``<out>/kernelsynth.json`` beside it, not inside it (the readers would
take it for data): the configuration and how many series and points each base kernel, kernel
count and operator produced. Torch is not used here (layering: preprocessing/ never imports it).

    python -m preprocessing.kernelsynth OUT --points 1.2e8 --seed 0 --workers 16
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from preprocessing.time300b import Time300BWriter

BASE_KERNELS = ("linear", "rbf", "periodic", "rational_quadratic", "white_noise")
SUMMARY_FILE = "kernelsynth.json"
CORPUS_DIR = "corpus"  # the series, under out_dir: the folder to give the preprocessing job
DOMAIN = "synthetic"


@dataclass(frozen=True)
class KernelSynthConfig:
    """What the generator draws; every choice is data, recorded in ``kernelsynth.json``."""

    length: int = 1024              # points per series (Chronos: 1024; one 1024-point window each)
    max_kernels: int = 5            # J ~ U{1, ..., max_kernels}
    samples_per_kernel: int = 4     # series per composition (one Cholesky factorisation)
    jitter: float = 1e-6            # added to K's diagonal, x10 per retry if K is not positive definite
    max_flat_share: float = 0.2     # redraw a series with more zero first differences than this
    # Hyper-parameter choices (t runs over [0, 1]; periods are given in points and divided by length).
    linear_offsets: tuple[float, ...] = (0.0, 0.5, 1.0)
    rbf_lengths: tuple[float, ...] = (0.02, 0.05, 0.1, 0.3, 1.0)
    periods_points: tuple[int, ...] = (4, 7, 12, 24, 30, 48, 52, 96, 168, 336, 365)
    periodic_lengths: tuple[float, ...] = (0.5, 1.0, 2.0)
    rq_lengths: tuple[float, ...] = (0.05, 0.2, 1.0)
    rq_alphas: tuple[float, ...] = (0.1, 1.0, 10.0)
    white_variances: tuple[float, ...] = (0.01, 0.1, 1.0)

    def __post_init__(self) -> None:
        if self.length < 16 or self.max_kernels < 1 or self.samples_per_kernel < 1:
            raise ValueError(f"kernelsynth: need length >= 16, max_kernels >= 1, samples_per_kernel >= 1; got {self}")


# ------------------------------------------------------------------------------ kernels


def base_kernel(kind: str, t_L: np.ndarray, rng: np.random.Generator, cfg: KernelSynthConfig,
                d_LL: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """One base kernel's [L, L] covariance on the time grid and a readable description.
    ``d_LL`` (t - t', computed once per group when given) is only read. The formulas are worked
    in place, one operation at a time in the textbook order, so the values are those of the
    one-line expressions in the comments, bit for bit, with one [L, L] array instead of four."""
    if d_LL is None:
        d_LL = t_L[:, None] - t_L[None, :]
    if kind == "linear":  # k = (t - c)(t' - c): a line through a random point, slope ~ N(0, 1)
        c = float(rng.choice(cfg.linear_offsets))
        return (t_L[:, None] - c) * (t_L[None, :] - c), f"linear(c={c})"
    if kind == "rbf":  # exp(-0.5 (d / l)^2)
        ell = float(rng.choice(cfg.rbf_lengths))
        k = d_LL / ell
        np.square(k, out=k)
        k *= -0.5
        return np.exp(k, out=k), f"rbf(l={ell})"
    if kind == "periodic":  # exp(-2 sin(pi |d| / p)^2 / l^2): exactly periodic, smooth within a period
        period = float(rng.choice(cfg.periods_points)) / len(t_L)
        ell = float(rng.choice(cfg.periodic_lengths))
        k = np.abs(d_LL)
        k *= np.pi
        k /= period
        np.sin(k, out=k)
        np.square(k, out=k)
        k *= -2.0
        k /= ell ** 2
        return np.exp(k, out=k), f"periodic(p={period * len(t_L):.0f},l={ell})"
    if kind == "rational_quadratic":  # (1 + d^2 / (2 a l^2))^-a: a scale mixture of RBFs, several length scales at once
        ell = float(rng.choice(cfg.rq_lengths))
        alpha = float(rng.choice(cfg.rq_alphas))
        k = np.square(d_LL)
        k /= 2.0 * alpha * ell ** 2
        k += 1.0
        return np.power(k, -alpha, out=k), f"rq(l={ell},a={alpha})"
    if kind == "white_noise":
        var = float(rng.choice(cfg.white_variances))
        return var * np.eye(len(t_L)), f"white(v={var})"
    raise ValueError(f"unknown base kernel {kind!r}; expected one of {BASE_KERNELS}")


@dataclass
class Composition:
    """A drawn kernel: its base kernels in order and the operators joining them."""

    kernels: list[str] = field(default_factory=list)   # base kernel kinds
    operators: list[str] = field(default_factory=list)  # "+" or "*", len(kernels) - 1
    text: str = ""


def random_kernel(rng: np.random.Generator, t_L: np.ndarray, cfg: KernelSynthConfig) -> tuple[np.ndarray, Composition]:
    """Steps 1 and 2: J base kernels folded left to right with random + / x."""
    n = int(rng.integers(1, cfg.max_kernels + 1))
    kinds = [str(k) for k in rng.choice(BASE_KERNELS, n)]
    d_LL = t_L[:, None] - t_L[None, :]
    K, text = base_kernel(kinds[0], t_L, rng, cfg, d_LL)
    comp = Composition(kernels=kinds)
    for kind in kinds[1:]:
        other, other_text = base_kernel(kind, t_L, rng, cfg, d_LL)
        op = "+" if rng.random() < 0.5 else "*"
        if op == "+":
            K += other
        else:
            K *= other
        comp.operators.append(op)
        text = f"({text} {op} {other_text})"
    comp.text = text
    return K, comp


def _cholesky(K: np.ndarray, jitter: float) -> np.ndarray | None:
    """Lower Cholesky factor of K + jitter I, raising the jitter up to 1e-2 of K's scale; a
    product of kernels can be numerically singular (rank-deficient linear or periodic parts).
    The jitter goes onto K's diagonal in place (K is the caller's scratch)."""
    scale = float(np.mean(np.diag(K))) or 1.0
    diagonal = np.diag_indices(len(K))
    base = K[diagonal].copy()
    for j in (jitter, jitter * 1e2, jitter * 1e4):
        K[diagonal] = base + j * scale
        try:
            return np.linalg.cholesky(K)
        except np.linalg.LinAlgError:
            continue
    return None


def usable(x: np.ndarray, max_flat_share: float) -> bool:
    """A series worth training on: not constant in float32 and with at most ``max_flat_share``
    zero steps (cleaning would drop such windows: Time-300B's rule)."""
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all() or float(np.ptp(x32)) == 0.0:
        return False
    return float(np.mean(np.diff(x32) == 0)) <= max_flat_share


def generate_group(seed: int, group: int, cfg: KernelSynthConfig) -> tuple[np.ndarray, Composition]:
    """Group ``group``'s ``samples_per_kernel`` series [S, L] and their composition (step 3).
    A composition whose factorisation fails or whose samples are not all usable is redrawn
    from the same group's generator, so the result depends only on (seed, group)."""
    rng = np.random.default_rng([seed, group])
    t_L = np.linspace(0.0, 1.0, cfg.length)
    while True:
        K, comp = random_kernel(rng, t_L, cfg)
        chol = _cholesky(K, cfg.jitter)
        if chol is None:
            continue
        x_SL = (chol @ rng.standard_normal((cfg.length, cfg.samples_per_kernel))).T
        if all(usable(x, cfg.max_flat_share) for x in x_SL):
            return x_SL, comp


def generate(seed: int, groups: range, cfg: KernelSynthConfig) -> Iterator[tuple[np.ndarray, Composition]]:
    """The groups of ``groups`` in order (each independent of the others)."""
    for g in groups:
        yield generate_group(seed, g, cfg)


# ------------------------------------------------------------------------------ writing


@dataclass
class Tally:
    """What a run wrote, by base kernel (series using it at least once), kernel count, operator."""

    series: int = 0
    points: int = 0
    compositions: int = 0
    series_with_kernel: dict[str, int] = field(default_factory=dict)
    series_by_kernel_count: dict[str, int] = field(default_factory=dict)
    operators: dict[str, int] = field(default_factory=dict)

    def add(self, comp: Composition, n_series: int, length: int) -> None:
        self.series += n_series
        self.points += n_series * length
        self.compositions += 1
        for k in set(comp.kernels):
            self.series_with_kernel[k] = self.series_with_kernel.get(k, 0) + n_series
        key = str(len(comp.kernels))
        self.series_by_kernel_count[key] = self.series_by_kernel_count.get(key, 0) + n_series
        for op, n in Counter(comp.operators).items():
            self.operators[op] = self.operators.get(op, 0) + n

    def merge(self, other: "Tally") -> None:
        self.series += other.series
        self.points += other.points
        self.compositions += other.compositions
        for mine, theirs in ((self.series_with_kernel, other.series_with_kernel),
                             (self.series_by_kernel_count, other.series_by_kernel_count),
                             (self.operators, other.operators)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


def write_part(out_dir: str, dataset: str, seed: int, groups: range, cfg: KernelSynthConfig) -> Tally:
    """Write the series of ``groups`` as one Time-300B dataset folder ``out_dir/synthetic/dataset``."""
    writer = Time300BWriter(str(Path(out_dir) / DOMAIN / dataset))
    tally = Tally()
    for x_SL, comp in generate(seed, groups, cfg):
        writer.add_many(x_SL.astype(np.float32).ravel(), np.full(len(x_SL), cfg.length))
        tally.add(comp, len(x_SL), cfg.length)
    writer.close()
    return tally


def _write_part_args(args: tuple[str, str, int, int, int, KernelSynthConfig]) -> Tally:
    out_dir, dataset, seed, start, stop, cfg = args
    return write_part(out_dir, dataset, seed, range(start, stop), cfg)


def write_corpus(out_dir: str, points: float, *, seed: int = 0, workers: int = 1, dataset: str = "kernelsynth_gp",
                 cfg: KernelSynthConfig | None = None) -> dict:
    """At least ``points`` points of KernelSynth series under ``out_dir/corpus/synthetic/<dataset>-<k>``
    (one folder per worker, each a contiguous range of groups), and ``out_dir/kernelsynth.json``.
    The same (points, seed, config) give the same series whatever ``workers`` is."""
    cfg = cfg or KernelSynthConfig()
    per_group = cfg.samples_per_kernel * cfg.length
    n_groups = max(1, math.ceil(float(points) / per_group))
    workers = max(1, min(int(workers), n_groups))
    bounds = np.linspace(0, n_groups, workers + 1).round().astype(int)
    corpus = str(Path(out_dir) / CORPUS_DIR)
    jobs = [(corpus, f"{dataset}-{k:03d}", seed, int(bounds[k]), int(bounds[k + 1]), cfg) for k in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        parts = [_write_part_args(jobs[0])]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_write_part_args, jobs))
    total = Tally()
    for part in parts:
        total.merge(part)
    summary = {"generator": "kernelsynth", "corpus": corpus, "seed": seed, "groups": n_groups, "datasets": [j[1] for j in jobs],
               "domain": DOMAIN, "config": asdict(cfg), **asdict(total),
               "seconds": round(time.perf_counter() - t0, 2)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocessing.kernelsynth", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output folder: OUT/corpus/synthetic/<dataset>-<k>/ (Time-300B layout) + OUT/kernelsynth.json")
    ap.add_argument("--points", type=float, required=True, help="at least this many points (e.g. 1.2e8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (one dataset folder each)")
    ap.add_argument("--length", type=int, default=KernelSynthConfig.length)
    ap.add_argument("--samples-per-kernel", type=int, default=KernelSynthConfig.samples_per_kernel)
    ap.add_argument("--dataset", default="kernelsynth_gp", help="dataset folder name prefix")
    args = ap.parse_args(argv)
    cfg = KernelSynthConfig(length=args.length, samples_per_kernel=args.samples_per_kernel)
    summary = write_corpus(args.out, args.points, seed=args.seed, workers=args.workers, dataset=args.dataset, cfg=cfg)
    print(json.dumps({k: summary[k] for k in ("series", "points", "compositions", "series_with_kernel", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
