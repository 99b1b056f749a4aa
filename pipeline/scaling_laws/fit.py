"""Robust scaling-law fits: L(C), L(N, D), compute-optimal N*(C), the sparse-vs-dense compute
multiplier and extrapolation error.

Method (Hoffmann et al. 2022, "Chinchilla", approach 3, applied to every fit here):

* Fit in log space with a log-sum-exp parametrisation so every term stays positive and the
  optimiser works on O(1) numbers::

      L(C)    = E + A * C^-alpha         log L = LSE(e, a - alpha * log C)
      L(N, D) = E + A / N^a + B / D^b    log L = LSE(e, a' - a * log N, b' - b * log D)

  with ``E = exp(e)``, ``A = exp(a)``, ``B = exp(b')``.
* The objective is the Huber loss (delta 1e-3, as Hoffmann et al.) of the residuals
  ``log L_pred - log L_obs``: quadratic for small residuals, linear for outliers, so a diverged
  or badly-tuned trial pulls the fit much less than under least squares.
* Multi-start L-BFGS-B (scipy): the objective is evaluated vectorised on a grid of initial
  points, and the best few grid points are refined. C, N and D are divided by their geometric
  mean first (conditioning); the returned A, B are in raw units.
* Confidence intervals: non-parametric bootstrap over trials (resample with replacement,
  refit, take percentiles).

Everything here is pure numpy/scipy: no MLflow, no torch.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import optimize, stats
from scipy.special import logsumexp

HUBER_DELTA = 1e-3  # Hoffmann et al.'s value for residuals of log loss.


# ---------------------------------------------------------------------------------------------
# Huber objective of a log-sum-exp model, with its gradient
# ---------------------------------------------------------------------------------------------

def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lse_objective(theta: np.ndarray, design_PK: np.ndarray, offset_PK: np.ndarray,
                   log_y_P: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of ``LSE_k(offset_Pk + design_Pk . theta) - log y`` and its gradient.

    Each model term k is linear in theta: term_Pk = offset_Pk + sum_j theta_j * J_Pkj, encoded by
    ``design_PK`` of shape [P, K, J] (P points, K terms, J parameters).
    """
    terms_PK = offset_PK + np.einsum("pkj,j->pk", design_PK, theta)  # einsum: no BLAS threads
    pred_P = logsumexp(terms_PK, axis=1)
    r_P = pred_P - log_y_P
    w_PK = np.exp(terms_PK - pred_P[:, None])  # softmax over terms = d pred / d term
    dr_P = np.clip(r_P, -delta, delta)  # Huber derivative
    grad = np.einsum("p,pk,pkj->j", dr_P, w_PK, design_PK)
    return float(_huber(r_P, delta).sum()), grad


def _grid_objective(thetas_SJ: np.ndarray, design_PKJ: np.ndarray, offset_PK: np.ndarray,
                    log_y_P: np.ndarray, delta: float) -> np.ndarray:
    """The objective at many parameter vectors at once (the multi-start grid)."""
    terms_SPK = offset_PK[None] + np.einsum("pkj,sj->spk", design_PKJ, thetas_SJ)
    r_SP = logsumexp(terms_SPK, axis=2) - log_y_P[None]
    return _huber(r_SP, delta).sum(axis=1)


