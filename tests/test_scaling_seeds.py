"""The seed axis in the fits and the report: per-cell mean and spread, the compute multiplier of
each sparse family over dense with a bootstrap that resamples seeds within cells, the seeds that
would settle an inconclusive multiplier, and each family's routing balance. Synthetic records
drawn from a known law with a known multiplier plus seed noise."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.scaling_laws import fit as F
from pipeline.scaling_laws import report as R

sys.path.insert(0, str(Path(__file__).parent))
from _browser import assert_matches, json_value  # noqa: E402
from _helpers_scaling import BALANCE, seeded_trials  # noqa: E402


def test_multiplier_of_each_sparse_family_covers_the_truth():
    records = seeded_trials({"sparse": 3.0, "sparse_per_layer": 6.0}, seeds=3, noise=0.01)
    fits = R.fit_records(records, n_boot=40, joint=False)
    for fam, truth in (("sparse", 3.0), ("sparse_per_layer", 6.0)):
        m = fits["multipliers"][fam]
        h = m["headline"]
        assert m["interval_method"] == "seeds_within_cells"
        assert h["low"] <= truth <= h["high"], (fam, h)
        assert h["estimate"] == pytest.approx(truth, rel=0.3)
        assert m["excludes_1"] and "resolving_budget" not in m
        # the headline sits at the largest compute both families cover
        assert m["compute"][-1] == pytest.approx(max(r.training_flops for r in records))
    assert fits["multiplier"] == fits["multipliers"]["sparse"]  # the paper's pair under its old key
    # the training cost saved at equal loss, 1 - 1/m, beside the paper's 78%: 2/3 and 5/6 here
    for fam, truth in (("sparse", 3.0), ("sparse_per_layer", 6.0)):
        m = fits["multipliers"][fam]
        sv = m["training_cost_saving"]
        assert sv["estimate"] == pytest.approx(1 - 1 / m["headline"]["estimate"])
        assert sv["low"] <= 1 - 1 / truth <= sv["high"] and sv["paper"] == 0.78
    line = next(x for x in R.multiplier_lines(fits) if x.startswith("sparse:"))
    sv = fits["multipliers"]["sparse"]["training_cost_saving"]
    assert f"training cost saved at equal heldout_loss: {sv['estimate']:.0%}" in line and "the paper: 78%" in line
    # one point per cell: 2 sizes x 3 budgets, each the mean of its 3 seeds, with their spread
    cells = fits["families"]["dense"]["cells"]
    assert len(cells) == 6 and all(c["n_seeds"] == 3 and c["seeds"] == [0, 1, 2] for c in cells)
    for c in cells:
        ys = [r.heldout_loss for r in records if r.family == "dense" and r.size == c["size"]
              and r.points_seen == c["points_seen"]]
        assert c["mean"] == pytest.approx(np.mean(ys)) and c["spread"] == pytest.approx(np.std(ys, ddof=1))
    assert fits["families"]["dense"]["seed_noise_log"] == pytest.approx(0.01, rel=0.5)


def test_seed_bootstrap_measures_seed_noise_not_scatter_between_cells():
    """Seeds that agree exactly leave nothing to resample: the interval collapses to the
    estimate even where the cells scatter around the law. The old bootstrap over trials (seeds
    taken for independent points) would report that scatter as uncertainty."""
    records = seeded_trials({"sparse": 3.0}, seeds=2, noise=0.0)
    rng = np.random.default_rng(5)
    bump = {}
    for r in records:  # the same offset for both seeds of a cell, different between cells
        key = (r.family, r.size, r.points_seen)
        bump.setdefault(key, float(np.exp(rng.normal(0, 0.03))))
        r.heldout_loss *= bump[key]
    fits = R.fit_records(records, n_boot=20, joint=False)
    h = fits["multipliers"]["sparse"]["headline"]
    # (the refits agree with the fit up to the optimiser's tolerance)
    assert h["low"] == pytest.approx(h["estimate"], rel=0.01) and h["high"] == pytest.approx(h["estimate"], rel=0.01)
    trials = {fam: F.bootstrap_power_law([r.training_flops for r in records if r.family == fam],
                                         [r.heldout_loss for r in records if r.family == fam], n_boot=20)
              for fam in ("sparse", "dense")}
    as_trials = F.multiplier_with_interval(trials["sparse"], trials["dense"], fits["multipliers"]["sparse"]["compute"][-1])
    assert as_trials.high / as_trials.low > 1.2


def test_inconclusive_multiplier_states_the_seeds_that_would_settle_it(tmp_path):
    records = seeded_trials({"sparse": 1.3, "sparse_per_layer": 1.0}, seeds=2, noise=0.04, seed=3)
    files = R.build_report(records, tmp_path, n_boot=30)
    fits = json.loads(files.fits_json.read_text())
    sp = fits["multipliers"]["sparse"]
    h = sp["headline"]
    assert h["low"] <= 1.0 <= h["high"] and not sp["excludes_1"]
    rb = sp["resolving_budget"]
    expected = F.seeds_to_exclude_one(F.Interval(h["estimate"], h["low"], h["high"]), 2,
                                      sum(r.training_flops for r in records if r.family in ("sparse", "dense")))
    assert rb["seeds_per_cell"] == expected.seeds_per_cell > 2 and rb["factor"] > 1
    md = files.table_md.read_text()
    assert f"with {rb['seeds_per_cell']:.0f} seeds per cell instead of 2" in md and "assuming" in md
    # the cells table shows mean and spread over the seeds; the plot has error bars (a PNG)
    assert "## Cells (mean and spread over seeds)" in md and files.loss_vs_flops_png.stat().st_size > 5000
    page = files.page_html.read_text()
    assert "Cells: mean and spread over seeds" in page and "Training data mixture" in page
    assert "synthetic/kernelsynth" in md and fits["data_mixtures"][0]["trials"] == len(records)


def test_routing_balance_is_reported_per_family():
    records = seeded_trials({"sparse": 2.0, "sparse_per_layer": 2.0}, seeds=2, layers=3)
    fits = R.fit_records(records, n_boot=10, joint=False)
    routing = fits["routing"]
    assert set(routing) == {"sparse", "sparse_per_layer"}  # dense has no router
    for fam, level in BALANCE.items():
        r = routing[fam]
        assert len(r["per_layer"]) == 3 and r["n_trials"] == 12
        assert r["mean"] == pytest.approx(level, abs=0.05)
        assert r["train_mean"] == pytest.approx(level + 0.1, abs=0.05)
        assert r["min_layer"] <= r["mean"] <= r["max_layer"] <= r["worst_trial_layer"]
    rows = R._routing_rows(fits)
    assert [row[0] for row in rows] == ["sparse", "sparse_per_layer"]


def test_seeds_to_exclude_one_projection():
    # estimate 1.2 in [0.9, 1.6] with 2 seeds: the low side is log(1.2/0.9) = 0.288 wide, the gap
    # to 1 is log 1.2 = 0.182: (0.288 / 0.182)^2 = 2.49 times the seeds -> 5 seeds per cell.
    rb = F.seeds_to_exclude_one(F.Interval(1.2, 0.9, 1.6), 2, 1e18)
    assert rb.seeds_per_cell == 5 and rb.factor == 2.5 and rb.training_flops == pytest.approx(2.5e18)
    below = F.seeds_to_exclude_one(F.Interval(0.8, 0.5, 1.1), 2, 1e18)  # the high side faces 1
    assert below.seeds_per_cell == math.ceil(2 * (math.log(1.1 / 0.8) / math.log(1 / 0.8)) ** 2)
    assert F.seeds_to_exclude_one(F.Interval(1.0, 0.5, 2.0), 2, 1e18).seeds_per_cell is None
    assert F.seeds_to_exclude_one(F.Interval(math.inf, 0.5, math.inf), 2, 1e18).seeds_per_cell is None


def test_one_seed_per_cell_keeps_the_old_bootstrap_and_says_so():
    records = seeded_trials({"sparse": 1.1}, seeds=1, noise=0.05, seed=1)
    fits = R.fit_records(records, n_boot=20, joint=False)
    m = fits["multipliers"]["sparse"]
    assert m["interval_method"] == "cells" and "resolving_budget" not in m
    assert math.isnan(fits["families"]["sparse"]["seed_noise_log"])
    if not m["excludes_1"]:
        assert any("no cell has 2 seeds" in line for line in R.multiplier_lines(R._public(fits)))


def _cell(size: str, n_active: float, points: float, loss: float, attention_fpp: float = 1e7) -> dict:
    return {"size": size, "n_active": n_active, "points_seen": points, "mean": loss,
            "training_flops": (6 * n_active + attention_fpp) * points}


def test_inference_at_equal_loss_reads_the_dense_size_that_matches_the_sparse_loss():
    """Dense losses linear in log N at the largest budget: the sparse family's best loss there is
    dense's at k x its active size, so the matching dense size is k N and the forward FLOPs saved
    follow from the FLOPs per point; the smaller budget's cells play no part."""
    def dense_loss(n: float) -> float:
        return 1.0 - 0.05 * math.log(n)

    n3, n4, k = 1.47e7, 4.97e7, 1 / (1 - 0.39)
    dense = [_cell("s3", n3, 1e8, dense_loss(n3)), _cell("s4", n4, 1e8, dense_loss(n4)),
             _cell("s3", n3, 3.6e7, 0.9), _cell("s4", n4, 3.6e7, 0.8)]
    sparse = [_cell("s3", n3, 1e8, dense_loss(k * n3) + 0.01), _cell("s4", n4, 1e8, dense_loss(k * n4)),
              _cell("s4", n4, 3.6e7, 0.1)]  # a better loss at a smaller budget is not the comparison
    inf = R.inference_at_equal_loss(sparse, dense)
    assert inf["sparse_size"] == "s4" and inf["points_seen"] == 1e8
    assert inf["n_dense_equivalent"] == pytest.approx(k * n4, rel=1e-9)
    assert inf["extrapolated"]  # k N4 is beyond the largest dense size run
    assert inf["inference_cost_saving"] == pytest.approx(1 - (6 * n4 + 1e7) / (6 * k * n4 + 1e7), rel=1e-9)
    assert inf["paper"] == 0.39
    # the seeds' spread in the sparse cell moves the reading: its best seed saves more
    spread = [dict(c, min=c["mean"] - 0.01, max=c["mean"] + 0.01) for c in sparse]
    low, high = R.inference_at_equal_loss(spread, dense)["saving_over_sparse_seeds"]
    assert low < inf["inference_cost_saving"] < high
    assert high == pytest.approx(1 - (6 * n4 + 1e7) / (6 * k * n4 * math.exp(0.2) + 1e7), rel=1e-9)
    # inside the dense sizes: not extrapolated
    inside = R.inference_at_equal_loss([_cell("s3", n3, 1e8, dense_loss(2 * n3))], dense)
    assert inside["n_dense_equivalent"] == pytest.approx(2 * n3) and not inside["extrapolated"]
    # one dense size at that budget: nothing to read off; dense worse with size: no match
    assert R.inference_at_equal_loss(sparse, dense[:1] + dense[2:]) is None
    flat = [_cell("s3", n3, 1e8, 0.3), _cell("s4", n4, 1e8, 0.31)]
    none = R.inference_at_equal_loss(sparse, flat)
    assert none["n_dense_equivalent"] is None and "does not fall" in none["why_none"]


