"""Source catalog overrides (preprocessing/catalog.py) change what the readers infer."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from preprocessing.catalog import load_catalog, parse_catalog
from preprocessing.ingest import plan_inputs, read_series_local


def _good(table):
    return table.filter(pc.equal(table.column("quarantine_reason"), ""))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_domain_dataset_columns_and_skip(tmp_path):
    csv = _write(tmp_path / "raw" / "plant.csv",
                 "when,temp,load,status\n" + "".join(f"2024-01-0{1 + i % 9} 0{i % 10}:00,{i},{2 * i},{i % 3}\n"
                                                      for i in range(12)))
    cat_file = _write(tmp_path / "catalog.yaml", f"""
sources:
  - match: "*/plant.csv"
    domain: energy
    dataset: power_plant
    time_column: when
    skip_columns: [status]
""")
    catalog = load_catalog(str(cat_file))
    table = read_series_local([str(csv)], catalog=catalog)
    good = _good(table)
    assert set(good.column("domain").to_pylist()) == {"energy"}
    assert set(good.column("dataset").to_pylist()) == {"power_plant"}
    assert sorted(good.column("series").to_pylist()) == ["load", "temp"]
    skipped = table.filter(pc.equal(table.column("quarantine_reason"), "skipped_column"))
    msgs = " ".join(skipped.column("quarantine_message").to_pylist())
    assert "'status'" in msgs and "catalog skip_columns" in msgs
    # without the catalog the domain is the parent folder and the integer status is a series
    plain = _good(read_series_local([str(csv)]))
    assert set(plain.column("domain").to_pylist()) == {"raw"}
    assert "status" in plain.column("series").to_pylist()


def test_long_layout_override_and_value_columns(tmp_path):
    rows = [f"{sid},{t},{t * k}.5,{k}" for k, sid in enumerate(["a", "b", "c"], 1) for t in range(5)]
    csv = _write(tmp_path / "x" / "stacked.csv", "sid,step,y,other\n" + "\n".join(rows) + "\n")
    catalog = parse_catalog({"sources": [{"match": "*stacked.csv", "layout": "long", "id_column": "sid",
                                          "time_column": "step", "columns": ["y"]}]})
    good = _good(read_series_local([str(csv)], catalog=catalog))
    got = dict(zip(good.column("series").to_pylist(), good.column("values").to_pylist()))
    assert set(got) == {"a", "b", "c"}
    np.testing.assert_allclose(got["b"], [t * 2 + 0.5 for t in range(5)])


def test_headerless_file_and_rows_layout(tmp_path):
    p = tmp_path / "f" / "rates.txt.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(gzip.compress(b"1.0,2.0,3.0\n1.5,2.5,3.5\n1.7,2.7,3.7\n"))
    catalog = parse_catalog({"sources": [{"match": "*rates.txt.gz", "header": False, "domain": "finance"}]})
    good = _good(read_series_local([str(p)], catalog=catalog))
    assert good.num_rows == 3 and set(good.column("domain").to_pylist()) == {"finance"}
    np.testing.assert_allclose(good.column("values").to_pylist()[0], [1.0, 1.5, 1.7])


def test_catalog_names_apply_to_time300b_folders(tmp_path):
    from preprocessing.time300b import write_time300b_dataset

    write_time300b_dataset(str(tmp_path / "root" / "misc" / "d1"), [np.ones(4, np.float32)])
    catalog = parse_catalog({"sources": [{"match": "*/misc/d1", "domain": "nature", "dataset": "rain"}]})
    (spec,) = plan_inputs([str(tmp_path / "root")], catalog)
    assert (spec.domain, spec.dataset) == ("nature", "rain")


def test_bad_catalog_is_rejected_clearly():
    with pytest.raises(ValueError, match="unknown keys"):
        parse_catalog({"sources": [{"match": "*", "colums": ["x"]}]})
    with pytest.raises(ValueError, match="layout"):
        parse_catalog({"sources": [{"match": "*", "layout": "diagonal"}]})
    with pytest.raises(ValueError, match="match"):
        parse_catalog({"sources": [{"domain": "x"}]})
