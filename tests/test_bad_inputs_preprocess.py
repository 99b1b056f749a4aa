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
    ROBUST_SAMPLE,
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


@pytest.mark.parametrize("n", [2, 3, 256, 1001, 2048])
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
    assert len(idx) == ROBUST_SAMPLE and idx.min() >= 0 and idx.max() < n and len(np.unique(idx)) > 0.99 * ROBUST_SAMPLE
    assert np.array_equal(idx, robust_sample_index(n))  # deterministic
    got = robust_bound(x, 1000.0)
    assert got == pytest.approx(slow_robust_bound([float(x[i]) for i in idx], 1000.0), rel=1e-12)
    # the sample does not alias with a period of the data: every hour of a daily cycle is seen
    phases = np.bincount(robust_sample_index(24 * 10_000) % 24, minlength=24)
    assert phases.min() > 0.8 * ROBUST_SAMPLE / 24


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


# ------------------------------------------------------------------ through the CLI: jobs.preprocess.main

WINDOW = "512"


def write_jsonl_corpus(folder, n_series: int = 8, length: int = 1500, seed: int = 0):
    import json

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sensors.jsonl", "w") as fh:
        for _ in range(n_series):
            fh.write(json.dumps({"sequence": rng.normal(0, 1, length).cumsum().round(4).tolist()}) + "\n")
    return folder


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``jobs.preprocess.main`` in this process (on the session's Ray instance): exit code,
    stdout, and the lines it wrote to stderr."""
    from jobs.preprocess import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line; there is exactly one and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("jobs.preprocess: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl_corpus(tmp_path_factory.mktemp("corpus") / "web")


@pytest.fixture(scope="module")
def published(ray_local, corpus, tmp_path_factory):
    """A good output published once; tests work on copies of it."""
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("published") / "out"
    from jobs.preprocess import main

    assert main(["--input", str(corpus), "--output", str(out), "--window-length", WINDOW]) == 0
    return out


@pytest.fixture
def good_output(published, tmp_path):
    """A copy of the published output with a user's own file beside the shards."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(published, out)
    (out / "NOTES.txt").write_text("a user's notes, not the job's")
    return out


def test_mistyped_input_leaves_a_good_output_as_it_was(capsys, corpus, good_output):
    before = snapshot(good_output)
    code, out, err = run_cli(capsys, "--input", str(corpus) + "x", "--output", str(good_output), "--window-length", WINDOW)
    assert code == 2
    line = error_line(err)
    assert "nothing to publish: every input is missing or quarantined (1 quarantined: missing_file 1)" in line
    assert f"{corpus}x: no such file or directory" in line and f"--output {good_output} was left as it was" in line
    assert snapshot(good_output) == before
    assert "packing efficiency" not in out


def test_every_input_quarantined_is_an_error_with_counts(capsys, tmp_path):
    raw = tmp_path / "raw" / "web"
    raw.mkdir(parents=True)
    (raw / "empty.csv").write_bytes(b"")
    (raw / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    (raw / "header.csv").write_text("t,value\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(out), "--window-length", WINDOW)
    assert code == 2
    line = error_line(err)
    assert "every input is missing or quarantined (3 quarantined: empty_file 2, unparseable 1)" in line
    assert f"--output {out} was not written" in line
    assert not out.exists() or not list(out.rglob("*.parquet")) and not (out / "manifest.json").exists()


def test_every_point_dropped_by_the_rules_is_an_error_naming_the_rule(capsys, tmp_path):
    raw = write_jsonl_corpus(tmp_path / "raw" / "web", n_series=3, length=100)
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(tmp_path / "out"), "--window-length", WINDOW)
    assert code == 2
    assert "nothing to publish: all 300 points of 3 series were dropped (min_length 300)" in error_line(err)


def test_foreign_files_in_the_output_are_refused_at_start_and_survive(capsys, corpus, good_output):
    (good_output / "train" / "extra.parquet").write_bytes(b"the user's own shard")
    (good_output / "val" / "readme.txt").write_text("mine")
    before = snapshot(good_output)
    code, out, err = run_cli(capsys, "--input", str(corpus), "--output", str(good_output), "--window-length", WINDOW)
    assert code == 2
    line = error_line(err)
    assert f"holds 2 file(s) this job did not write: {good_output}/train/extra.parquet, {good_output}/val/readme.txt" in line
    assert snapshot(good_output) == before and "resolved config" in out


@pytest.mark.parametrize("where", ["inside", "equal"])
def test_output_inside_or_equal_to_an_input_folder_is_refused_at_start(capsys, tmp_path, where):
    raw = write_jsonl_corpus(tmp_path / "raw")
    out = raw / "packed" if where == "inside" else raw
    before = snapshot(raw)
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(out), "--window-length", WINDOW)
    assert code == 2
    line = error_line(err)
    assert (f"is inside the input folder {raw}" if where == "inside" else f"is the input {raw}") in line
    assert snapshot(raw) == before and not (raw / "packed").exists()


def test_rerun_replaces_only_the_jobs_files_byte_identically(capsys, corpus, good_output, tmp_path):
    before = snapshot(good_output)
    code, _, _ = run_cli(capsys, "--input", str(corpus), "--output", str(good_output), "--window-length", WINDOW)
    assert code == 0
    after = snapshot(good_output)
    shards = [k for k in before if k.endswith(".parquet")]
    assert shards and all(after[k] == before[k] for k in shards)
    assert after["NOTES.txt"] == before["NOTES.txt"] and set(after) == set(before)


def test_publish_killed_mid_way_is_finished_by_the_next_run(capsys, corpus, good_output, monkeypatch):
    """A publish that dies after the old manifest is gone and half the shards moved leaves its
    journal; the next run recognises every file as the job's own and publishes the same bytes."""
    import preprocessing.writer as writer

    before = snapshot(good_output)
    real_write = writer.write_bytes

    def dying_write(fs, path, data):
        if path.endswith("report.json"):
            raise KeyboardInterrupt("killed mid-publish")
        real_write(fs, path, data)

    monkeypatch.setattr(writer, "write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_cli(capsys, "--input", str(corpus), "--output", str(good_output), "--window-length", WINDOW)
    monkeypatch.undo()
    assert not (good_output / "manifest.json").exists() and (good_output / "_publishing.json").exists()
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(good_output), "--window-length", WINDOW)
    assert code == 0, err[-2000:]
    after = snapshot(good_output)
    assert set(after) == set(before)  # journal and staging folder gone, nothing else added
    assert all(after[k] == before[k] for k in before if k.endswith((".parquet", ".txt")))


def test_output_that_is_a_file_and_bad_config_and_catalog_are_one_line_errors(capsys, corpus, tmp_path):
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(a_file))
    assert code == 2 and f"--output {a_file} is a file, not a folder" in error_line(err)
    assert a_file.read_text() == "not a folder"
    config = tmp_path / "c.yaml"
    config.write_text("clean: {outlier_limt: 10}\n")
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "o"), "--config", str(config))
    line = error_line(err)
    assert code == 2 and "unknown key 'outlier_limt' in section 'clean' (did you mean 'outlier_limit'?)" in line
    assert str(config) in line
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "o"), "--catalog",
                           str(tmp_path / "absent.yaml"))
    assert code == 2 and f"--catalog {tmp_path / 'absent.yaml'}" in error_line(err)
    code, _, err = run_cli(capsys, "--output", str(tmp_path / "o"))
    assert code == 2 and "give at least one --input" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_fail_fast_stops_at_the_first_bad_input_in_one_line(capsys, corpus, good_output, tmp_path):
    bad = tmp_path / "bad" / "web"
    bad.mkdir(parents=True)
    (bad / "cut.csv.gz").write_bytes(b"\x1f\x8b\x08\x00 not deflate")
    before = snapshot(good_output)
    code, _, err = run_cli(capsys, "--input", str(corpus), "--input", str(bad), "--output", str(good_output),
                           "--window-length", WINDOW, "--fail-fast")
    assert code == 2 and f"{bad}/cut.csv.gz: unreadable gzip" in error_line(err)
    assert snapshot(good_output) == before and not list(good_output.glob("_tmp-*"))


