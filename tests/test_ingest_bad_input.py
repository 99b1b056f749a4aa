"""Bad inputs (issue section 7): each is quarantined with a reason and a message naming the file,
the job goes on with the good inputs, and ``fail_fast`` raises instead."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from preprocessing.formats_table import IngestError
from preprocessing.ingest import IngestConfig, read_series_local
from preprocessing.time300b import write_time300b_dataset


def _t300b(tmp: Path, name: str = "ds", n: int = 5) -> Path:
    folder = tmp / "energy" / name
    write_time300b_dataset(str(folder), [np.arange(10, dtype=np.float32) + i for i in range(n)], max_elements_per_file=20)
    return folder


def _edit_meta(folder: Path, fn) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    fn(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def truncated_bin(tmp):
    f = _t300b(tmp)
    p = f / "data-2-of-3.bin"
    p.write_bytes(p.read_bytes()[:30])
    return f, "data-2-of-3.bin", "truncated_bin", 50


def malformed_meta(tmp):
    f = _t300b(tmp)
    (f / "meta.json").write_text('{"num_sequences": 5, "scales": [')
    return f, "meta.json", "bad_meta", 0


def meta_without_scales(tmp):
    f = _t300b(tmp)
    _edit_meta(f, lambda m: m.pop("scales"))
    return f, "meta.json", "bad_meta", 0


def offsets_out_of_range(tmp):
    """Only the sequence that points past the files is quarantined (its claimed length)."""
    f = _t300b(tmp)
    _edit_meta(f, lambda m: m["scales"][-1].update(offset=45))
    return f, "meta.json", "bad_offsets", 10


def overlapping_offsets(tmp):
    f = _t300b(tmp)
    _edit_meta(f, lambda m: m["scales"][2].update(offset=15))
    return f, "meta.json", "bad_offsets", 10


def negative_length(tmp):
    f = _t300b(tmp)
    _edit_meta(f, lambda m: m["scales"][1].update(length=-3))
    return f, "meta.json", "bad_meta", None


def num_sequences_mismatch(tmp):
    f = _t300b(tmp)
    _edit_meta(f, lambda m: m.update(num_sequences=7))
    return f, "meta.json", "bad_meta", 50


def missing_bin(tmp):
    f = _t300b(tmp)
    (f / "data-3-of-3.bin").unlink()
    return f, "data-3-of-3.bin", "missing_file", 50


def unreadable_gzip(tmp):
    p = tmp / "web" / "garbage.csv.gz"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\x1f\x8b\x08\x00 this is not deflate data at all")
    return p, "garbage.csv.gz", "unreadable_gzip", 0


def truncated_gzip(tmp):
    p = tmp / "web" / "cut.csv.gz"
    p.parent.mkdir(parents=True)
    data = gzip.compress(("t,v\n" + "".join(f"{i},{i}\n" for i in range(5000))).encode())
    p.write_bytes(data[: len(data) // 2])
    return p, "cut.csv.gz", "unreadable_gzip", 0


def empty_file(tmp):
    p = tmp / "web" / "empty.csv"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    return p, "empty.csv", "empty_file", 0


def header_only(tmp):
    p = tmp / "web" / "header.csv"
    p.parent.mkdir(parents=True)
    p.write_text("timestamp,value\n")
    return p, "header.csv", "empty_file", 0


def non_numeric_cells(tmp):
    p = tmp / "web" / "cells.csv"
    p.parent.mkdir(parents=True)
    p.write_text("t,value\n" + "".join(f"{i},{i * 1.5}\n" for i in range(30)) + "30,oops\n")
    return p, "cells.csv", "non_numeric", 31


def decimal_commas(tmp):
    """The message names the catalog setting that reads the file."""
    p = tmp / "web" / "comma.csv"
    p.parent.mkdir(parents=True)
    p.write_text("t;value\n" + "".join(f"{i};{i},5\n" for i in range(30)))
    return p, 'decimal: ","', "decimal_comma", 30


def all_nan_series(tmp):
    p = tmp / "web" / "nan.csv"
    p.parent.mkdir(parents=True)
    p.write_text("t,good,empty\n" + "".join(f"{i},{i},\n" for i in range(20)))
    return p, "nan.csv", "all_missing", 20


def infinities(tmp):
    p = tmp / "web" / "inf.csv"
    p.parent.mkdir(parents=True)
    p.write_text("t,value\n" + "".join(f"{i},{'inf' if i == 7 else i}\n" for i in range(20)))
    return p, "inf.csv", "non_finite", 20


def mixed_types_jsonl(tmp):
    p = tmp / "web" / "mixed.jsonl"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"sequence": [1, 2, 3]}) + "\n" + json.dumps({"sequence": [1, "two", 3.0]}) + "\n")
    return p, "mixed.jsonl", "non_numeric", 3


def broken_jsonl_line(tmp):
    p = tmp / "web" / "broken.jsonl"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"sequence": [1, 2, 3]}) + "\n{\"sequence\": [1, 2\n")
    return p, "broken.jsonl", "bad_record", 0


def unsupported_extension(tmp):
    p = tmp / "web" / "notes.xlsx"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"PK\x03\x04")
    return p, "notes.xlsx", "unsupported_format", 0


def corrupt_npy(tmp):
    p = tmp / "web" / "bad.npy"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\x93NUMPY garbage")
    return p, "bad.npy", "unparseable", 0


def corrupt_parquet(tmp):
    p = tmp / "web" / "bad.parquet"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"PAR1 not really parquet PAR1")
    return p, "bad.parquet", "unparseable", 0


def ts_without_data(tmp):
    p = tmp / "web" / "header.ts"
    p.parent.mkdir(parents=True)
    p.write_text("@problemName x\n@univariate true\n1,2,3:0\n")
    return p, "header.ts", "unparseable", 0


def missing_path(tmp):
    return tmp / "nowhere" / "absent.csv", "absent.csv", "missing_file", 0


CASES = [truncated_bin, malformed_meta, meta_without_scales, offsets_out_of_range, overlapping_offsets, negative_length,
         num_sequences_mismatch, missing_bin, unreadable_gzip, truncated_gzip, empty_file, header_only,
         non_numeric_cells, decimal_commas, all_nan_series, infinities, mixed_types_jsonl, broken_jsonl_line,
         unsupported_extension, corrupt_npy, corrupt_parquet, ts_without_data, missing_path]


@pytest.fixture
def good_file(tmp_path) -> Path:
    p = tmp_path / "good" / "fine.csv"
    p.parent.mkdir(parents=True)
    p.write_text("t,value\n" + "".join(f"{i},{i}\n" for i in range(50)))
    return p


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_is_quarantined_with_reason_and_file_name(tmp_path, good_file, case):
    path, file_name, reason, claimed = case(tmp_path / "bad")
    table = read_series_local([str(path), str(good_file)])
    reasons = table.column("quarantine_reason").to_pylist()
    rows = [i for i, r in enumerate(reasons) if r == reason]
    assert rows, f"expected a {reason!r} row, got {set(reasons)}"
    msg = table.column("quarantine_message")[rows[0]].as_py()
    assert file_name in msg, msg
    assert pc.list_value_length(table.column("values"))[rows[0]].as_py() == 0
    if claimed is not None:
        assert table.column("claimed_points")[rows[0]].as_py() == claimed
    # the job goes on: the good file is still read
    good = table.filter(pc.equal(table.column("source"), str(good_file)))
    assert good.num_rows >= 1 and good.column("quarantine_reason").to_pylist()[0] == ""


@pytest.mark.parametrize("case", [truncated_bin, malformed_meta, overlapping_offsets, unreadable_gzip,
                                  non_numeric_cells, infinities, missing_path], ids=lambda c: c.__name__)
def test_fail_fast_raises(tmp_path, case):
    path, file_name, reason, _ = case(tmp_path / "bad")
    with pytest.raises(IngestError) as exc:
        read_series_local([str(path)], config=IngestConfig(fail_fast=True))
    assert exc.value.reason == reason and file_name in str(exc.value)


def test_duplicate_timestamps_keep_first_and_are_counted(tmp_path):
    p = tmp_path / "web" / "dups.csv"
    p.parent.mkdir(parents=True)
    p.write_text("timestamp,value\n2020-01-01 00:00,1\n2020-01-01 01:00,2\n2020-01-01 01:00,99\n"
                 "2020-01-01 02:00,3\n2020-01-01 03:00,4\n")
    table = read_series_local([str(p)])
    good = table.filter(pc.equal(table.column("quarantine_reason"), ""))
    assert good.column("values").to_pylist() == [[1, 2, 3, 4]]
    dup = table.filter(pc.equal(table.column("quarantine_reason"), "duplicate_timestamps"))
    assert dup.num_rows == 1 and dup.column("claimed_points")[0].as_py() == 1
    assert "dups.csv" in dup.column("quarantine_message")[0].as_py()


def test_every_row_matches_the_contract_schema(tmp_path):
    from preprocessing.series import SERIES_SCHEMA

    path, *_ = truncated_bin(tmp_path)
    table = read_series_local([str(path)])
    assert table.schema.equals(SERIES_SCHEMA)
    assert isinstance(table.column("values").type, pa.LargeListType)
