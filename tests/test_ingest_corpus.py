"""The whole shared corpus (110 messy real files) through read_series on a real local Ray, and a
subset uploaded to a real moto S3 server read back from s3:// with identical series."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from preprocessing.ingest import read_series, read_series_local


def _by_file(table: pa.Table) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for src, name, reason, vals in zip(table.column("source").to_pylist(), table.column("series").to_pylist(),
                                       table.column("quarantine_reason").to_pylist(),
                                       table.column("values").to_pylist()):
        f = out.setdefault(src.rsplit("/", 1)[-1], {"series": {}, "reasons": []})
        if reason:
            f["reasons"].append(reason)
        else:
            f["series"][name] = np.asarray(vals, dtype=np.float64)
    return out


@pytest.fixture(scope="module")
def corpus_table(shared_data, ray_local) -> pa.Table:
    ds = read_series([str(shared_data / "corpus")])
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def test_no_file_is_silently_lost(corpus_table, shared_data):
    files = {p.name for p in (shared_data / "corpus").rglob("*") if p.is_file()}
    assert len(files) == 110
    seen = _by_file(corpus_table)
    assert set(seen) == files
    # every file yields good series, except none: all 110 corpus files are readable
    assert all(f["series"] for f in seen.values()), [n for n, f in seen.items() if not f["series"]]
    # domains come from the folder names
    domains = dict(zip(corpus_table.column("source").to_pylist(), corpus_table.column("domain").to_pylist()))
    assert all(src.split("/")[-2] == d for src, d in domains.items())


def test_known_shapes(corpus_table):
    f = _by_file(corpus_table)
    # M4: one ragged series per row, padding stripped
    m4 = f["m4_Hourly-train.csv.gz"]["series"]
    assert len(m4) == 414 and {len(v) for v in m4.values()} == {700, 960}
    assert len(f["m4_Weekly-test.csv.gz"]["series"]) == 359
    # bokeh stocks: long layout, 5 tickers x 6 value columns, unequal lengths
    stocks = f["bokeh_stocks.csv.gz"]["series"]
    assert {k.split("/")[0] for k in stocks} == {"AAPL", "IBM", "MSFT", "GOOG", "FB"}
    assert len(stocks["FB/Close"]) < len(stocks["GOOG/Close"]) < len(stocks["AAPL/Close"])
    # El Nino: 61 years x 12 months melted into one monthly series
    (elnino,) = f["statsmodels_elnino.csv.gz"]["series"].values()
    assert len(elnino) == 61 * 12
    # CR-only line endings
    assert [len(v) for v in f["prophet_air_passengers.csv.gz"]["series"].values()] == [144]
    # newest-first file is sorted ascending: US gasoline rose from ~6.6k (1991) to ~8-9k (2021)
    (gas,) = f["darts_us_gasoline.csv.gz"]["series"].values()
    assert len(gas) == 1578 and gas[:52].mean() < gas[-300:].mean()
    # UCI sales: 811 products x 52 weeks; MIN/MAX/Normalized reported as skipped
    uci = f["uci_sales_transactions_weekly.csv.gz"]
    assert len(uci["series"]) == 811 and {len(v) for v in uci["series"].values()} == {52}
    assert uci["reasons"].count("skipped_column") == 1 + 2 + 52
    # .ts: 100 x 1460, the class label is not a series
    acsf = f["aeon_ACSF1_TRAIN.ts.gz"]["series"]
    assert len(acsf) == 100 and {len(v) for v in acsf.values()} == {1460}
    # .tsf: 181 yearly series of 15..58 points
    m1 = f["aeon_m1_yearly_dataset.tsf.gz"]["series"]
    assert len(m1) == 181 and min(map(len, m1.values())) == 15 and max(map(len, m1.values())) == 58
    # label columns skipped, only the ECG is a series
    assert list(f["sktime_mitdb.csv.gz"]["series"]) == ["value"] or len(f["sktime_mitdb.csv.gz"]["series"]) == 1
    # duplicated timestamps dropped and reported
    assert "duplicate_timestamps" in f["bokeh_CGM.csv.gz"]["reasons"]
    # missing cells stay NaN (co2 has 59 empty cells)
    (co2,) = f["statsmodels_co2.csv.gz"]["series"].values()
    assert int(np.isnan(co2).sum()) >= 59
    # missing months of the incomplete milk series become NaN points on the monthly grid
    (milk,) = f["darts_monthly_milk_incomplete.csv.gz"]["series"].values()
    assert len(milk) == 168 and int(np.isnan(milk).sum()) == 168 - 155
    # year + quarter composite time: 203 quarters, nothing added
    assert {len(v) for v in f["statsmodels_macrodata.csv.gz"]["series"].values()} == {203}
    # opsd: 4 series; the 6 trailing empty unnamed columns are reported, not series
    assert len(f["opsd_germany_daily.csv.gz"]["series"]) == 4


def test_s3_gives_identical_series(shared_data, s3_bucket, ray_local):
    import boto3

    subset = ["energy/darts_us_gasoline.csv.gz", "finance/bokeh_stocks.csv.gz",
              "other/aeon_m1_yearly_dataset.tsf.gz", "transport/prophet_air_passengers.csv.gz",
              "healthcare/aeon_Covid3Month_TEST.ts.gz", "nature/statsmodels_elnino.csv.gz"]
    s3 = boto3.client("s3")
    for rel in subset:
        s3.upload_file(str(shared_data / "corpus" / rel), s3_bucket, f"corpus/{rel}")
    ds = read_series([f"s3://{s3_bucket}/corpus"])
    remote = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    local = read_series_local([str(shared_data / "corpus" / rel) for rel in subset])
    key = lambda t: sorted(zip(t.column("domain").to_pylist(), [s.rsplit("/", 1)[-1] for s in t.column("source").to_pylist()],
                               t.column("series").to_pylist(), t.column("quarantine_reason").to_pylist(),
                               [tuple(np.nan_to_num(np.asarray(v, float), nan=-1e30)) for v in t.column("values").to_pylist()]))
    assert key(remote) == key(local)
    assert all(s.startswith(f"s3://{s3_bucket}/") for s in remote.column("source").to_pylist())
    good = remote.filter(pc.equal(remote.column("quarantine_reason"), ""))
    assert good.num_rows > 61


def test_ray_read_quarantines_and_fail_fast_raises(tmp_path, ray_local):
    from preprocessing.accounting import INFORMATIONAL_QUARANTINE
    from preprocessing.formats_table import IngestError
    from preprocessing.ingest import IngestConfig

    good = tmp_path / "web" / "ok.csv"
    good.parent.mkdir(parents=True)
    good.write_text("t,v\n1,1\n2,2\n3,3\n")
    bad = tmp_path / "web" / "bad.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    table = pa.concat_tables(list(read_series([str(tmp_path)]).iter_batches(batch_format="pyarrow", batch_size=None)))
    reasons = dict(zip([s.rsplit("/", 1)[-1] for s in table.column("source").to_pylist()],
                       table.column("quarantine_reason").to_pylist()))
    assert reasons["bad.csv.gz"] == "unreadable_gzip" and "ok.csv" in reasons
    # raised here, as the reader's own error (no task raises: see read_series)
    with pytest.raises(IngestError) as exc:
        read_series([str(tmp_path)], config=IngestConfig(fail_fast=True))
    assert exc.value.reason == "unreadable_gzip"
    assert "bad.csv.gz" in str(exc.value) and "unreadable gzip" in str(exc.value)
    # only the good file: its reader notes (informational) do not stop it, and the dataset holds its series
    rows = read_series([str(good)], config=IngestConfig(fail_fast=True)).take_all()
    assert [list(r["values"]) for r in rows if not r["quarantine_reason"]] == [[1.0, 2.0, 3.0]]
    notes = {r["quarantine_reason"] for r in rows if r["quarantine_reason"]}
    assert notes and notes <= set(INFORMATIONAL_QUARANTINE), notes