def test_fits_carry_each_sparse_familys_inference_comparison_and_its_sentence():
    records = seeded_trials({"sparse": 3.0, "sparse_per_layer": 6.0}, seeds=2, noise=0.0)
    fits = R.fit_records(records, n_boot=10, joint=False)
    assert set(fits["inference_at_equal_loss"]) == {"sparse", "sparse_per_layer"}
    for fam in ("sparse", "sparse_per_layer"):
        inf = fits["inference_at_equal_loss"][fam]
        # a more compute-efficient family matches a larger dense model than its own active size
        assert inf["n_dense_equivalent"] > inf["sparse_n_active"] and 0 < inf["inference_cost_saving"] < 1
    assert (fits["inference_at_equal_loss"]["sparse_per_layer"]["n_dense_equivalent"]
            > fits["inference_at_equal_loss"]["sparse"]["n_dense_equivalent"])
    public = json.loads(json.dumps(R._public(fits)))  # the report renders the JSON-safe copy
    lines = [x for x in R.multiplier_lines(public) if "inference at equal" in x]
    assert len(lines) == 2 and all("the paper: 39%" in x and "less forward FLOPs per forecast" in x for x in lines)


def test_cell_difference_is_welchs_t_interval_relative_to_dense():
    """Hand computation: sparse seeds (0.19, 0.20), dense (0.21, 0.23): difference -0.025, variances
    5e-5 and 2e-4, se = sqrt(2.5e-5 + 1e-4), Welch df = se^4 / ((2.5e-5)^2 + (1e-4)^2), t quantile
    from scipy; all relative to the dense mean 0.22."""
    from scipy import stats

    d = F.cell_difference([0.19, 0.20], [0.21, 0.23], level=0.9)
    se2 = (0.01 ** 2 / 2) / 2 + (0.02 ** 2 / 2) / 2  # var / n; two values a apart have variance a^2 / 2
    df = se2 ** 2 / (((0.01 ** 2 / 2) / 2) ** 2 + ((0.02 ** 2 / 2) / 2) ** 2)
    half = stats.t.ppf(0.95, df) * math.sqrt(se2)
    assert d.relative == pytest.approx(-0.025 / 0.22)
    assert (d.low, d.high) == (pytest.approx((-0.025 - half) / 0.22), pytest.approx((-0.025 + half) / 0.22))
    assert d.df == pytest.approx(df) and not d.excludes_0
    # the seeds that would separate them: the smallest n whose interval, same spreads, excludes 0
    n = d.seeds_to_separate

    def half_at(k: int) -> float:
        v = (0.01 ** 2 / 2) / k + (0.02 ** 2 / 2) / k
        dfk = v ** 2 / ((((0.01 ** 2 / 2) / k) ** 2 + ((0.02 ** 2 / 2) / k) ** 2) / (k - 1))
        return stats.t.ppf(0.95, dfk) * math.sqrt(v)
    assert half_at(n) < 0.025 <= half_at(n - 1)
    # one seed in a cell: no interval
    assert F.cell_difference([0.19], [0.21, 0.23]) is None
    # clearly separated seeds: the interval excludes 0 with the seeds measured
    assert F.cell_difference([0.190, 0.191, 0.189], [0.230, 0.231, 0.229]).excludes_0


