"""The whole shared corpus (real, messy third-party files) through the ingest readers and
run_preprocess at window 4096: from local disk, and with input AND output on moto S3. The
accounting invariant holds per dataset and packing efficiency is >= 98%."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from preprocessing.config import PreprocessConfig
from preprocessing.job import run_preprocess
from preprocessing.schema import decode_batch, list_shards, read_manifest

pytestmark = pytest.mark.slow


def check_result(result, output: str) -> None:
    rep = result.report
    assert rep["points_in"] > 1_000_000 and rep["series_in"] > 500
    assert rep["points_in"] == rep["points_kept"] + sum(rep["points_dropped"].values())
    assert rep["series_in"] == rep["series_kept"] + sum(rep["series_dropped"].values())
    for key, block in rep["datasets"].items():
        assert block["points_in"] == block["points_kept"] + sum(block["points_dropped"].values()), key
        assert block["series_in"] == block["series_kept"] + sum(block["series_dropped"].values()), key
    assert len(rep["domains"]) == 9
    assert result.efficiency >= 0.98, result.efficiency
    manifest = read_manifest(output)
    assert manifest["packing_efficiency"]["train"] >= 0.98
    shards = list_shards(output, "train")
    assert len(shards) == len(manifest["shards"]["train"]) >= 1
    # the first shard decodes with the trainer's helpers; padding only where loss_mask is 0
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(shards[0]) if shards[0].startswith("s3://") else (pafs.LocalFileSystem(), shards[0])
    table = pq.read_table(path, filesystem=fs)
    dense = decode_batch({c: table.column(c) for c in ("values", "segment_ids", "loss_mask")})
    assert dense["values"].shape[1] == 4097
    assert ((dense["segment_ids"] > 0) == dense["loss_mask"]).all()
    assert table.num_rows == manifest["shards"]["train"][0]["rows"]


def test_shared_corpus_local(ray_local, shared_data, tmp_path):
    out = str(tmp_path / "prepared")
    cfg = PreprocessConfig(inputs=[str(shared_data / "corpus")], output=out)
    result = run_preprocess(cfg)
    check_result(result, out)
    rep = json.loads((tmp_path / "prepared" / "report.json").read_text())
    # the corpus has known dirt: constant columns, NaN gaps, files that are too short
    assert rep["points_dropped"].get("nonfinite", 0) > 0
    assert rep["series_dropped"].get("min_length", 0) > 0
    assert (tmp_path / "prepared" / "report.html").stat().st_size > 10_000


def test_shared_corpus_on_s3(ray_local, shared_data, s3_bucket, s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    corpus = shared_data / "corpus"
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"raw/{path.relative_to(corpus)}")
    out = f"s3://{s3_bucket}/prepared"
    cfg = PreprocessConfig(inputs=[f"s3://{s3_bucket}/raw"], output=out)
    result = run_preprocess(cfg)
    check_result(result, out)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="prepared/")["Contents"]}
    assert {"prepared/manifest.json", "prepared/report.json", "prepared/report.html"} <= keys
    assert not any("/_tmp-" in k for k in keys)
