"""The HTML reports as a reader sees them: opened from disk in headless Chromium with the
network switched off (tests/_browser.py says how and why without Playwright).

For each page: every image decoded (natural width > 0), no console error, no request outside
the file itself (no script, font or style from a CDN), the headline numbers shown equal those
in the JSON written beside it, and the page still fits the window's width. The curation
report is built from a corpus of nine domains and 3,000 sources, the size at which its tables
and charts must stay legible. Skipped, saying why, where no browser is installed (`.ci/run`
installs Debian's chromium).

The run report (``python -m jobs.report``) needs a real run: tests/test_pipeline_job.py checks
it with the same helpers on the run that module makes. ``TIMEMOE_SCREENSHOTS=docs/img``
writes the screenshots there instead of the test's folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests._browser import (
    Chromium,
    assert_matches,
    check_page,
    json_value,
    open_offline,
    require_browser,
    screenshot_dir,
)


@pytest.fixture(scope="module")
def browser():
    with Chromium(require_browser()) as b:
        yield b


# ------------------------------------------------------------------------ curation report


def large_corpus_report(out: Path, n_domains: int = 9, n_sources: int = 3000) -> dict:
    """report.json + report.html as the preprocessing job writes them, for a corpus of
    ``n_domains`` domains and ``n_sources`` datasets (tallies filled directly: no Ray)."""
    from preprocessing.accounting import Accounting
    from preprocessing.config import PreprocessConfig
    from preprocessing.report import build_report, render_html

    rng = np.random.default_rng(0)
    acc = Accounting()
    domains = [f"domain_{name}" for name in ("energy", "finance", "healthcare", "nature", "sales", "synthetic",
                                             "transport", "web", "other")][:n_domains]
    for i in range(n_sources):
        domain = domains[i % n_domains]
        tally = acc.tally(domain, f"source_{i:05d}_with_a_rather_long_dataset_name_{domain}")
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(300, 60_000))
            dropped = {"short_tail": int(rng.integers(0, 50))}
            if rng.random() < 0.1:
                dropped["window_zeros"] = n // 3
            tally.add_series(n, dropped, n - sum(dropped.values()))
            tally.add_values(rng.normal(0, 1, 64).astype(np.float32))
            tally.run_length_hist[int(rng.integers(8, 16))] += 1
    acc.quarantine = [{"source": f"s3://bucket/raw/{i:05d}/part-with-a-long-name.csv", "series": "", "domain": domains[0],
                       "dataset": f"source_{i:05d}", "reason": "unparseable", "claimed_points": 0,
                       "message": "row 17: could not convert string to float: 'n/a' " * 3} for i in range(120)]
    acc.outliers = [{"series": f"{domains[1]}/source_{i:05d}/s0", "points": 1, "center": 3.2, "bound": 1e4,
                     "extreme": 1e30} for i in range(90)]
    rows_train = acc.totals().points_kept // 513
    rep = build_report(acc, PreprocessConfig(), {"train": 0.9913, "val": 0.9702},
                       {"train": [{"rows": rows_train, "points": rows_train * 512}] * 3,
                        "val": [{"rows": 40, "points": 40 * 512}]}, {d: 1.0 for d in domains})
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True, default=float))
    (out / "report.html").write_text(render_html(rep))
    return rep


def test_curation_report_in_browser(browser, tmp_path):
    large_corpus_report(tmp_path / "packed")
    # the numbers come back from the JSON on disk, as a reader would compare them
    rep = json.loads((tmp_path / "packed" / "report.json").read_text())
    page = open_offline(browser, tmp_path / "packed" / "report.html")
    check_page(page, min_images=3)
    shown = page.keyed_values()
    expected = {
        "points_in": rep["points_in"], "points_kept": rep["points_kept"],
        "points_dropped": sum(rep["points_dropped"].values()), "points_repeated": rep["points_repeated"],
        "series_in": rep["series_in"], "series_kept": rep["series_kept"],
        "series_dropped": sum(rep["series_dropped"].values()),
        "domains": len(rep["domains"]), "datasets": len(rep["datasets"]),
        "rows.train": rep["shards"]["train"]["rows"], "rows.val": rep["shards"]["val"]["rows"],
        "packing_efficiency.train": rep["packing_efficiency"]["train"],
        "warnings": len(rep["warnings"]), "quarantine": len(rep["quarantine"]),
        **{f"provenance.{kind}.points_kept": c["points_kept"] for kind, c in rep["provenance"].items()},
    }
    assert set(shown) == set(expected), set(shown) ^ set(expected)
    for key, value in expected.items():
        assert_matches(shown[key], value, key)
    assert (len(rep["domains"]), len(rep["datasets"])) == (9, 3000)
    # legible at 3,000 sources: long tables show their largest rows and fold the rest away
    visible_rows = page.evaluate("Array.from(document.querySelectorAll('tr')).filter(r => r.checkVisibility()).length")
    assert visible_rows < 400, visible_rows
    assert page.layout()["height"] < 12_000
    assert page.evaluate("document.querySelectorAll('details').length") >= 3  # datasets, values, quarantine (+ warnings)
    shot = page.screenshot(screenshot_dir(tmp_path) / "curation_report_large.png", max_height=1800)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    page.close()


# ------------------------------------------------------------------------- scaling report


def test_scaling_report_in_browser(browser, scaling_report, tmp_path):
    page = open_offline(browser, scaling_report.page_html)
    check_page(page, min_images=4)  # loss vs FLOPs, iso-FLOP, held-out MSE and zero-shot MSE vs FLOPs
    fits = json.loads((scaling_report.out_dir / "scaling_fits.json").read_text())
    shown = page.keyed_values()
    for key in ("trials", "families.sparse.n_trials", "families.dense.n_trials",
                "families.sparse.power_law.alpha.estimate", "families.dense.power_law.E.estimate",
                "families.sparse.extrapolation.relative_error", "multipliers.sparse.headline.estimate"):
        assert key in shown, (key, shown)
    for key, text in shown.items():
        assert_matches(text, json_value(fits, key), key)
    shot = page.screenshot(screenshot_dir(tmp_path) / "scaling_report.png", max_height=2200)
    assert shot.stat().st_size > 20_000
    page.close()