def test_report_compares_each_sparse_family_with_dense_cell_by_cell_at_equal_flops(tmp_path):
    """Without any fit, every cell both families ran at the same FLOPs: the relative difference
    and its seed-noise interval, in the fits JSON, the markdown table and the HTML page."""
    records = seeded_trials({"sparse": 3.0, "sparse_per_layer": 1.0}, seeds=2, noise=0.01, seed=4)
    files = R.build_report(records, tmp_path, n_boot=10)
    fits = json.loads(files.fits_json.read_text())
    cells = fits["equal_compute_cells"]
    assert set(cells) == {"sparse", "sparse_per_layer"} and len(cells["sparse"]) == 6
    by_fam = {fam: [r for r in records if r.family == fam] for fam in ("dense", "sparse", "sparse_per_layer")}
    for fam in ("sparse", "sparse_per_layer"):
        for c in cells[fam]:
            pick = lambda f: [r.heldout_loss for r in by_fam[f] if r.size == c["size"] and r.points_seen == c["points_seen"]]  # noqa: E731
            want = F.cell_difference(pick(fam), pick("dense"))
            assert c["relative"] == pytest.approx(want.relative) and c["low"] == pytest.approx(want.low)
    # sparse at 3x dense's efficiency is better than dense in every cell; the twin at 1x is not separated
    assert all(c["relative"] < 0 for c in cells["sparse"])
    md = files.table_md.read_text()
    assert "## Sparse against dense at equal training FLOPs" in md
    section = md.split("## Sparse against dense at equal training FLOPs")[1].split("\n## ")[0]
    assert section.count("| sparse |") == 6 and section.count("| sparse_per_layer |") == 6
    page = (tmp_path / "scaling_report.html").read_text()
    assert "Sparse against dense at equal training FLOPs" in page
    # the headline's figure at the largest common compute is the JSON's, to the digits shown
    shown = re.findall(r'data-key="(equal_compute_cells\.[^"]+)">([^<]+)<', page)
    assert {k.split(".")[1] for k, _ in shown} == {"sparse", "sparse_per_layer"}
    for key, text in shown:
        assert_matches(text, json_value(fits, key), key)
        assert json_value(fits, key.rsplit(".", 2)[0] + "." + key.split(".")[2] + ".training_flops") == max(
            c["training_flops"] for c in cells[key.split(".")[1]])
