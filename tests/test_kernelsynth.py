"""KernelSynth (preprocessing/kernelsynth.py): deterministic by (seed, group), distinct across
seeds, never constant, the same series whatever the number of worker processes, counts that add
up; and the preprocessing report's provenance block (real vs generated points) over a real
preprocessing run of a KernelSynth folder plus a real corpus file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from preprocessing import kernelsynth as KS

SMALL = KS.KernelSynthConfig(length=256, samples_per_kernel=2)


def _series(root: Path) -> list[np.ndarray]:
    """Every series of a written corpus, in dataset-folder then file order."""
    out = []
    for folder in sorted((root / KS.CORPUS_DIR / KS.DOMAIN).iterdir()):
        meta = json.loads((folder / "meta.json").read_text())
        flat = np.concatenate([np.fromfile(folder / name, dtype=np.float32) for name in meta["files"]])
        out += [flat[s["offset"]:s["offset"] + s["length"]] for s in meta["scales"]]
    return out


def test_groups_are_deterministic_distinct_and_never_constant():
    a = [KS.generate_group(7, g, SMALL)[0] for g in range(12)]
    b = [KS.generate_group(7, g, SMALL)[0] for g in range(12)]
    other = [KS.generate_group(8, g, SMALL)[0] for g in range(12)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    series = np.concatenate(a)
    assert series.shape == (24, 256)
    assert len({x.astype(np.float32).tobytes() for x in np.concatenate([series, np.concatenate(other)])}) == 48
    for x in series:
        assert np.ptp(x.astype(np.float32)) > 0 and np.mean(np.diff(x.astype(np.float32)) == 0) <= 0.2
    # every base kernel gets drawn, sums and products both occur
    comps = [KS.generate_group(7, g, SMALL)[1] for g in range(60)]
    assert {k for c in comps for k in c.kernels} == set(KS.BASE_KERNELS)
    assert {op for c in comps for op in c.operators} == {"+", "*"}
    assert not KS.usable(np.ones(100), 0.2) and not KS.usable(np.repeat(np.arange(10.0), 10), 0.2)


def _reference_group(seed: int, group: int, cfg: KS.KernelSynthConfig) -> tuple[np.ndarray, int]:
    """The generator written the plain way (one expression per kernel, a fresh K + jitter I per
    try): the series of ``group`` and how many factorisations it tried."""
    rng = np.random.default_rng([seed, group])
    t_L = np.linspace(0.0, 1.0, cfg.length)
    d_LL = t_L[:, None] - t_L[None, :]
    tries = 0

    def base(kind: str) -> np.ndarray:
        if kind == "linear":
            c = float(rng.choice(cfg.linear_offsets))
            return (t_L[:, None] - c) * (t_L[None, :] - c)
        if kind == "rbf":
            ell = float(rng.choice(cfg.rbf_lengths))
            return np.exp(-0.5 * (d_LL / ell) ** 2)
        if kind == "periodic":
            period = float(rng.choice(cfg.periods_points)) / len(t_L)
            ell = float(rng.choice(cfg.periodic_lengths))
            return np.exp(-2.0 * np.sin(np.pi * np.abs(d_LL) / period) ** 2 / ell ** 2)
        if kind == "rational_quadratic":
            ell = float(rng.choice(cfg.rq_lengths))
            alpha = float(rng.choice(cfg.rq_alphas))
            return (1.0 + d_LL ** 2 / (2.0 * alpha * ell ** 2)) ** -alpha
        return float(rng.choice(cfg.white_variances)) * np.eye(len(t_L))

    while True:
        kinds = [str(k) for k in rng.choice(KS.BASE_KERNELS, int(rng.integers(1, cfg.max_kernels + 1)))]
        K = base(kinds[0])
        for kind in kinds[1:]:
            other = base(kind)
            K = K + other if rng.random() < 0.5 else K * other
        scale = float(np.mean(np.diag(K))) or 1.0
        chol = None
        for j in (cfg.jitter, cfg.jitter * 1e2, cfg.jitter * 1e4):
            tries += 1
            try:
                chol = np.linalg.cholesky(K + j * scale * np.eye(len(K)))
                break
            except np.linalg.LinAlgError:
                continue
        if chol is None:
            continue
        x_SL = (chol @ rng.standard_normal((cfg.length, cfg.samples_per_kernel))).T
        if all(KS.usable(x, cfg.max_flat_share) for x in x_SL):
            return x_SL, tries


def test_groups_equal_the_plain_formulas_bit_for_bit_retries_included():
    """The in-place kernels and jitter give exactly the series of the textbook expressions, so
    data made before and after that change are the same; groups whose first factorisation fails
    (a larger jitter or a redrawn composition) are among those compared."""
    for g in range(12):  # the study's length: every group factorises at the first try
        cfg = KS.KernelSynthConfig(length=1024)
        assert np.array_equal(KS.generate_group(0, g, cfg)[0], _reference_group(0, g, cfg)[0]), g
    # a jitter too small for the singular compositions: larger jitters and redraws happen
    tiny_jitter = KS.KernelSynthConfig(length=256, jitter=1e-18)
    tries = []
    for g in range(40):
        expected, n_tries = _reference_group(0, g, tiny_jitter)
        assert np.array_equal(KS.generate_group(0, g, tiny_jitter)[0], expected), g
        tries.append(n_tries)
    assert 1 in tries and any(1 < t <= 3 for t in tries) and any(t > 3 for t in tries)  # a redraw: > 3 tries


def test_corpus_is_the_same_with_any_number_of_workers_and_counts_add_up(tmp_path):
    one = KS.write_corpus(str(tmp_path / "one"), 9000, seed=3, workers=1, cfg=SMALL)
    two = KS.write_corpus(str(tmp_path / "two"), 9000, seed=3, workers=2, cfg=SMALL)
    s1, s2 = _series(tmp_path / "one"), _series(tmp_path / "two")
    assert len(s1) == len(s2) == one["series"] == two["series"] == 2 * one["groups"]
    assert all(np.array_equal(x, y) for x, y in zip(s1, s2))
    assert one["points"] == sum(len(x) for x in s1) >= 9000
    assert sum(one["series_by_kernel_count"].values()) == one["series"]
    assert max(one["series_with_kernel"].values()) <= one["series"] <= sum(one["series_with_kernel"].values())
    assert one["compositions"] == one["groups"]
    saved = json.loads((tmp_path / "one" / KS.SUMMARY_FILE).read_text())
    assert saved["config"]["length"] == 256 and saved["seed"] == 3 and saved["datasets"] == ["kernelsynth_gp-000"]


def test_preprocessing_report_states_the_mixture(ray_local, shared_data, tmp_path):
    from preprocessing.config import PackConfig, PreprocessConfig
    from preprocessing.job import run_preprocess

    synth = tmp_path / "synth"
    summary = KS.write_corpus(str(synth), 20000, seed=0, cfg=SMALL)
    real = shared_data / "corpus" / "synthetic" / "nab_art_daily_small_noise.csv.gz"  # real files: "real"
    cfg = PreprocessConfig(inputs=[str(synth / KS.CORPUS_DIR), str(real)], output=str(tmp_path / "out"),
                           pack=PackConfig(window_length=256, val_fraction=0.1),
                           provenance={"synthetic/kernelsynth_gp-*": "synthetic/kernelsynth"})
    rep = run_preprocess(cfg).report
    # nothing but series in the corpus folder (kernelsynth.json sits beside it)
    assert not [q for q in rep["quarantine"] if str(synth) in q["source"]]
    prov = rep["provenance"]
    assert set(prov) == {"real", "synthetic/kernelsynth"}
    assert prov["synthetic/kernelsynth"]["points_in"] == summary["points"]
    assert prov["synthetic/kernelsynth"]["series_in"] == summary["series"]
    assert prov["real"]["points_in"] == 4032
    for key in ("points_in", "points_kept", "points_val", "series_in", "series_kept", "series_val"):
        assert sum(c[key] for c in prov.values()) == rep[key], key  # the kinds add up to the totals
    assert 0 < prov["synthetic/kernelsynth"]["points_val"] < prov["synthetic/kernelsynth"]["points_kept"]
    html_text = (tmp_path / "out" / "report.html").read_text()
    assert "Provenance: real vs generated" in html_text and 'data-key="provenance.real.points_kept"' in html_text
    # the sweep reads the same block as its data mixture (training points = kept - val)
    from pipeline.scaling_laws.sweep import data_mixture

    mix = data_mixture(str(tmp_path / "out"))
    assert mix == {k: float(c["points_kept"] - c["points_val"]) for k, c in prov.items()}
    assert data_mixture(str(tmp_path / "nowhere")) == {}
