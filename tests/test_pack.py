"""Packing invariants: every kept point appears exactly once, segments never straddle rows,
segment ids are contiguous and increasing, loss masks follow segment ids, efficiency >= 98%."""
from __future__ import annotations

import numpy as np
import pytest

from preprocessing.normalize import apply_stats, denormalize, segment_stats
from preprocessing.pack import assemble_rows, best_fit_decreasing, chunk_bounds
from preprocessing.schema import split_windows


def realistic_lengths(rng: np.random.Generator, total: int) -> list[int]:
    """Log-normal series lengths like the shared corpus (hundreds to tens of thousands)."""
    out, acc = [], 0
    while acc < total:
        n = int(np.clip(rng.lognormal(7.5, 1.2), 256, 60000))
        out.append(n)
        acc += n
    return out


def test_chunk_bounds_keeps_tail_and_drops_tiny_tail():
    assert chunk_bounds(0, 10000, 4097, 32) == ([(0, 4097), (4097, 8194), (8194, 10000)], 0)
    assert chunk_bounds(5, 5 + 4097 + 10, 4097, 32) == ([(5, 4102)], 10)
    assert chunk_bounds(0, 300, 4097, 32) == ([(0, 300)], 0)


def test_best_fit_decreasing_small_case_is_tight():
    bins = best_fit_decreasing([6, 4, 5, 5, 3, 7], 10)
    sizes = sorted(sum([6, 4, 5, 5, 3, 7][i] for i in b) for b in bins)
    assert len(bins) == 3 and sizes == [10, 10, 10]
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def check_rows(rows, chunks, width):
    values, seg = rows.values_RW, rows.segment_ids_RW
    seen = {}
    for r in range(rows.num_rows):
        ids = seg[r]
        real = ids > 0
        # padding only at the end, ids contiguous runs 1..k in increasing order
        k = int(ids.max())
        nz = ids[real]
        assert np.all(np.diff(nz) >= 0) and np.all(np.diff(nz) <= 1) and nz[0] == 1 and nz[-1] == k
        assert not np.any(real[np.argmin(real):]) if not real.all() else True
        assert np.array_equal(rows.loss_mask_RW[r].astype(bool), real)
        assert len(rows.seg_series[r]) == len(rows.seg_mean[r]) == len(rows.seg_lengths[r]) == k
        for s in range(1, k + 1):
            piece = values[r][ids == s]
            key = rows.seg_series[r][s - 1]
            assert key not in seen, "a chunk appears twice"
            seen[key] = piece
    assert set(seen) == {f"c{i}" for i in range(len(chunks))}
    for i, c in enumerate(chunks):
        assert np.array_equal(seen[f"c{i}"], c)


def test_packing_invariants_and_efficiency_on_realistic_lengths():
    rng = np.random.default_rng(0)
    width = 4097
    chunks = []
    for n in realistic_lengths(rng, 4_000_000):
        for s, e in chunk_bounds(0, n, width, 32)[0]:
            chunks.append(rng.normal(size=e - s).astype(np.float32))
    keys = [f"c{i}" for i in range(len(chunks))]
    rows = assemble_rows(chunks, [0.0] * len(chunks), [1.0] * len(chunks), keys, width)
    check_rows(rows, chunks, width)
    assert rows.efficiency() >= 0.98, rows.efficiency()
    # the trainer's view: targets never cross a segment boundary or land on padding
    view = split_windows(rows.values_RW, rows.segment_ids_RW, rows.loss_mask_RW)
    same = rows.segment_ids_RW[:, 1:] == rows.segment_ids_RW[:, :-1]
    assert np.array_equal(view["loss_mask"], same & (rows.segment_ids_RW[:, :-1] > 0))


def test_packing_is_deterministic():
    rng = np.random.default_rng(1)
    chunks = [np.full(int(n), 1.0, np.float32) for n in rng.integers(1, 500, 300)]
    keys = [f"c{i}" for i in range(len(chunks))]
    a = assemble_rows(chunks, [0.0] * 300, [1.0] * 300, keys, 512)
    b = assemble_rows(chunks, [0.0] * 300, [1.0] * 300, keys, 512)
    assert np.array_equal(a.segment_ids_RW, b.segment_ids_RW) and a.seg_series == b.seg_series
    check_rows(a, chunks, 512)


