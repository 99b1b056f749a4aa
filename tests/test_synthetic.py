"""The embedded default corpus (preprocessing/synthetic.py): deterministic, Time-300B layout, sane."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from preprocessing.ingest import read_series_local
from preprocessing.synthetic import generate_benchmark_corpus, generate_default_corpus, kernel_sample


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = generate_default_corpus(str(tmp_path / "a"), seed=3, scale=0.2)
    generate_default_corpus(str(tmp_path / "b"), seed=3, scale=0.2)
    generate_default_corpus(str(tmp_path / "c"), seed=4, scale=0.2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len({d["domain"] for d in a["datasets"]}) >= 6


def test_default_corpus_reads_back_in_raw_units(tmp_path):
    summary = generate_default_corpus(str(tmp_path), seed=0, scale=0.25)
    table = read_series_local([str(tmp_path)])
    assert set(table.column("quarantine_reason").to_pylist()) == {""}
    assert table.num_rows == summary["series"]
    flat = table.column("values").combine_chunks().flatten().to_numpy()
    assert len(flat) == summary["points"] and np.isfinite(flat).all()
    # normalised datasets (mean/std in meta.json) come back in raw units, not z-scores
    nature = table.filter(pc.equal(table.column("domain"), "nature"))
    means = [np.mean(v) for v in nature.column("values").to_pylist()]
    assert np.mean(np.abs(means)) > 5
    sales = table.filter(pc.equal(table.column("domain"), "sales")).column("values").to_pylist()
    assert all((np.asarray(v) >= 0).all() and (np.asarray(v) == 0).any() for v in sales)  # intermittent


def test_default_size_is_a_cpu_demo():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = generate_default_corpus(d)
    assert 300 <= s["series"] <= 500 and 1_000_000 <= s["points"] <= 3_000_000


def test_kernel_samples_match_their_covariance():
    """Random-feature RBF samples reproduce the RBF covariance (independent check)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([kernel_sample(np.random.default_rng(i), "white", 1, 8) for i in range(2)])
    assert x.shape == (2, 8)
    L, B, ell = 64, 4000, 0.1
    from preprocessing import synthetic

    t = np.linspace(0, 1, L)
    freqs = rng.standard_normal((B, 256)) / (2 * np.pi * ell)
    s = synthetic._rff(rng, t, freqs)
    emp = s.T @ s / B
    ref = np.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * ell ** 2))
    assert np.abs(emp - ref).max() < 0.12


def test_benchmark_corpus_exact_size(tmp_path):
    s = generate_benchmark_corpus(str(tmp_path), 2_000_000, seed=1)
    table = read_series_local([str(tmp_path)])
    assert s["points"] == 2_000_000
    assert len(table.column("values").combine_chunks().flatten()) == 2_000_000
