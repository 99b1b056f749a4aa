"""The scaling-law fits recover known laws from synthetic noisy points (pipeline/scaling_laws/fit.py).

References are independent of the fitting code: the ground-truth laws are written out here
in closed form, and the compute-optimal allocation is checked against a brute-force grid.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.scaling_laws import fit as F


def _power_law_points(seed: int, n: int = 14, noise: float = 0.01, E: float = 0.3, A: float = 2.0e3,
                      alpha: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    C = np.logspace(15, 20, n)
    return C, (E + A * C ** -alpha) * np.exp(rng.normal(0.0, noise, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_recovers_known_exponent(seed):
    C, y = _power_law_points(seed)
    fit = F.fit_power_law(C, y)
    assert fit.alpha == pytest.approx(0.25, abs=0.03)
    assert fit.E == pytest.approx(0.3, rel=0.05)
    # The curve, not just the parameters: within the noise at every point.
    assert np.max(np.abs(np.log(fit.predict(C) / (0.3 + 2.0e3 * C ** -0.25)))) < 0.02


def test_power_law_with_outliers_huber_beats_least_squares():
    C, y = _power_law_points(3, n=16, noise=0.005)
    y[[4, 11]] *= np.array([1.8, 0.55])  # a diverged trial and a lucky one
    huber = F.fit_power_law(C, y)
    assert huber.alpha == pytest.approx(0.25, abs=0.03)
    assert huber.E == pytest.approx(0.3, rel=0.06)
    # The same optimiser with a huge delta is least squares on log residuals: the outliers drag it.
    lsq = F.fit_power_law(C, y, delta=1e3)
    assert abs(lsq.alpha - 0.25) + abs(lsq.E - 0.3) > 3 * (abs(huber.alpha - 0.25) + abs(huber.E - 0.3))


def test_power_law_bootstrap_interval_covers_truth_and_band_brackets_fit():
    C, y = _power_law_points(4, noise=0.02)
    boot = F.bootstrap_power_law(C, y, n_boot=60, seed=1)
    iv = boot.intervals()
    assert iv["alpha"].low <= 0.25 <= iv["alpha"].high
    assert iv["alpha"].low < iv["alpha"].estimate < iv["alpha"].high
    assert iv["alpha"].high - iv["alpha"].low < 0.2
    lo, hi = boot.prediction_band(C)
    assert np.all(lo <= boot.fit.predict(C) + 1e-9) and np.all(boot.fit.predict(C) <= hi + 1e-9)


def test_power_law_rejects_bad_input_with_clear_message():
    with pytest.raises(ValueError, match=r"loss must be finite and > 0.*indices \[1\]"):
        F.fit_power_law([1e15, 1e16, 1e17], [1.0, np.nan, 0.5])
    with pytest.raises(ValueError, match="at least 3 points"):
        F.fit_power_law([1e15, 1e16], [1.0, 0.5])


def _joint_points(seed: int, noise: float = 0.005):
    # E must be a visible share of the loss in the sampled range, or no fit can identify it.
    E, A, B, a, b = 0.2, 40.0, 100.0, 0.34, 0.28
    N = np.repeat(np.logspace(5.5, 8.5, 6), 5)
    D = np.tile(np.logspace(7.5, 10.5, 5), 6)
    rng = np.random.default_rng(seed)
    y = (E + A / N ** a + B / D ** b) * np.exp(rng.normal(0.0, noise, N.size))
    return N, D, y, (E, A, B, a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_fit_recovers_known_parameters(seed):
    N, D, y, (E, A, B, a, b) = _joint_points(seed)
    fit = F.fit_joint(N, D, y)
    assert fit.a == pytest.approx(a, abs=0.03)
    assert fit.b == pytest.approx(b, abs=0.03)
    assert fit.E == pytest.approx(E, rel=0.05)
    # A and B trade off with their exponents; compare them on the log scale.
    assert np.log(fit.A) == pytest.approx(np.log(A), abs=0.2)
    assert np.log(fit.B) == pytest.approx(np.log(B), abs=0.2)


def test_joint_fit_is_exact_on_noise_free_points():
    N, D, _, (E, A, B, a, b) = _joint_points(0)
    fit = F.fit_joint(N, D, E + A / N ** a + B / D ** b)
    np.testing.assert_allclose([fit.E, fit.A, fit.B, fit.a, fit.b], [E, A, B, a, b], rtol=1e-3)


def test_joint_fit_with_outlier_stays_on_truth():
    N, D, y, (E, A, B, a, b) = _joint_points(2, noise=0.003)
    y[7] *= 2.0
    fit = F.fit_joint(N, D, y)
    assert fit.a == pytest.approx(a, abs=0.04) and fit.b == pytest.approx(b, abs=0.04)


def test_compute_optimal_matches_brute_force_grid():
    fit = F.JointFit(E=0.2, A=400.0, B=1800.0, a=0.34, b=0.28, n_points=0, objective=0.0)
    # Our FLOPs are 6N plus a per-point attention term, so fpp is affine in N.
    fpp = F.linear_flops_per_point([1e6, 1e7, 1e8], [6e6 + 2e5, 6e7 + 2e5, 6e8 + 2e5])
    budgets = [1e16, 1e18, 1e20]
    opt = F.compute_optimal(fit, fpp, budgets)
    n_grid = np.logspace(3, 12, 200_001)
    for C, n_opt, d_opt in zip(budgets, opt.n_opt, opt.d_opt):
        losses = 0.2 + 400.0 / n_grid ** 0.34 + 1800.0 / (C / (6 * n_grid + 2e5)) ** 0.28
        assert n_opt == pytest.approx(n_grid[np.argmin(losses)], rel=1e-3)
        assert (6 * n_opt + 2e5) * d_opt == pytest.approx(C, rel=1e-9)
    assert opt.n_opt[0] < opt.n_opt[1] < opt.n_opt[2]


def test_multiplier_recovers_known_flops_ratio():
    # Dense needs exactly k times the FLOPs of sparse for any loss: L_d(C) = L_s(C / k).
    k, E, A, alpha = 4.5, 0.25, 800.0, 0.2
    C = np.logspace(15, 19, 12)
    rng = np.random.default_rng(0)
    y_s = (E + A * C ** -alpha) * np.exp(rng.normal(0, 0.004, C.size))
    y_d = (E + A * (C / k) ** -alpha) * np.exp(rng.normal(0, 0.004, C.size))
    sparse = F.bootstrap_power_law(C, y_s, n_boot=40, seed=1)
    dense = F.bootstrap_power_law(C, y_d, n_boot=40, seed=2)
    m = F.multiplier_with_interval(sparse, dense, 1e17)
    assert m.estimate == pytest.approx(k, rel=0.15)
    assert m.low <= k <= m.high
    # Exact closed form on exact curves.
    exact = F.compute_multiplier(F.PowerLawFit(E, A, alpha, 0, 0), F.PowerLawFit(E, A * k ** alpha, alpha, 0, 0),
                                 np.array([1e15, 1e18]))
    np.testing.assert_allclose(exact, [k, k], rtol=1e-9)
    # A dense floor above the sparse loss: dense never gets there.
    never = F.compute_multiplier(F.PowerLawFit(0.2, A, alpha, 0, 0), F.PowerLawFit(0.5, A, alpha, 0, 0), 1e20)
    assert np.isinf(never)


def test_pareto_frontier_and_extrapolation():
    C = np.array([1.0, 2.0, 2.0, 4.0, 8.0, 8.0])
    y = np.array([5.0, 4.0, 6.0, 4.5, 3.0, 3.5])
    assert F.pareto_frontier(C, y).tolist() == [0, 1, 4]
    Cs, ys = _power_law_points(5, n=10, noise=0.002)
    ex = F.extrapolation_error(Cs, ys)
    assert ex.held_out_compute == Cs.max()
    assert abs(ex.relative_error) < 0.02
    assert ex.relative_error == pytest.approx((ex.predicted - ex.observed) / ex.observed)