def test_utf16_csv_is_read_and_published(capsys, tmp_path):
    import json

    raw = tmp_path / "raw" / "energy"
    raw.mkdir(parents=True)
    values = np.sin(np.arange(2000) / 10.0) + np.arange(2000) * 0.01
    text = "step,load\n" + "".join(f"{i},{v:.5f}\n" for i, v in enumerate(values))
    (raw / "meter.csv").write_bytes(text.encode("utf-16"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(out), "--window-length", WINDOW)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["points_in"] == report["points_kept"] == 2000
    assert report["datasets"]["energy/meter"]["series_in"] == 1


def test_decimal_comma_csv_names_the_file_and_the_setting_then_reads_with_it(capsys, tmp_path):
    import json

    raw = tmp_path / "raw" / "energy"
    raw.mkdir(parents=True)
    values = np.sin(np.arange(1500) / 10.0) * 3 + 10
    (raw / "zaehler.csv").write_text("t;kwh\n" + "".join(f"{i};{v:.4f}\n".replace(".", ",") for i, v in enumerate(values)))
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(tmp_path / "out"), "--window-length", WINDOW)
    assert code == 2
    line = error_line(err)
    assert f"{raw}/zaehler.csv: column 'kwh' holds numbers with a decimal comma ('10,0000')" in line
    assert 'decimal: ","' in line and "--catalog" in line
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text('sources:\n  - match: "*/zaehler.csv"\n    decimal: ","\n')
    code, _, err = run_cli(capsys, "--input", str(raw), "--output", str(tmp_path / "out"), "--window-length", WINDOW,
                           "--catalog", str(catalog))
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["points_kept"] == 1500


