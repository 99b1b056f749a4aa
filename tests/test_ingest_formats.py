"""Each raw format and inference rule on small hand-made files with known answers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.ingest import read_series_local


def _good(path: Path) -> dict[str, np.ndarray]:
    t = read_series_local([str(path)])
    t = t.filter(pc.equal(t.column("quarantine_reason"), ""))
    return {k: np.asarray(v, dtype=np.float64) for k, v in zip(t.column("series").to_pylist(), t.column("values").to_pylist())}


def assert_same_values(a, b):
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(a, float), nan=-999), np.nan_to_num(np.asarray(b, float), nan=-999))


def test_csv_sorted_deduped_and_gaps_become_nan(tmp_path):
    rows = [("2021-01-01 03:00", 4), ("2021-01-01 00:00", 1), ("2021-01-01 01:00", 2), ("2021-01-01 05:00", 6),
            ("2021-01-01 04:00", 5), ("2021-01-01 06:00", 7), ("2021-01-01 07:00", 8)]  # 02:00 missing
    p = tmp_path / "energy" / "shuffled.csv"
    p.parent.mkdir(parents=True)
    p.write_text("value,timestamp\n" + "".join(f"{v},{t}\n" for t, v in rows))  # time column not first
    assert_same_values(_good(p)["value"], [1, 2, np.nan, 4, 5, 6, 7, 8])


def test_cr_line_endings_tsv_gzip_and_calendar(tmp_path):
    p = tmp_path / "a" / "mac.csv"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"ds,y\r1949-01-01,112\r1949-02-01,118\r1949-03-01,132\r")
    assert_same_values(_good(p)["y"], [112, 118, 132])
    t = tmp_path / "a" / "tab.tsv.gz"
    t.write_bytes(gzip.compress(b"a\tb\n1\t10\n2\t20\n3\t30\n"))
    got = _good(t)
    assert_same_values(got["a"], [1, 2, 3])
    assert_same_values(got["b"], [10, 20, 30])
    c = tmp_path / "a" / "cal.csv"
    c.write_text("YEAR,JAN,FEB,MAR,APR,MAY,JUN,JUL,AUG,SEP,OCT,NOV,DEC\n"
                 "2001," + ",".join(str(100 + m) for m in range(12)) + "\n"
                 "2000," + ",".join(str(m) for m in range(12)) + "\n")
    assert_same_values(_good(c)["monthly"], list(range(12)) + [100 + m for m in range(12)])


def test_jsonl_npy_parquet_arrow(tmp_path):
    j = tmp_path / "w" / "s.jsonl"
    j.parent.mkdir(parents=True)
    j.write_text(json.dumps({"item_id": "x", "sequence": [1, 2, None]}) + "\n" + json.dumps({"target": [5.5]}) + "\n")
    got = _good(j)
    assert_same_values(got["x"], [1, 2, np.nan])
    assert_same_values(got["1"], [5.5])
    n = tmp_path / "w" / "m.npy"
    np.save(n, np.arange(6, dtype=np.float64).reshape(2, 3))
    assert_same_values(_good(n)["1"], [3, 4, 5])
    q = tmp_path / "w" / "l.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "values": [[1.0, 2.0], [3.0]]}), q)
    got = _good(q)
    assert_same_values(got["a"], [1, 2])
    assert_same_values(got["b"], [3])
    w = tmp_path / "w" / "wide.parquet"
    pq.write_table(pa.table({"t": [3, 1, 2], "load": [30.0, 10.0, 20.0]}), w)
    assert_same_values(_good(w)["load"], [10, 20, 30])
    f = tmp_path / "w" / "x.arrow"
    with pa.ipc.new_file(str(f), pa.schema([("sequence", pa.list_(pa.float32()))])) as wr:
        wr.write_table(pa.table({"sequence": [[1.0, 2.0]]}, schema=pa.schema([("sequence", pa.list_(pa.float32()))])))
    assert_same_values(_good(f)["0"], [1, 2])


def test_ts_multivariate_and_tsf_missing(tmp_path):
    ts = tmp_path / "h" / "mv.ts"
    ts.parent.mkdir(parents=True)
    ts.write_text("# comment\n@problemName mv\n@univariate false\n@classLabel true a b\n@data\n"
                  "1,2,3:4,5,6:a\n7,8:9,10:b\n")
    got = _good(ts)
    assert set(got) == {"0/dim0", "0/dim1", "1/dim0", "1/dim1"}
    assert_same_values(got["1/dim1"], [9, 10])
    tsf = tmp_path / "h" / "m.tsf"
    tsf.write_text("# c\n@relation r\n@attribute series_name string\n@attribute start_timestamp date\n"
                   "@frequency yearly\n@data\nT1:1972-01-01 00-00-00:1,?,3\nT2:1980-01-01 00-00-00:4,5\n")
    got = _good(tsf)
    assert_same_values(got["T1"], [1, np.nan, 3])
    assert_same_values(got["T2"], [4, 5])


def test_long_layout_inferred(tmp_path):
    p = tmp_path / "f" / "long.csv"
    p.parent.mkdir(parents=True)
    lines = ["Ticker,Date,Close"] + [f"{k},2020-01-0{d},{i * 10 + d}" for i, k in enumerate(["A", "B"]) for d in (3, 1, 2)]
    p.write_text("\n".join(lines) + "\n")
    got = _good(p)
    assert_same_values(got["A"], [1, 2, 3])
    assert_same_values(got["B"], [11, 12, 13])


def test_globs_and_folders_keep_domain_from_parent(tmp_path):
    from preprocessing.ingest import plan_inputs

    for dom, name in [("energy", "a.csv"), ("energy", "b.jsonl"), ("web", "c.csv"), ("web", "README.md")]:
        p = tmp_path / "corpus" / dom / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("t,v\n1,2\n2,3\n" if name.endswith(".csv") else '{"sequence": [1, 2]}\n')
    specs = plan_inputs([str(tmp_path / "corpus" / "*" / "*.csv")])
    assert sorted((s.domain, s.dataset) for s in specs) == [("energy", "a"), ("web", "c")]
    specs = plan_inputs([str(tmp_path / "corpus")])
    assert sorted((s.domain, s.dataset) for s in specs) == [("energy", "a"), ("energy", "b"), ("web", "c")]
