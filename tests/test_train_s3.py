"""Training reads its packed shards straight from S3 (``data.path=s3://...``), through both
loaders, against a real S3 API (moto's server on 127.0.0.1, reached through pyarrow's S3
filesystem as a user's job would reach AWS). The oracle is the same run on a local copy of the
same bytes: every step's loss must be identical, which fails if S3 reading drops, reorders or
corrupts a window, and the run must fail clearly when the S3 prefix holds no shards."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests._train_helpers import read_metrics, run_ranks, tiny_config, torchrun_worker, write_shards

STEPS = 6


@pytest.fixture(scope="module")
def local_and_s3(s3_server, tmp_path_factory):
    """The same packed dataset on disk and under s3://BUCKET/packed/."""
    import uuid

    import boto3

    root = write_shards(tmp_path_factory.mktemp("s3train") / "packed", train_rows=64, val_rows=16)
    bucket = f"train-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        client.upload_file(str(path), bucket, f"packed/{path.relative_to(root)}")
    assert len(files) >= 5  # manifest + several train/val shards
    return root, f"s3://{bucket}/packed"


def _losses(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_plain_loader_trains_from_s3_exactly_as_from_disk(local_and_s3, tmp_path):
    from pipeline.train.data import list_shards

    local, s3_uri = local_and_s3
    assert list_shards(s3_uri, "train") == [f"{s3_uri}/train/{Path(p).name}" for p in list_shards(str(local), "train")]
    cfgs = [tiny_config(path, tmp_path / name, train={"max_steps": STEPS, "eval_every": 3})
            for name, path in (("local", local), ("s3", s3_uri))]
    results = run_ranks(torchrun_worker, tmp_path / "res", 2, cfgs)
    for rank_results in results:  # both ranks, both configs
        from_disk, from_s3 = (_losses(r["history"]) for r in rank_results)
        assert [s for s, _ in from_disk] == list(range(1, STEPS + 1))
        assert from_s3 == from_disk
        evals_disk = [h["eval_loss"] for h in rank_results[0]["history"] if "eval_loss" in h]
        evals_s3 = [h["eval_loss"] for h in rank_results[1]["history"] if "eval_loss" in h]
        assert evals_disk and evals_s3 == evals_disk  # the val/ split came from S3 too


def test_ray_data_loader_trains_from_s3_exactly_as_from_disk(ray_local, local_and_s3, tmp_path):
    from pipeline.config import config_from_dict
    from pipeline.train.ray_runtime import run_ray

    local, s3_uri = local_and_s3
    losses = {}
    for name, path in (("local", local), ("s3", s3_uri)):
        out = tmp_path / name
        cfg = config_from_dict(tiny_config(path, out, data={"loader": "ray"}, train={"max_steps": STEPS}))
        result = run_ray(cfg)
        assert result.error is None, result.error
        losses[name] = [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]
    assert [s for s, _ in losses["local"]] == list(range(1, STEPS + 1))
    assert losses["s3"] == losses["local"]


def test_empty_s3_prefix_fails_naming_the_path(local_and_s3):
    from pipeline.train.data import list_shards

    _, s3_uri = local_and_s3
    missing = s3_uri.rsplit("/", 1)[0] + "/not-there"
    with pytest.raises(FileNotFoundError, match="not-there: no manifest.json"):
        list_shards(missing, "train")