def test_as_a_subprocess_user_errors_print_one_line_without_traceback(tmp_path):
    """The real process: refused before Ray starts, one line on stderr, exit 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    raw = write_jsonl_corpus(tmp_path / "raw")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "jobs.preprocess", "--input", str(raw), "--output", str(raw / "out")],
                          cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"jobs.preprocess: error: --output {raw}/out is inside the input folder {raw}: the job would read its own "
        f"output back; choose an --output outside the inputs")
    assert "Traceback" not in proc.stderr and not (raw / "out").exists()


def read_segments(out, key: str) -> list[np.ndarray]:
    """The normalised segments of series ``key`` in the published shards."""
    import pyarrow.parquet as pq

    from preprocessing.schema import decode_batch, list_shards

    found = []
    for split in ("train", "val"):
        for path in list_shards(str(out), split):
            table = pq.read_table(path)
            dense = decode_batch({c: table.column(c) for c in ("values", "segment_ids", "loss_mask")})
            for r, keys in enumerate(table.column("seg_series").to_pylist()):
                for k, name in enumerate(keys):
                    if name == key:
                        found.append(dense["values"][r][dense["segment_ids"][r] == k + 1])
    return found


def test_absurd_values_and_a_wholly_dropped_domain_are_warned_and_counted(capsys, caplog, tmp_path):
    import json
    import logging

    rng = np.random.default_rng(7)
    sensors = rng.normal(0, 1, (3, 2000)).cumsum(axis=1).astype(np.float32)
    sensors[0, 1000], sensors[1, 600] = 1e30, -1e30
    sensors[2, 1400] = np.inf  # the .npy/CSV/jsonl readers quarantine a series holding inf (non_finite)
    (tmp_path / "raw" / "web").mkdir(parents=True)
    np.save(tmp_path / "raw" / "web" / "sensors.npy", sensors)
    (tmp_path / "raw" / "sales").mkdir()
    np.save(tmp_path / "raw" / "sales" / "idle.npy", np.zeros(2000, np.float32))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="preprocessing.job"):
        code, stdout, err = run_cli(capsys, "--input", str(tmp_path / "raw"), "--output", str(out),
                                    "--window-length", WINDOW)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["points_in"] == 4 * 2000
    assert report["points_in"] == report["points_kept"] + sum(report["points_dropped"].values())
    assert report["points_dropped"]["outlier"] == 2
    assert report["points_dropped"]["quarantine:non_finite"] == 2000
    assert report["datasets"]["web/sensors"]["points_kept"] == 2 * 2000 - 2
    warnings = report["warnings"]
    assert warnings[0] == ("domain sales: all 2,000 points of 1 series dropped (window_zeros 2,000); "
                           "nothing of it is in the shards")
    assert warnings[1].startswith("series web/sensors/0: 1 point(s) beyond the robust bound dropped as outlier")
    assert "most extreme 1e+30" in warnings[1] and "most extreme -1e+30" in warnings[2] and len(warnings) == 3
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(w in logged for w in warnings)  # one line each in the job log
    assert "3 warning(s)" in stdout
    assert "Warnings" in (out / "report.html").read_text()
    # the series with 1e30 is not flattened: each of its segments has unit spread
    segments = read_segments(out, "web/sensors/0")
    assert sum(len(s) for s in segments) == 1999 and all(np.std(s) > 0.1 for s in segments if len(s) > 100)


def test_time300b_bad_offsets_quarantine_the_sequence_not_the_dataset(capsys, tmp_path):
    import json

    from preprocessing.time300b import write_time300b_dataset

    folder = tmp_path / "raw" / "energy" / "grid"
    rng = np.random.default_rng(3)
    seqs = [rng.normal(0, 1, 1000).cumsum().astype(np.float32) for _ in range(5)]
    seqs[0][500] = np.inf                     # Time-300B keeps it: dropped as nonfinite, the series kept
    write_time300b_dataset(str(folder), seqs, max_elements_per_file=1500)
    meta = json.loads((folder / "meta.json").read_text())
    meta["scales"][1]["offset"] = 2000        # the range of sequence 2
    meta["scales"][4]["offset"] = 4500        # ends at 5500, the files hold 5000
    (folder / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--input", str(tmp_path / "raw"), "--output", str(out), "--window-length", WINDOW)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    bad = {q["series"]: q["message"] for q in report["quarantine"] if q["reason"] == "bad_offsets"}
    assert sorted(bad) == ["1", "2", "4"]
    assert bad["1"] == f"{folder}/meta.json: sequence 1 offsets [2000, 3000) overlap sequence 2 (offsets in " \
                       f"meta.json are wrong for one of them)"
    assert bad["4"] == f"{folder}/meta.json: sequence 4 offsets [4500, 5500) end beyond the 5000 elements its " \
                       f".bin files hold"
    grid = report["datasets"]["energy/grid"]
    assert grid["points_dropped"] == {"quarantine:bad_offsets": 3000, "nonfinite": 1}
    assert grid["points_kept"] == 1999 and grid["points_in"] == 5000
    assert grid["series_in"] == 5 and grid["series_kept"] == 2


def test_debug_flag_keeps_the_traceback_of_user_errors(corpus, tmp_path):
    from jobs.preprocess import main
    from preprocessing.errors import PreprocessError

    with pytest.raises(PreprocessError, match="is inside the input folder"):
        main(["--input", str(corpus), "--output", str(corpus / "out"), "--debug"])


def test_pipeline_exits_2_with_one_line_when_preprocessing_has_nothing_to_publish(ray_local, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--input", str(tmp_path / "absent"),
                           "--output-dir", str(tmp_path / "runs")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("jobs.pipeline: preprocessing failed: nothing to publish: every input is missing")
    assert f"{tmp_path / 'absent'}: no such file or directory" in line and "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").glob("run-*/packed/manifest.json"))


def test_publish_trusts_only_shard_names_from_a_manifest(tmp_path):
    """A manifest (or journal) naming ``../x`` does not make the job delete ``x``."""
    import json

    import pyarrow.fs as pafs

    from preprocessing.writer import owned_files, publish

    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00000.parquet").write_bytes(b"old shard")
    (out / "train" / "shard-00001.parquet").write_bytes(b"old shard 2")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "manifest.json").write_text(json.dumps({"shards": {"train": [
        {"file": "shard-00000.parquet"}, {"file": "shard-00001.parquet"}, {"file": "../../victim.txt"}]}}))
    fs = pafs.LocalFileSystem()
    assert owned_files(fs, str(out))["train"] == {"shard-00000.parquet", "shard-00001.parquet"}
    tmp = out / "_tmp-run000000001"
    (tmp / "train").mkdir(parents=True)
    (tmp / "train" / "part-a.parquet").write_bytes(b"new shard")
    publish(fs, str(out), str(tmp), {"train": [str(tmp / "train" / "part-a.parquet")]}, {}, {"shards": {}})
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000.parquet"]  # the old 00001 was ours
    assert (out / "train" / "shard-00000.parquet").read_bytes() == b"new shard"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train"]


def test_s3_output_refuses_foreign_objects_and_an_empty_result(capsys, corpus, s3_bucket, s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    out = f"s3://{s3_bucket}/packed"
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", out, "--window-length", WINDOW)
    assert code == 0, err[-2000:]

    def objects() -> dict[str, bytes]:
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="packed/").get("Contents", [])
        return {o["Key"]: client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read() for o in listed}

    published = objects()
    assert "packed/manifest.json" in published and "packed/train/shard-00000.parquet" in published
    code, _, err = run_cli(capsys, "--input", str(corpus) + "x", "--output", out, "--window-length", WINDOW)
    assert code == 2 and f"--output {out} was left as it was" in error_line(err)
    client.put_object(Bucket=s3_bucket, Key="packed/train/mine.parquet", Body=b"someone else's")
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", out, "--window-length", WINDOW)
    assert code == 2 and f"this job did not write: {out}/train/mine.parquet;" in error_line(err)
    assert objects() == {**published, "packed/train/mine.parquet": b"someone else's"}


def test_only_validation_rows_is_an_error_saying_so(capsys, corpus, tmp_path):
    config = tmp_path / "all-val.yaml"
    config.write_text("pack: {val_fraction: 0.999}\n")
    code, _, err = run_cli(capsys, "--input", str(corpus), "--output", str(tmp_path / "out"), "--config", str(config),
                           "--window-length", WINDOW)
    assert code == 2
    assert "nothing to publish: all 12,000 kept points went to the validation split (24 rows) and none to " \
           "training" in error_line(err)
    assert not (tmp_path / "out" / "manifest.json").exists()
