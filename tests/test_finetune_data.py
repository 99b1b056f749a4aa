"""Fine-tuning data: only a benchmark's train split, scaled as the zero-shot protocol scales it,
as shards the training loop reads; the validation and test borders are refused."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.benchmark_data import load_benchmark, scaled_values
from pipeline.finetune.data import ContaminationError, benchmark_train_shards
from preprocessing.schema import decode_batch, list_shards, read_manifest
from tests._train_helpers import tiny_checkpoint


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

    def rows(split: str, key: str = "values") -> np.ndarray:
        return np.concatenate([decode_batch(pq.read_table(u).to_pydict())[key] for u in list_shards(str(data.path), split)])

    train, val = rows("train"), rows("val")
    assert len(train) == data.train_windows > 0 and len(val) == data.val_windows > 0
    n = end - start
    cut = n - round(0.1 * n)  # the held-out part: the last 10% of the split, never more
    part = scaled[start:end].astype(np.float32)
    # every window, recomputed independently from the train rows alone, channel-major (the exact
    # equality shows no other row got in): training windows every 32 rows of the first 90%;
    # held-out windows ending every 8 rows in the last 10% (and at its end), context before it
    expect_train = np.array([part[s:s + 65, c] for c in range(part.shape[1]) for s in range(0, cut - 64, 32)])
    ends = sorted(set(range(max(cut + 1, 65), n + 1, 8)) | {n})
    expect_val = np.array([part[e - 65:e, c] for c in range(part.shape[1]) for e in ends])
    np.testing.assert_array_equal(train, expect_train)
    np.testing.assert_array_equal(val, expect_val)
    # only held-out points carry loss: a training step never scored on them, the held-out loss never on seen ones
    loss = rows("val", "loss_mask")
    expect_loss = np.array([np.arange(e - 65, e) >= cut for _ in range(part.shape[1]) for e in ends])
    np.testing.assert_array_equal(loss, expect_loss)
    assert rows("train", "loss_mask").all()


def test_a_short_split_at_a_long_window_keeps_nine_tenths_for_training(bench, tmp_path):
    """The paper's longest context on a short split: the held-out rows stay a tenth (they once
    grew to two windows, most of the split), and the held-out windows still reach full length."""
    ds = load_benchmark(bench, "toy")
    start, end = scaled_values(ds)[1].train
    width = (end - start) // 2
    data = benchmark_train_shards(bench, "toy", tmp_path / "ft", window_length=width - 1, stride=8,
                                  early_stop_fraction=0.1)
    cut = (end - start) - round(0.1 * (end - start))
    assert data.train_windows == len(range(0, cut - width + 1, 8)) * ds.values_TC.shape[1]
    assert data.val_windows > 0


def test_a_train_split_shorter_than_one_window_is_an_error(bench, tmp_path):
    with pytest.raises(ValueError, match="shorter than one window"):
        benchmark_train_shards(bench, "toy", tmp_path / "ft", window_length=4096)


@pytest.mark.parametrize("workers,windows,expect", [(1, 7, (7, 7, 1)), (2, 7, (3, 6, 2)), (1, 100, (32, 32, 4))])
def test_a_train_split_smaller_than_a_batch_trains_on_smaller_batches(tmp_path, workers, windows, expect):
    """configs/finetune-gpu.yaml asks for batches of 32; ETTh1 at the paper's longest context has
    fewer windows than that. The run takes what the split holds instead of failing at step 1."""
    from pipeline.finetune.data import FinetuneData
    from pipeline.finetune.protocol import FinetuneJob, Parent, finetune_config

    tiny_checkpoint(tmp_path / "parent")
    parent = Parent(tmp_path / "parent", "parent", 4096)
    data = FinetuneData(tmp_path / "data", "ETTh1", "train", (0, 8640), windows, 0)
    job = FinetuneJob(parent="parent", benchmarks=str(tmp_path), datasets=["ETTh1"], config="configs/finetune-gpu.yaml",
                      overrides=[f"scaling.num_workers={workers}", "scaling.use_gpu=false"])
    cfg = finetune_config(job, parent, data, tmp_path / "out")
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.max_steps) == expect
    with pytest.raises(ValueError, match="1 training windows for 2 workers"):
        finetune_config(FinetuneJob(**{**job.__dict__, "overrides": ["scaling.num_workers=2", "scaling.use_gpu=false"]}),
                        parent, FinetuneData(tmp_path / "data", "ETTh1", "train", (0, 8640), 1, 0), tmp_path / "out")
