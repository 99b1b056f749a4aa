"""Fine-tuning data: only a benchmark's train split, scaled as the zero-shot protocol scales it,
as shards the training loop reads; the validation and test borders are refused."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.benchmark_data import load_benchmark, scaled_values
from pipeline.finetune.data import ContaminationError, benchmark_train_shards
from preprocessing.schema import decode_batch, list_shards, read_manifest


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    t = np.arange(2000)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=2000, freq="h").strftime("%Y-%m-%d %H:%M:%S"),
                       "a": np.sin(t / 9) + 0.1 * rng.normal(size=2000), "OT": 5 + t / 100 + rng.normal(size=2000)})
    df.to_csv(root / "toy.csv", index=False)
    return root


@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_borders_are_refused(bench, tmp_path, split):
    with pytest.raises(ContaminationError, match=f"toy's '{split}' split is refused: only its train split"):
        benchmark_train_shards(bench, "toy", tmp_path / "out", 64, split=split)
    assert not (tmp_path / "out").exists()


def test_windows_are_the_scaled_train_split_and_nothing_else(bench, tmp_path):
    data = benchmark_train_shards(bench, "toy", tmp_path / "ft", window_length=64, stride=32, early_stop_fraction=0.1)
    ds = load_benchmark(bench, "toy")
    scaled, borders = scaled_values(ds)
    start, end = borders.train
    assert (data.split, data.rows) == ("train", (start, end)) and end <= borders.val[0]
    manifest = read_manifest(str(data.path))
    assert manifest["source"] == {"benchmark": "toy", "split": "train", "rows": [start, end], "stride": 32}
    import pyarrow.parquet as pq

    def rows(split: str) -> np.ndarray:
        return np.concatenate([decode_batch(pq.read_table(u).to_pydict())["values"] for u in list_shards(str(data.path), split)])

    train, val = rows("train"), rows("val")
    assert len(train) == data.train_windows > 0 and len(val) == data.val_windows > 0
    cut = (end - start) - max(round(0.1 * (end - start)), 130)
    # every window, recomputed independently from the train rows alone: channel-major, every 32
    # rows (the held-out part every 8), the held-out part the last 10% but two windows at least (the exact
    # equality shows no other row got in)
    expect = []
    for lo, hi, every in ((start, start + cut, 32), (start + cut, end, 8)):
        part = scaled[lo:hi].astype(np.float32)
        expect.append(np.array([part[s:s + 65, c] for c in range(part.shape[1]) for s in range(0, len(part) - 64, every)]))
    np.testing.assert_array_equal(train, expect[0])
    np.testing.assert_array_equal(val, expect[1])


def test_a_train_split_shorter_than_one_window_is_an_error(bench, tmp_path):
    with pytest.raises(ValueError, match="shorter than one window"):
        benchmark_train_shards(bench, "toy", tmp_path / "ft", window_length=4096)
