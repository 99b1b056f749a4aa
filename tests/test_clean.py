"""Cleaning rules (Time-300B Algorithm 2) on hand-made series, plus a slow reference."""
from __future__ import annotations

import numpy as np
import pytest

from preprocessing.clean import (
    REASON_DIFF1,
    REASON_DIFF2,
    REASON_MIN_LENGTH,
    REASON_NONFINITE,
    REASON_PARTIAL,
    REASON_SHORT_RUN,
    REASON_ZEROS,
    clean_series,
    finite_runs,
    reference_clean,
)
from preprocessing.config import CleanConfig


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(5.0, 1.0, n).astype(np.float32)


def check_accounting(x: np.ndarray, result) -> None:
    assert result.kept_points + sum(result.dropped.values()) == len(x)


def test_clean_series_keeps_good_series_whole():
    x = noise(1000)
    r = clean_series(x, CleanConfig())
    assert r.runs == [(0, 1000)] and r.dropped == {}


def test_nan_split_drops_only_nan_points_and_short_sides():
    x = noise(1000)
    x[300] = np.nan
    x[301] = np.inf
    r = clean_series(x, CleanConfig())
    # [0,300) and [302,1000) are separate runs; both >= 256.
    assert r.runs == [(0, 300), (302, 1000)]
    assert r.dropped == {REASON_NONFINITE: 2}
    x[200] = np.nan  # left part becomes [0,200) -> too short, and [201,300) too short
    r = clean_series(x, CleanConfig())
    assert r.runs == [(302, 1000)]
    assert r.dropped == {REASON_NONFINITE: 3, REASON_SHORT_RUN: 200 + 99}
    check_accounting(x, r)


def _window_with_zeros(count: int, seed: int = 1) -> np.ndarray:
    w = noise(128, seed)
    # isolated zeros at even spacing: no two equal neighbours, so only the zero rule fires
    idx = np.arange(count) * 4 + 1
    w[idx] = 0.0
    return w


def _window_with_flat_steps(count: int, seed: int = 2) -> np.ndarray:
    """``count`` zero first differences, no zeros, no zero lag-2 differences."""
    w = noise(128, seed) + 100
    for j in range(count):
        i = 4 * j + 1
        w[i + 1] = w[i]
    return w


def _window_with_lag2_repeats(count: int, seed: int = 3) -> np.ndarray:
    """``count`` zero lag-2 differences (x[i+2] == x[i], x[i+1] different), nothing else."""
    w = noise(128, seed) + 100
    for j in range(count):
        i = 5 * j
        w[i + 2] = w[i]
    return w


@pytest.mark.parametrize(
    "builder, reason",
    [(_window_with_zeros, REASON_ZEROS), (_window_with_flat_steps, REASON_DIFF1), (_window_with_lag2_repeats, REASON_DIFF2)],
)
def test_each_window_rule_triggers_alone(builder, reason):
    cfg = CleanConfig(min_run_length=128, min_series_length=0)
    good = noise(256, 9) + 100
    # 25/128 = 0.195 passes, 26/128 = 0.203 fails; diff1 denominators 127, diff2 126.
    limit = {REASON_ZEROS: 25, REASON_DIFF1: 25, REASON_DIFF2: 25}[reason]
    ok_window = builder(limit)
    bad_window = builder(limit + 1)
    x_ok = np.concatenate([good, ok_window])
    x_bad = np.concatenate([good, bad_window])
    assert clean_series(x_ok, cfg).runs == [(0, 384)]
    r = clean_series(x_bad, cfg)
    assert r.runs == [(0, 256)]
    assert r.dropped == {reason: 128}


def test_threshold_edge_exactly_point_two_is_kept():
    cfg = CleanConfig(window=10, min_run_length=10, min_series_length=0)
    base = np.arange(1, 11, dtype=np.float32)
    two = base.copy()
    two[[1, 5]] = 0  # 2/10 = 0.2 -> kept (rule is "exceeds")
    three = base.copy()
    three[[1, 5, 8]] = 0  # 0.3 -> dropped
    assert clean_series(two, cfg).runs == [(0, 10)]
    assert clean_series(three, cfg).runs == []
    assert clean_series(three, cfg).dropped == {REASON_ZEROS: 10}


def test_bad_window_splits_run_and_short_joined_runs_are_dropped():
    cfg = CleanConfig()
    x = noise(128 * 6, 4)
    x[128 * 2: 128 * 3] = 0.0  # window 2 dead -> runs [0,256) and [384,768)
    r = clean_series(x, cfg)
    assert r.runs == [(0, 256), (384, 768)]
    assert r.dropped == {REASON_ZEROS: 128}
    x[128 * 4: 128 * 5] = 0.0  # now right side [384,512) and [640,768) are 128 each -> short
    r = clean_series(x, cfg)
    assert r.runs == [(0, 256)]
    assert r.dropped == {REASON_ZEROS: 256, REASON_SHORT_RUN: 256}
    check_accounting(x, r)


def test_partial_tail_window_policy():
    x = noise(300, 5)
    assert clean_series(x, CleanConfig()).runs == [(0, 300)]
    r = clean_series(x, CleanConfig(partial_window="drop"))
    assert r.runs == [(0, 256)] and r.dropped == {REASON_PARTIAL: 44}
    x[260:] = 0.0  # tail of 44 points mostly zeros -> fails the check
    r = clean_series(x, CleanConfig())
    assert r.runs == [(0, 256)] and r.dropped == {REASON_ZEROS: 44}


def test_min_series_length_and_constant_series():
    assert clean_series(noise(100), CleanConfig()).dropped == {REASON_MIN_LENGTH: 100}
    flat = np.full(1000, 3.0, dtype=np.float32)  # every diff is zero
    r = clean_series(flat, CleanConfig())
    assert r.runs == [] and r.dropped == {REASON_DIFF1: 1000}


def test_rules_can_be_switched_off():
    flat = np.full(1000, 3.0, dtype=np.float32)
    r = clean_series(flat, CleanConfig(window_rules=False))
    assert r.runs == [(0, 1000)]


def test_finite_runs():
    x = np.array([np.nan, 1, 2, np.inf, 3, np.nan], dtype=np.float32)
    assert finite_runs(x) == [(1, 3), (4, 5)]
    assert finite_runs(np.zeros(0, np.float32)) == []


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference_on_messy_random_series(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 3000))
    # piecewise: noise, zero stretches, flat stretches, NaN gaps, integer-valued counts
    x = rng.normal(0, 1, n).astype(np.float32)
    for _ in range(rng.integers(1, 8)):
        a = int(rng.integers(0, n))
        b = min(n, a + int(rng.integers(5, 200)))
        kind = rng.integers(0, 4)
        if kind == 0:
            x[a:b] = 0
        elif kind == 1:
            x[a:b] = 7.0
        elif kind == 2:
            x[a:b] = np.nan
        else:
            x[a:b] = rng.integers(0, 3, b - a)
    for cfg in (CleanConfig(), CleanConfig(partial_window="drop"), CleanConfig(window=16, min_run_length=40, min_series_length=0)):
        r = clean_series(x, cfg)
        assert r.runs == reference_clean(x, cfg)
        check_accounting(x, r)