@pytest.mark.parametrize("method", ["zscore", "max", "none"])
def test_normalisation_round_trip(method):
    x = np.random.default_rng(2).normal(1e4, 3.0, 1000).astype(np.float32)
    mean, std = segment_stats(x, method)
    y = apply_stats(x, mean, std)
    assert y.dtype == np.float32
    np.testing.assert_allclose(denormalize(y, mean, std), x, rtol=1e-6)
    if method == "zscore":
        assert abs(y.mean()) < 1e-4 and abs(y.std() - 1) < 1e-4
        assert std == pytest.approx(float(np.std(x.astype(np.float64))))  # population std


def test_constant_series_is_only_centred():
    x = np.full(300, 7.5, dtype=np.float32)
    mean, std = segment_stats(x, "zscore")
    assert (mean, std) == (7.5, 1.0)
    assert np.all(apply_stats(x, mean, std) == 0)


@pytest.mark.parametrize("method", ["zscore", "max", "none"])
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e6])
def test_fast_normalize_run_matches_float64_reference(method, offset):
    from preprocessing.normalize import normalize_run

    x = (np.random.default_rng(3).normal(offset, 2.0, 5000)).astype(np.float32)
    y, mean, std = normalize_run(x, method)
    ref_mean, ref_std = segment_stats(x, method)
    assert y.dtype == np.float32
    assert std == pytest.approx(ref_std, rel=1e-4)
    assert mean == pytest.approx(ref_mean, rel=1e-6, abs=1e-6)
    # mapping back with the RECORDED stats reproduces x to ~1 float32 ulp of x
    np.testing.assert_allclose(denormalize(y, mean, std), x, rtol=3e-7 * 4, atol=1e-5)
    # the z-values differ from float64 by at most the float32 rounding of the mean (in std units)
    shift = float(np.spacing(np.float32(abs(ref_mean)))) / ref_std
    np.testing.assert_allclose(y, apply_stats(x, ref_mean, ref_std), atol=shift + 2e-4)


@pytest.mark.parametrize("layout", ["list", "bytes"])
def test_both_shard_layouts_decode_to_the_same_dense_arrays(layout, tmp_path):
    """decode_batch gives the packed arrays back from either physical layout, in every form a
    reader hands over: Arrow (whole, sliced, several chunks, read back from Parquet), numpy
    object arrays (Ray Data's numpy batches: ``bytes`` or arrays per row) and 2-D arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing.schema import decode_batch, window_schema
    from preprocessing.writer import rows_table

    rng = np.random.default_rng(4)
    chunks = [rng.normal(size=int(n)).astype(np.float32) for n in rng.integers(1, 40, 60)]
    rows = assemble_rows(chunks, [0.0] * 60, [1.0] * 60, [f"k{i}" for i in range(60)], 41)
    cols = ("values", "segment_ids", "loss_mask")
    table = rows_table(rows, 0, rows.num_rows, 40, layout)
    assert table.schema.equals(window_schema(40, layout), check_metadata=True)
    pq.write_table(table, tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.schema.metadata[b"timemoe.layout"] == layout.encode()

    def check(batch, start=0):
        d = decode_batch(batch)
        assert d["values"].dtype == np.float32 and d["segment_ids"].dtype == np.int32 and d["loss_mask"].dtype == bool
        assert np.array_equal(d["values"], rows.values_RW[start:])
        assert np.array_equal(d["segment_ids"], rows.segment_ids_RW[start:])
        assert np.array_equal(d["loss_mask"], rows.loss_mask_RW[start:].astype(bool))

    check({c: back.column(c) for c in cols})
    check({c: back.slice(3).column(c) for c in cols}, 3)
    check({c: pa.concat_tables([back.slice(0, 2), back.slice(2)]).column(c) for c in cols})
    check({c: back.column(c).to_numpy() for c in cols})          # object arrays (bytes / arrays)
    check({c: getattr(rows, f"{c}_RW") for c in cols})          # already dense
    if layout == "bytes":  # numpy fixed-width bytes, as a pandas/numpy conversion may give
        check({c: np.array(back.column(c).to_pylist()) for c in cols})


def test_loss_mask_marks_exactly_the_segment_points():
    rng = np.random.default_rng(5)
    chunks = [np.ones(int(n), np.float32) for n in rng.integers(1, 300, 200)]
    rows = assemble_rows(chunks, [0.0] * 200, [1.0] * 200, [f"k{i}" for i in range(200)], 301, shuffle_seed=3)
    assert rows.loss_mask_RW.dtype == np.uint8
    assert np.array_equal(rows.loss_mask_RW, (rows.segment_ids_RW > 0).astype(np.uint8))
