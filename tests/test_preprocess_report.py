"""Curation report: contamination guard through the pipeline, and the HTML/JSON structure
(sections present, plots embedded as base64 PNG, no external resources)."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
from _helpers_preprocess import series_table, synthetic_rows

from preprocessing.config import PackConfig, PreprocessConfig
from preprocessing.contamination import ContaminationIndex, benchmark_test_rows, load_test_channels
from preprocessing.job import run_preprocess
from preprocessing.report import SECTIONS


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)


def test_benchmark_test_rows():
    assert benchmark_test_rows("x/ETTh1.csv.gz", 17420) == (11520, 14400)
    assert benchmark_test_rows("ETTm2.csv.gz", 69680) == (46080, 57600)
    assert benchmark_test_rows("weather.csv.gz", 1000) == (800, 1000)


def test_guard_finds_64_copied_values_not_63(shared_data):
    etth1 = str(shared_data / "benchmarks" / "ETTh1.csv.gz")
    chans = load_test_channels(etth1)
    assert len(chans) == 7 and len(chans[0]) == 2880
    index = ContaminationIndex.from_files([etth1])
    x = np.random.default_rng(0).normal(size=3000).astype(np.float32)
    for start in (0, 1000, 3000 - 64, 17):  # copies at arbitrary (unaligned) offsets
        y = x.copy()
        y[start:start + 64] = chans[6][700:764]
        assert index.find(y) == "ETTh1", start
        z = x.copy()
        z[start:start + 63] = chans[6][700:763]
        assert index.find(z) is None, start
    # the TRAIN split of ETTh1 is not guarded (only test windows count)
    import pandas as pd

    ot_train = pd.read_csv(etth1)["OT"].to_numpy(np.float32)[1000:1200]
    y = x.copy()
    y[100:300] = ot_train
    assert index.find(y) is None


def test_pipeline_drops_contaminated_series_and_reports(ray_local, shared_data, tmp_path):
    etth1 = str(shared_data / "benchmarks" / "ETTh1.csv.gz")
    chans = load_test_channels(etth1)
    rows = synthetic_rows(seed=1, n_series=12)
    leaked = np.random.default_rng(5).normal(10, 1, 2000).astype(np.float32)
    leaked[500:600] = chans[0][100:200]
    rows.append({"domain": "energy", "dataset": "leaky", "series": "copy", "values": leaked})
    cfg = PreprocessConfig(output=str(tmp_path / "out"), pack=PackConfig(window_length=512, val_fraction=0.0))
    cfg.contamination.benchmarks = [etth1]
    result = run_preprocess(cfg, series=ray_local.data.from_arrow(series_table(rows)))
    leaky = result.report["datasets"]["energy/leaky"]
    assert leaky["series_dropped"] == {"contamination:ETTh1": 1}
    assert leaky["points_dropped"] == {"contamination:ETTh1": 2000}
    assert result.report["points_dropped"]["contamination:ETTh1"] == 2000

    html_text = (tmp_path / "out" / "report.html").read_text()
    parsed = Collector()
    parsed.feed(html_text)
    assert parsed.sections == list(SECTIONS)
    assert len(parsed.images) >= 3 and all(s.startswith("data:image/png;base64,") for s in parsed.images)
    assert not parsed.external
    assert "contamination:ETTh1" in html_text and "bad_meta" in html_text  # drop table + quarantine
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["quarantine"] and rep["quarantine"][0]["reason"] == "bad_meta"
    assert set(rep["domains"]) == {"energy", "web", "nature"}
    for block in rep["datasets"].values():
        assert len(block["length_hist_log2"]) == len(rep["length_hist_log2"])
        assert block["values"]["count"] >= 0
    assert rep["mixture_weights"] == {"energy": 1.0, "nature": 1.0, "web": 1.0}