def _multistart(design_PKJ: np.ndarray, offset_PK: np.ndarray, log_y_P: np.ndarray,
                grid_SJ: np.ndarray, bounds: Sequence[tuple[float, float]], delta: float,
                n_refine: int, extra_starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
    """Refine the ``n_refine`` best grid points (plus ``extra_starts``) with L-BFGS-B."""
    values = _grid_objective(grid_SJ, design_PKJ, offset_PK, log_y_P, delta)
    starts = [grid_SJ[i] for i in np.argsort(values)[:n_refine]] + list(extra_starts)
    best_theta, best_value = None, math.inf
    for theta0 in starts:
        res = optimize.minimize(_lse_objective, np.asarray(theta0, dtype=float), jac=True,
                                args=(design_PKJ, offset_PK, log_y_P, delta),
                                method="L-BFGS-B", bounds=bounds)
        if res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    return best_theta, best_value


def _check_points(name: str, **arrays: np.ndarray) -> int:
    sizes = {k: np.asarray(v).shape for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    if any(s != (n,) for s in sizes.values()):
        raise ValueError(f"{name}: inputs must be 1-D arrays of equal length, got shapes {sizes}")
    for k, v in arrays.items():
        v = np.asarray(v, dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            raise ValueError(f"{name}: {k} must be finite and > 0; bad values at indices "
                             f"{np.flatnonzero(bad).tolist()}: {v[bad].tolist()}")
    return n


# ---------------------------------------------------------------------------------------------
# L(C) = E + A * C^-alpha
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A * C^-alpha, with A in raw units of C."""

    E: float
    A: float
    alpha: float
    n_points: int
    objective: float

    def predict(self, C: np.ndarray | float) -> np.ndarray:
        # Computed in log space: A * C^-alpha under/overflows for realistic C (1e12-1e22).
        C = np.asarray(C, dtype=float)
        return self.E + np.exp(math.log(self.A) - self.alpha * np.log(C))

    def compute_for_loss(self, loss: np.ndarray | float) -> np.ndarray:
        """Inverse: the C at which this curve reaches ``loss`` (inf where loss <= E)."""
        loss = np.asarray(loss, dtype=float)
        gap = loss - self.E
        # A loss just above E with a small alpha needs more compute than a float holds: inf is
        # the answer there, as it is where the loss is at or below E.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = np.exp((math.log(self.A) - np.log(gap)) / self.alpha)
        return np.where(gap > 0, out, np.inf)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], *, delta: float = HUBER_DELTA,
                  n_refine: int = 8, init: PowerLawFit | None = None) -> PowerLawFit:
    """Robust fit of ``L(C) = E + A * C^-alpha`` (Huber on log residuals, multi-start L-BFGS)."""
    n = _check_points("fit_power_law", compute=np.asarray(compute), loss=np.asarray(loss))
    if n < 3:
        raise ValueError(f"fit_power_law: need at least 3 points for 3 parameters, got {n}")
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    log_c0 = float(np.mean(np.log(C)))
    x = np.log(C) - log_c0
    # theta = (e, a, alpha); term 0 = e, term 1 = a - alpha * x.
    design = np.zeros((n, 2, 3))
    design[:, 0, 0] = 1.0
    design[:, 1, 1] = 1.0
    design[:, 1, 2] = -x
    offset = np.zeros((n, 2))
    ly = np.log(y)
    lo = float(ly.min())
    grid = np.array(list(itertools.product(
        lo + np.array([-4.0, -2.0, -1.0, -0.5, -0.2, -0.05]),            # e
        float(np.log(np.ptp(y) + 1e-12)) + np.array([-2.0, -1.0, 0.0, 1.0, 2.0]),  # a
        np.array([0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5]),                 # alpha
    )))
    extra = []
    if init is not None:
        extra.append(np.array([math.log(init.E), math.log(init.A) - init.alpha * log_c0, init.alpha]))
    bounds = [(lo - 20.0, lo + 5.0), (-50.0, 50.0), (1e-4, 5.0)]
    theta, value = _multistart(design, offset, ly, grid, bounds, delta, n_refine, extra)
    e, a, alpha = (float(v) for v in theta)
    # Undo the normalisation: A' (C/C0)^-alpha = A' C0^alpha C^-alpha.
    return PowerLawFit(E=math.exp(e), A=math.exp(a + alpha * log_c0), alpha=alpha,
                       n_points=n, objective=value)


# ---------------------------------------------------------------------------------------------
# L(N, D) = E + A / N^a + B / D^b
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JointFit:
    """Chinchilla's parametric loss L(N, D) = E + A / N^a + B / D^b (raw units of N and D)."""

    E: float
    A: float
    B: float
    a: float
    b: float
    n_points: int
    objective: float

    def predict(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return (self.E + np.exp(math.log(self.A) - self.a * np.log(N))
                + np.exp(math.log(self.B) - self.b * np.log(D)))

    def to_dict(self) -> dict:
        return asdict(self)


def fit_joint(n_params: Sequence[float], n_points: Sequence[float], loss: Sequence[float], *,
              delta: float = HUBER_DELTA, n_refine: int = 10,
              init: JointFit | None = None) -> JointFit:
    """Robust fit of ``L(N, D) = E + A/N^a + B/D^b`` in log space (Hoffmann et al. approach 3)."""
    k = _check_points("fit_joint", n_params=np.asarray(n_params), n_points=np.asarray(n_points),
                      loss=np.asarray(loss))
    if k < 5:
        raise ValueError(f"fit_joint: need at least 5 points for 5 parameters, got {k}")
    N = np.asarray(n_params, dtype=float)
    D = np.asarray(n_points, dtype=float)
    y = np.asarray(loss, dtype=float)
    log_n0, log_d0 = float(np.mean(np.log(N))), float(np.mean(np.log(D)))
    xn, xd = np.log(N) - log_n0, np.log(D) - log_d0
    # theta = (e, a', b', a, b); terms: e | a' - a xn | b' - b xd.
    design = np.zeros((k, 3, 5))
    design[:, 0, 0] = 1.0
    design[:, 1, 1] = 1.0
    design[:, 1, 3] = -xn
    design[:, 2, 2] = 1.0
    design[:, 2, 4] = -xd
    offset = np.zeros((k, 3))
    ly = np.log(y)
    lo = float(ly.min())
    scale = float(np.log(np.ptp(y) + 1e-12))
    grid = np.array(list(itertools.product(
        lo + np.array([-3.0, -1.0, -0.3, -0.05]),
        scale + np.array([-2.0, -0.7, 0.7]),
        scale + np.array([-2.0, -0.7, 0.7]),
        np.array([0.1, 0.3, 0.7, 1.5]),
        np.array([0.1, 0.3, 0.7, 1.5]),
    )))
    extra = []
    if init is not None:
        extra.append(np.array([math.log(init.E), math.log(init.A) - init.a * log_n0,
                               math.log(init.B) - init.b * log_d0, init.a, init.b]))
    bounds = [(lo - 20.0, lo + 5.0), (-50.0, 50.0), (-50.0, 50.0), (1e-4, 5.0), (1e-4, 5.0)]
    theta, value = _multistart(design, offset, ly, grid, bounds, delta, n_refine, extra)
    e, a_, b_, a, b = (float(v) for v in theta)
    return JointFit(E=math.exp(e), A=math.exp(a_ + a * log_n0), B=math.exp(b_ + b * log_d0),
                    a=a, b=b, n_points=k, objective=value)


# ---------------------------------------------------------------------------------------------
# Compute-optimal allocation
# ---------------------------------------------------------------------------------------------

FlopsPerPoint = Callable[[np.ndarray], np.ndarray]


def linear_flops_per_point(n_params: Sequence[float], flops_per_point: Sequence[float]) -> FlopsPerPoint:
    """Interpolate our FLOPs function between model sizes: fpp(N) = c1 * N + c0.

    The per-point training FLOPs of each trial come from ``model.flops`` (6N plus the attention
    term for the window length); a least-squares line through the grid's (N, fpp) pairs lets
    the compute-optimal search move continuously in N. c0 is floored at 0 so D stays finite.
    """
    N = np.asarray(n_params, dtype=float)
    f = np.asarray(flops_per_point, dtype=float)
    if len(np.unique(N)) >= 2:
        c1, c0 = np.polyfit(N, f, 1)
    else:
        c1, c0 = float(f[0] / N[0]), 0.0
    c1, c0 = float(c1), max(float(c0), 0.0)
    return lambda n: c1 * np.asarray(n, dtype=float) + c0


@dataclass(frozen=True)
class ComputeOptimal:
    compute: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_optimal(fit: JointFit, flops_per_point: FlopsPerPoint, compute: Sequence[float],
                    n_bounds: tuple[float, float] = (1e3, 1e13)) -> ComputeOptimal:
    """N*(C) = argmin_N L(N, C / fpp(N)): for each budget C, D is derived from C and N through
    the FLOPs function, and the fitted loss is minimised over log N (bounded scalar search)."""
    out_n, out_d, out_l = [], [], []
    lo, hi = math.log(n_bounds[0]), math.log(n_bounds[1])
    for C in compute:
        def loss_at(log_n: float) -> float:
            n = math.exp(log_n)
            return float(fit.predict(n, C / float(flops_per_point(n))))

        res = optimize.minimize_scalar(loss_at, bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-6})
        n = math.exp(res.x)
        out_n.append(n)
        out_d.append(C / float(flops_per_point(n)))
        out_l.append(float(res.fun))
    return ComputeOptimal(compute=[float(c) for c in compute], n_opt=out_n, d_opt=out_d, loss_opt=out_l)


def iso_flop_curve(fit: JointFit, flops_per_point: FlopsPerPoint, compute: float,
                   n_grid: np.ndarray) -> np.ndarray:
    """Fitted loss along one iso-FLOP line: L(N, C / fpp(N)) for each N of ``n_grid``."""
    n_grid = np.asarray(n_grid, dtype=float)
    return fit.predict(n_grid, compute / flops_per_point(n_grid))


# ---------------------------------------------------------------------------------------------
# Frontier, multiplier, extrapolation, bootstrap
# ---------------------------------------------------------------------------------------------

def pareto_frontier(compute: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices of the compute-efficient frontier: trials no cheaper-or-equal trial beats.

    L(C) describes the best loss reachable with C, so it is fitted on the frontier of a
    sizes x budgets grid, not on the under-trained or over-trained corners of the grid.
    """
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    order = np.lexsort((y, C))
    keep, best = [], math.inf
    for i in order:
        if y[i] < best:
            keep.append(int(i))
            best = y[i]
    return np.array(sorted(keep, key=lambda i: C[i]), dtype=int)


def compute_multiplier(sparse: PowerLawFit, dense: PowerLawFit,
                       compute: np.ndarray | float) -> np.ndarray:
    """How many times more FLOPs the dense family needs to reach the loss the sparse family
    reaches at ``compute``: C_dense(L_sparse(C)) / C. inf where the dense fit's floor E is at or
    above that loss (it never gets there)."""
    compute = np.asarray(compute, dtype=float)
    return dense.compute_for_loss(sparse.predict(compute)) / compute


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


def _interval(estimate: float, samples: np.ndarray, level: float) -> Interval:
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return Interval(float(estimate), math.nan, math.nan)
    q = (1.0 - level) / 2.0
    # "inverted_cdf" so infinite samples (dense never reaches the loss) give an inf bound, not nan.
    lo, hi = np.quantile(samples, [q, 1.0 - q], method="inverted_cdf")
    return Interval(float(estimate), float(lo), float(hi))


@dataclass
class PowerLawBootstrap:
    fit: PowerLawFit
    samples: list[PowerLawFit] = field(default_factory=list)
    level: float = 0.9

    def intervals(self) -> dict[str, Interval]:
        return {p: _interval(getattr(self.fit, p), np.array([getattr(s, p) for s in self.samples]), self.level)
                for p in ("E", "A", "alpha")}

    def prediction_band(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap curves at ``C``."""
        curves = np.stack([s.predict(C) for s in self.samples])
        q = (1.0 - self.level) / 2.0
        return np.quantile(curves, q, axis=0), np.quantile(curves, 1.0 - q, axis=0)


def bootstrap_power_law(compute: Sequence[float], loss: Sequence[float], *, n_boot: int = 200,
                        level: float = 0.9, seed: int = 0, delta: float = HUBER_DELTA) -> PowerLawBootstrap:
    """Fit L(C), then refit on ``n_boot`` resamples of the points (with replacement); resamples
    with fewer than 3 distinct points are redrawn. Each refit also starts from the full fit."""
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    best = fit_power_law(C, y, delta=delta)
    rng = np.random.default_rng(seed)
    out = PowerLawBootstrap(fit=best, level=level)
    while len(out.samples) < n_boot:
        idx = rng.integers(0, len(C), len(C))
        if len(np.unique(C[idx])) < 3:
            continue
        out.samples.append(fit_power_law(C[idx], y[idx], delta=delta, n_refine=3, init=best))
    return out


def bootstrap_joint(n_params: Sequence[float], n_points: Sequence[float], loss: Sequence[float], *,
                    n_boot: int = 100, level: float = 0.9, seed: int = 0,
                    delta: float = HUBER_DELTA) -> tuple[JointFit, list[JointFit]]:
    """Fit L(N, D) and refit it on ``n_boot`` resamples of the trials."""
    N, D, y = (np.asarray(v, dtype=float) for v in (n_params, n_points, loss))
    best = fit_joint(N, D, y, delta=delta)
    rng = np.random.default_rng(seed)
    samples: list[JointFit] = []
    while len(samples) < n_boot:
        idx = rng.integers(0, len(N), len(N))
        if len(np.unique(idx)) < 5:
            continue
        samples.append(fit_joint(N[idx], D[idx], y[idx], delta=delta, n_refine=3, init=best))
    return best, samples


def multiplier_with_interval(sparse: PowerLawBootstrap, dense: PowerLawBootstrap,
                             compute: float) -> Interval:
    """The compute multiplier at ``compute`` with a bootstrap interval: the two families were
    resampled independently, so sample i pairs sparse draw i with dense draw i."""
    est = float(compute_multiplier(sparse.fit, dense.fit, compute))
    n = min(len(sparse.samples), len(dense.samples))
    draws = np.array([float(compute_multiplier(sparse.samples[i], dense.samples[i], compute))
                      for i in range(n)])
    return _interval(est, draws, min(sparse.level, dense.level))


@dataclass(frozen=True)
class Extrapolation:
    """Fit without the largest-compute trial, then predict it."""

    held_out_compute: float
    observed: float
    predicted: float
    relative_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def extrapolation_error(compute: Sequence[float], loss: Sequence[float], *,
                        delta: float = HUBER_DELTA) -> Extrapolation:
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if len(C) < 4:
        raise ValueError(f"extrapolation_error: need at least 4 points (3 to fit + 1 held out), got {len(C)}")
    last = int(np.argmax(C))
    keep = np.arange(len(C)) != last
    fit = fit_power_law(C[keep], y[keep], delta=delta)
    pred = float(fit.predict(C[last]))
    return Extrapolation(held_out_compute=float(C[last]), observed=float(y[last]), predicted=pred,
                         relative_error=(pred - float(y[last])) / float(y[last]))


# ---------------------------------------------------------------------------------------------
# Seeds: cells of repeated trials, the seed bootstrap, the budget that would settle a comparison
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedCell:
    """One (size, budget) cell of a family: the same trial trained with several seeds."""

    compute: float            # training FLOPs (equal for every seed of the cell)
    losses: tuple[float, ...]  # one per seed

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def spread(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        return float(np.std(self.losses, ddof=1)) if len(self.losses) > 1 else 0.0


def seed_noise_log(cells: Sequence[SeedCell]) -> float:
    """Pooled within-cell standard deviation of log loss over the cells with >= 2 seeds (the
    run-to-run noise of one trial, as a relative error); NaN when no cell has 2 seeds."""
    num, dof = 0.0, 0
    for c in cells:
        if len(c.losses) > 1:
            ly = np.log(np.asarray(c.losses, dtype=float))
            num += float(((ly - ly.mean()) ** 2).sum())
            dof += len(ly) - 1
    return math.sqrt(num / dof) if dof else math.nan


def bootstrap_power_law_cells(cells: Sequence[SeedCell], *, n_boot: int = 200, level: float = 0.9,
                              seed: int = 0, delta: float = HUBER_DELTA) -> tuple[PowerLawBootstrap, str]:
    """L(C) fitted to the cells' mean losses, with a bootstrap that resamples SEEDS WITHIN CELLS.

    The cells are the grid's design (chosen sizes and budgets), not random draws; what is random
    is the training run, so each draw replaces every cell's seeds by a resample of them (with
    replacement) and refits on the resampled means. Seeds are never treated as extra budgets.
    Cells with one seed contribute no noise; if no cell has two seeds there is nothing to
    resample, and the draws resample the cells instead (the bootstrap over trials of a sweep
    without seeds). Returns (bootstrap, method: "seeds_within_cells" | "cells")."""
    C = np.array([c.compute for c in cells], dtype=float)
    means = np.array([c.mean for c in cells], dtype=float)
    if not any(len(c.losses) > 1 for c in cells):
        return bootstrap_power_law(C, means, n_boot=n_boot, level=level, seed=seed, delta=delta), "cells"
    best = fit_power_law(C, means, delta=delta)
    rng = np.random.default_rng(seed)
    out = PowerLawBootstrap(fit=best, level=level)
    losses = [np.asarray(c.losses, dtype=float) for c in cells]
    for _ in range(n_boot):
        draw = np.array([ls[rng.integers(0, len(ls), len(ls))].mean() for ls in losses])
        out.samples.append(fit_power_law(C, draw, delta=delta, n_refine=3, init=best))
    return out, "seeds_within_cells"


@dataclass(frozen=True)
class ResolvingBudget:
    """How much more training a multiplier whose interval includes 1 would need to exclude it."""

    seeds_per_cell: float | None   # seeds per cell at which the interval would exclude 1; None: never
    factor: float | None           # seeds_per_cell / the seeds measured (= factor on the sweep's FLOPs)
    training_flops: float | None   # the two families' trials' FLOPs times ``factor``
    n_seeds: int                   # seeds per cell measured (the smallest over the cells)
    assumption: str = ("the interval comes from seed noise (seeds resampled within cells), so its "
                       "half-width in log multiplier shrinks as 1 / sqrt(seeds per cell); the estimate "
                       "and the grid (sizes, budgets) stay as measured. More budget per cell does not "
                       "shrink seed noise, and the gap between the curves narrows as losses approach E, "
                       "so the projection is in seeds, i.e. in total sweep FLOPs")

    def to_dict(self) -> dict:
        return asdict(self)


def seeds_to_exclude_one(interval: Interval, n_seeds: int, sweep_flops: float) -> ResolvingBudget:
    """The seeds per cell at which ``interval`` (a multiplier's, from the seed bootstrap with
    ``n_seeds`` seeds per cell) would exclude 1: the half-width on the side of 1, in log space,
    times sqrt(n / n*) must fall below |log estimate|. None where the estimate is 1 or not finite."""
    est, lo, hi = interval.estimate, interval.low, interval.high
    never = ResolvingBudget(None, None, None, int(n_seeds))
    if not all(math.isfinite(v) and v > 0 for v in (est, lo, hi)) or est == 1.0:
        return never
    gap = abs(math.log(est))
    half = (math.log(est) - math.log(lo)) if est > 1.0 else (math.log(hi) - math.log(est))
    if half <= gap:  # already excludes 1
        return ResolvingBudget(float(n_seeds), 1.0, float(sweep_flops), int(n_seeds))
    need = math.ceil(n_seeds * (half / gap) ** 2)
    factor = need / n_seeds
    return ResolvingBudget(float(need), float(factor), float(sweep_flops * factor), int(n_seeds))


@dataclass(frozen=True)
class CellDifference:
    """One sparse cell against the dense cell of the same training FLOPs (same active parameters,
    same points): the relative held-out difference, ``mean_sparse / mean_dense - 1`` (negative:
    sparse better), with a Welch t interval from the two cells' seed spreads."""

    relative: float                 # estimate
    low: float                      # interval ends (relative)
    high: float
    level: float
    df: float                       # Welch-Satterthwaite degrees of freedom
    n_sparse: int
    n_dense: int
    seeds_to_separate: int | None   # seeds per cell at which the interval would exclude 0 (same spreads)

    @property
    def excludes_0(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"excludes_0": self.excludes_0}


def _welch(var_a: float, n_a: int, var_b: float, n_b: int) -> tuple[float, float]:
    """Standard error of a difference of two means and its Welch-Satterthwaite df."""
    va, vb = var_a / n_a, var_b / n_b
    se2 = va + vb
    if se2 == 0.0:
        return 0.0, math.inf
    return math.sqrt(se2), se2 ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))


def _t_quantile(level: float, df: float) -> float:
    """The two-sided ``level`` quantile of Student's t (the normal's for infinite df)."""
    p = 0.5 + level / 2
    return float(stats.t.ppf(p, df)) if math.isfinite(df) else float(stats.norm.ppf(p))


def cell_difference(sparse_losses: Sequence[float], dense_losses: Sequence[float], level: float = 0.9,
                    max_seeds: int = 1000) -> CellDifference | None:
    """How a sparse cell's loss compares with the dense cell at the same FLOPs, with the interval
    the seed noise allows: Welch's t on the two cells' seeds (each cell needs two or more), taken
    relative to the dense mean. ``seeds_to_separate``: the smallest seed count per cell at which,
    with the same estimate and spreads, the interval would exclude 0 (None beyond ``max_seeds``
    or when the estimate is 0). None when either cell has fewer than two seeds."""
    a, b = np.asarray(sparse_losses, dtype=float), np.asarray(dense_losses, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    diff, ref = float(a.mean() - b.mean()), float(b.mean())
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    se, df = _welch(va, len(a), vb, len(b))
    half = _t_quantile(level, df) * se
    need: int | None = None
    if diff != 0.0:
        for n in range(2, max_seeds + 1):
            se_n, df_n = _welch(va, n, vb, n)
            if _t_quantile(level, df_n) * se_n < abs(diff):
                need = n
                break
    return CellDifference(diff / ref, (diff - half) / ref, (diff + half) / ref, level, float(df), len(a), len(b), need)
