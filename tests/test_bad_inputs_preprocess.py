"""Bad inputs through the preprocessing job: nothing lost, nothing silently wrong.

First the pure numpy pieces (the robust bound against slow references), then bad inputs run
through the real CLI entry point ``jobs.preprocess.main(argv)`` in this process, on one Ray
instance for the module: each asserts the exit code, the one-line message, and that nothing
already published was changed or lost.
"""
from __future__ import annotations

import numpy as np
import pytest

from _helpers_preprocess import series_table
from preprocessing.accounting import check_invariant
from preprocessing.clean import (
    REASON_NONFINITE,
    REASON_OUTLIER,
    clean_series,
    reference_clean,
    robust_bound,
    robust_sample_index,
)
from preprocessing.config import CleanConfig, PackConfig, PreprocessConfig
from preprocessing.normalize import normalize_run


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(5.0, 1.0, n).astype(np.float32)


# ------------------------------------------------------------------ robust bound (pure numpy)


def slow_robust_bound(values: list[float], limit: float) -> tuple[float, float] | None:
    """Reference: upper median and the floor(0.99 (m - 1))-th smallest deviation, by sorting."""
    ordered = sorted(values)
    center = ordered[len(ordered) // 2]
    devs = sorted(abs(v - center) for v in values)
    spread = devs[int(0.99 * (len(devs) - 1))]
    return (center, limit * spread) if spread > 0 else None


@pytest.mark.parametrize("n", [2, 3, 256, 1001, 8192])
def test_robust_bound_matches_sorting_reference_on_short_series(n):
    x = noise(n, seed=n)
    x[n // 3] = 1e30
    got = robust_bound(x, 1000.0)
    want = slow_robust_bound([float(v) for v in x], 1000.0)
    assert got == want if want is None else got == pytest.approx(want, rel=1e-12)


def test_robust_bound_of_long_series_uses_the_deterministic_sample():
    n = 50_000
    x = noise(n, seed=3)
    idx = robust_sample_index(n)
    assert len(idx) == 8192 and idx.min() >= 0 and idx.max() < n and len(np.unique(idx)) > 8000
    assert np.array_equal(idx, robust_sample_index(n))  # deterministic
    got = robust_bound(x, 1000.0)
    assert got == pytest.approx(slow_robust_bound([float(x[i]) for i in idx], 1000.0), rel=1e-12)
    # the sample does not alias with a period of the data: every hour of a daily cycle is seen
    phases = np.bincount(robust_sample_index(24 * 10_000) % 24, minlength=24)
    assert phases.min() > 0.8 * 8192 / 24


def test_robust_bound_is_off_for_constant_series_and_limit_zero():
    assert robust_bound(np.full(500, 3.0, np.float32), 1000.0) is None
    assert robust_bound(noise(500), 0.0) is None
    assert robust_bound(np.array([1.0], np.float32), 1000.0) is None


@pytest.mark.parametrize("bad", [1e30, -1e30])
def test_one_absurd_value_is_dropped_as_outlier_not_flattening_the_series(bad):
    x = noise(1000)
    x[500] = bad
    r = clean_series(x, CleanConfig())
    assert r.dropped == {REASON_OUTLIER: 1}
    assert r.runs == [(0, 500), (501, 1000)]
    assert r.outliers.points == 1 and r.outliers.extreme == pytest.approx(bad)
    assert r.kept_points + sum(r.dropped.values()) == len(x)
    for s, e in r.runs:  # each run z-scores to unit spread, as without the bad value
        values, _, _ = normalize_run(x[s:e], "zscore")
        assert np.std(values) == pytest.approx(1.0, abs=1e-3) and np.ptp(values) > 4
    # without the bound the same series is flattened: the good points' spread collapses
    unbounded = clean_series(x, CleanConfig(outlier_limit=0))
    assert unbounded.runs == [(0, 1000)] and unbounded.dropped == {}
    values, _, _ = normalize_run(x, "zscore")
    assert np.std(np.delete(values, 500)) < 1e-6


def test_inf_is_nonfinite_and_mixed_absurd_values_are_counted_separately():
    x = noise(2000, seed=5)
    x[400], x[900], x[1500] = np.inf, 1e30, -1e30
    r = clean_series(x, CleanConfig())
    assert r.dropped == {REASON_NONFINITE: 1, REASON_OUTLIER: 2}
    assert r.outliers.points == 2 and abs(r.outliers.extreme) == pytest.approx(1e30)
    assert r.runs == reference_clean(x, CleanConfig())
    assert r.kept_points + sum(r.dropped.values()) == len(x)


def test_bursty_but_legitimate_series_keeps_every_point():
    """Idle noise with bursts of 10^4 x the idle level (appliance power, network traffic):
    measured against the 99th-percentile deviation the bursts are ordinary."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.01, 4000).astype(np.float32)
    for start in rng.integers(0, 3900, 20):
        x[start:start + 5] = rng.uniform(50, 100, 5)
    r = clean_series(x, CleanConfig(window_rules=False))
    assert REASON_OUTLIER not in r.dropped and r.outliers is None


@pytest.mark.parametrize("seed", range(4))
def test_outlier_rule_matches_slow_reference_on_messy_series(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(300, 12_000))
    x = rng.normal(0, 1, n).astype(np.float32)
    for _ in range(rng.integers(1, 6)):
        x[int(rng.integers(0, n))] = rng.choice([1e30, -1e30, 3e9, np.nan, np.inf])
    cfg = CleanConfig()
    r = clean_series(x, cfg)
    assert r.runs == reference_clean(x, cfg)
    assert r.kept_points + sum(r.dropped.values()) == n


def test_clean_batch_counts_outliers_and_keeps_the_invariant():
    from preprocessing.job import StageContext, clean_batch

    x = noise(3000, seed=2)
    x[1000] = 1e30
    cfg = PreprocessConfig(output="unused", pack=PackConfig(window_length=512))
    _, acc = clean_batch(series_table([{"domain": "web", "dataset": "d", "series": "s", "values": x}]),
                         StageContext(cfg))
    check_invariant(acc)
    tally = acc.tally("web", "d")
    assert tally.points_dropped == {REASON_OUTLIER: 1} and tally.points_kept == 2999
    assert [o["series"] for o in acc.outliers] == ["web/d/s"] and acc.outliers[0]["points"] == 1


# ------------------------------------------------------------------ Time-300B offsets (pure numpy)


def slow_offset_problems(offsets: list[int], lengths: list[int], total: int) -> list[int]:
    """Reference: 1 = ends past the files, 2 = shares an element with another in-range sequence."""
    out = [1 if o + n > total else 0 for o, n in zip(offsets, lengths)]
    for i in range(len(offsets)):
        for j in range(len(offsets)):
            if i != j and not out[i] == 1 and not out[j] == 1 and lengths[i] and lengths[j]:
                if offsets[i] < offsets[j] + lengths[j] and offsets[j] < offsets[i] + lengths[i]:
                    out[i] = 2
    return out


@pytest.mark.parametrize("seed", range(5))
def test_offset_problems_match_pairwise_reference(seed):
    from preprocessing.time300b import offset_problems

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    offsets = rng.integers(0, 400, n)
    lengths = rng.integers(0, 30, n)
    problems, overlaps = offset_problems(offsets, lengths, 390)
    assert problems.tolist() == slow_offset_problems(offsets.tolist(), lengths.tolist(), 390)
    for i in np.flatnonzero(problems == 2):  # the named partner really overlaps
        j = overlaps[i]
        assert j != i and offsets[i] < offsets[j] + lengths[j] and offsets[j] < offsets[i] + lengths[i]


def test_bad_offsets_quarantine_only_their_sequences(tmp_path):
    import json

    import pyarrow.compute as pc

    from preprocessing.ingest import IngestConfig, read_series_local
    from preprocessing.time300b import write_time300b_dataset

    folder = tmp_path / "energy" / "grid"
    seqs = [np.arange(10, dtype=np.float32) + 100 * i for i in range(6)]
    write_time300b_dataset(str(folder), seqs, max_elements_per_file=25)
    meta = json.loads((folder / "meta.json").read_text())
    meta["scales"][1]["offset"] = 20          # [20, 30): the range of sequence 2
    meta["scales"][4]["offset"] = 55          # [55, 65): the files hold 60 elements
    (folder / "meta.json").write_text(json.dumps(meta))
    for block in (10**6, 20):                 # one read task, and sequences spread over chunks
        table = read_series_local([str(folder)], config=IngestConfig(block_elements=block))
        good = table.filter(pc.equal(table.column("quarantine_reason"), ""))
        assert good.column("series").to_pylist() == ["0", "3", "5"]
        for name, values in zip(good.column("series").to_pylist(), good.column("values").to_pylist()):
            assert values == seqs[int(name)].tolist()
        bad = table.filter(pc.equal(table.column("quarantine_reason"), "bad_offsets"))
        messages = dict(zip(bad.column("series").to_pylist(), bad.column("quarantine_message").to_pylist()))
        assert sorted(messages) == ["1", "2", "4"]
        assert all(m.startswith(str(folder / "meta.json")) for m in messages.values())
        assert "sequence 1 offsets [20, 30) overlap sequence 2" in messages["1"]
        assert "sequence 4 offsets [55, 65) end beyond the 60 elements" in messages["4"]
        assert bad.column("claimed_points").to_pylist() == [10, 10, 10]


# ------------------------------------------------------------------ CSV encodings and decimal commas

CSV_TEXT = "time,värde\n" + "".join(f"2024-01-01 {i // 60:02d}:{i % 60:02d},{i * 0.5}\n" for i in range(300))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_csv_in_utf16_utf32_or_with_bom_reads_like_utf8(tmp_path, encoding):
    from preprocessing.ingest import read_series_local

    path = tmp_path / "web" / "sensor.csv"
    path.parent.mkdir()
    path.write_bytes(CSV_TEXT.encode(encoding))
    table = read_series_local([str(path)])
    good = [(n, v) for n, v, r in zip(*(table.column(c).to_pylist() for c in ("series", "values", "quarantine_reason")))
            if not r]
    assert good == [("värde", [i * 0.5 for i in range(300)])]


def test_nul_bytes_that_are_not_utf16_name_the_file():
    from preprocessing.formats import decode_text
    from preprocessing.formats_table import IngestError

    with pytest.raises(IngestError, match="x.csv: holds NUL bytes.*save it as UTF-8") as err:
        decode_text(b"a,b\n1,\x00\x002\n\x00\x00\x00\x00" * 5, "/d/x.csv")
    assert err.value.reason == "unparseable"
    with pytest.raises(IngestError, match="y.csv: not valid UTF-16-LE text"):
        decode_text(b"\xff\xfe" + "t,v\n".encode("utf-16-le") + b"\x00", "/d/y.csv")


def test_decimal_comma_setting_reads_the_numbers_and_refuses_ambiguous_cells(tmp_path):
    from preprocessing.catalog import parse_catalog
    from preprocessing.ingest import read_series_local

    path = tmp_path / "energy" / "meter.csv"
    path.parent.mkdir()
    path.write_text("t;kwh;total\n" + "".join(f"{i};{i},25;1.{i:03d},5\n" for i in range(40)))
    catalog = parse_catalog({"sources": [{"match": "*/meter.csv", "decimal": ","}]})
    table = read_series_local([str(path)], catalog=catalog)
    rows = {n: (r, v, m) for n, r, v, m in zip(*(table.column(c).to_pylist() for c in
                                                 ("series", "quarantine_reason", "values", "quarantine_message")))}
    assert rows["kwh"][:2] == ("", [i + 0.25 for i in range(40)])
    # 1.001,5 has a thousands separator: reported, never read as a wrong number (1.001 or 1001.5)
    assert rows["total"][0] in ("non_numeric", "skipped_column") and "meter.csv" in rows["total"][2]
    with pytest.raises(ValueError, match="sources\\[0\\] decimal must be"):
        parse_catalog({"sources": [{"match": "*", "decimal": ";"}]})
