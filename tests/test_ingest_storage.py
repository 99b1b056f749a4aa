"""preprocessing/storage.py on local paths and a real moto S3 server; Time-300B over s3://."""
from __future__ import annotations

import numpy as np
import pytest

from preprocessing import storage
from preprocessing.formats_table import IngestError
from preprocessing.ingest import IngestConfig, read_series_local
from preprocessing.storage import StorageOptions
from preprocessing.time300b import write_time300b_dataset


def test_options_repr_redacts_credentials():
    o = StorageOptions(endpoint_url="http://x:1", region="eu-west-1", access_key="AKIDSECRET", secret_key="s3cr3t",
                       session_token="tok")
    for text in (repr(o), str(o), repr(IngestConfig(storage=o))):
        assert "AKIDSECRET" not in text and "s3cr3t" not in text and "tok'" not in text
    assert "***" in repr(o) and "eu-west-1" in repr(o)


def test_local_publish_list_and_ranges(tmp_path):
    url = str(tmp_path / "a" / "b.bin")
    storage.publish_bytes(url, bytes(range(10)))
    assert storage.read_range(url, 3, 4) == bytes([3, 4, 5, 6])
    assert storage.list_files(str(tmp_path)) == [url]
    assert not list((tmp_path / "a").glob("*.tmp-*"))  # the temporary name is gone


def test_time300b_round_trip_on_s3(s3_bucket):
    root = f"s3://{s3_bucket}/t300b"
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=int(rng.integers(5, 50))).astype(np.float32) for _ in range(30)]
    scales = [(2.0, 3.0) if i % 2 else None for i in range(30)]
    write_time300b_dataset(f"{root}/web/clicks", seqs, max_elements_per_file=64, scales=scales)
    files = storage.list_files(root)
    assert f"{root}/web/clicks/meta.json" in files and sum(f.endswith(".bin") for f in files) > 3
    table = read_series_local([root], config=IngestConfig(block_elements=100))
    assert table.column("domain").unique().to_pylist() == ["web"]
    for got, want in zip(table.column("values").to_pylist(), seqs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(s == f"{root}/web/clicks" for s in table.column("source").to_pylist())


def test_s3_glob_and_missing_object(s3_bucket):
    for name in ("x1.csv", "x2.csv", "y.csv"):
        storage.publish_bytes(f"s3://{s3_bucket}/raw/{name}", b"t,v\n1,2\n2,3\n3,4\n")
    table = read_series_local([f"s3://{s3_bucket}/raw/x*.csv"])
    assert sorted({s.rsplit('/', 1)[-1] for s in table.column("source").to_pylist()}) == ["x1.csv", "x2.csv"]
    with pytest.raises(IngestError) as exc:
        read_series_local([f"s3://{s3_bucket}/raw/absent.csv"], config=IngestConfig(fail_fast=True))
    assert "absent.csv" in str(exc.value) and "testing-secret-key" not in str(exc.value)
