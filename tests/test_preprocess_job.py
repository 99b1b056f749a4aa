"""run_preprocess end to end on a hand-made messy corpus, on real local Ray: accounting invariant,
every kept point written exactly once (mapped back to raw units), dedup, val split, mixture
weights, idempotent re-runs (byte-identical shards) and a killed run never looking complete."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _helpers_preprocess import series_table, synthetic_rows

from preprocessing.accounting import Accounting, AccountingError, check_invariant
from preprocessing.clean import clean_series
from preprocessing.config import MixtureConfig, PackConfig, PreprocessConfig, config_from_dict, load_config
from preprocessing.job import hash64, run_preprocess, unit_hash
from preprocessing.schema import decode_batch, list_shards, read_manifest

WL = 1024


def make_config(out: Path, **pack) -> PreprocessConfig:
    return PreprocessConfig(output=str(out), pack=PackConfig(window_length=WL, val_fraction=0.1, **pack))


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(seed=0)


def run(ray, rows, cfg):
    """Several blocks, so that several Ray tasks run and finish in any order."""
    table = series_table(rows)
    blocks = [table.slice(i, 9) for i in range(0, table.num_rows, 9)]
    return run_preprocess(cfg, series=ray.data.from_arrow(blocks))


def read_segments(out: Path, split: str) -> dict[str, list[np.ndarray]]:
    """series key -> list of segments mapped back to raw units."""
    segs: dict[str, list[np.ndarray]] = {}
    for path in list_shards(str(out), split):
        table = pq.read_table(path)
        dense = decode_batch({c: table.column(c) for c in ("values", "segment_ids", "loss_mask")})
        means, stds, keys = (table.column(c).to_pylist() for c in ("seg_mean", "seg_std", "seg_series"))
        for r in range(table.num_rows):
            ids = dense["segment_ids"][r]
            assert np.array_equal(dense["loss_mask"][r], ids > 0)
            for k, key in enumerate(keys[r]):
                piece = dense["values"][r][ids == k + 1].astype(np.float64) * stds[r][k] + means[r][k]
                segs.setdefault(key, []).append(piece)
    return segs


def test_run_accounts_for_every_point_and_writes_each_once(ray_local, rows, tmp_path):
    out = tmp_path / "out"
    result = run(ray_local, rows, make_config(out))
    rep = json.loads((out / "report.json").read_text())
    for key in ("points_in", "points_kept", "points_dropped", "series_in", "series_kept", "series_dropped", "domains", "datasets"):
        assert key in rep
    assert rep["points_in"] == sum(len(r["values"]) for r in rows if not r.get("quarantine_reason")) + 1234
    assert rep["points_in"] == rep["points_kept"] + sum(rep["points_dropped"].values())
    assert rep["series_in"] == len(rows) == rep["series_kept"] + sum(rep["series_dropped"].values())
    for block in list(rep["datasets"].values()) + list(rep["domains"].values()):
        assert block["points_in"] == block["points_kept"] + sum(block["points_dropped"].values())
        assert block["series_in"] == block["series_kept"] + sum(block["series_dropped"].values())
    assert rep["points_dropped"]["quarantine:bad_meta"] == 1234
    assert rep["quarantine"][0]["message"].startswith("/data/broken/meta.json")
    assert rep["points_dropped"]["duplicate"] == len(rows[0]["values"])

    # Every kept point appears exactly once, and maps back to the raw series (float32 precision).
    segs = {**read_segments(out, "train"), **read_segments(out, "val")}
    raw = {f"{r['domain']}/{r['dataset']}/{r['series']}": np.asarray(r["values"], np.float32) for r in rows}
    total = 0
    for key, pieces in segs.items():
        x = raw[key].astype(np.float64)
        kept_runs = clean_series(raw[key], PreprocessConfig().clean).runs
        expected = np.concatenate([x[s:e] for s, e in kept_runs])
        got = np.concatenate(pieces)  # within a series, chunks keep order only per row; compare sorted
        assert len(got) == len(expected), key
        np.testing.assert_allclose(np.sort(got), np.sort(expected), rtol=1e-5, atol=1e-4)
        total += len(got)
    assert total == rep["points_kept"] == result.manifest["counts"]["total"]["points_kept"]

    # val split chosen by key hash; no series in both splits
    val_keys = set(read_segments(out, "val"))
    assert val_keys and all(unit_hash("val|" + k) < 0.1 for k in val_keys)
    assert not val_keys & set(read_segments(out, "train"))

    # dedup: of the identical pair the copy with the smaller key hash survives
    pair = ["energy/energy_set0/s0", "web/web_copy/dup_of_s0"]
    survivor = min(pair, key=hash64)
    assert survivor in segs and (set(pair) - {survivor}).isdisjoint(segs)

    manifest = read_manifest(str(out))
    assert manifest["schema_version"] == 1 and manifest["window_length"] == WL
    assert manifest["rows"]["train"] == sum(s["rows"] for s in manifest["shards"]["train"])
    assert 0 < manifest["packing_efficiency"]["train"] <= 1
    assert not list(out.glob("_tmp-*"))


def test_rerun_gives_byte_identical_shards(ray_local, rows, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(ray_local, rows, make_config(a))
    run(ray_local, rows, make_config(b))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files_a and files_a == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # re-running INTO the same folder replaces the output and stays identical
    run(ray_local, rows, make_config(a))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_killed_run_never_looks_complete(ray_local, rows, tmp_path, monkeypatch):
    import preprocessing.job as job

    out = tmp_path / "out"
    cfg = make_config(out)
    cfg.output_options.rows_per_shard = 8

    # (1) crash after every shard is written to the temporary folder, before publishing
    def broken_check(acc):
        raise RuntimeError("simulated crash before publish")

    monkeypatch.setattr(job, "check_invariant", broken_check)
    with pytest.raises(RuntimeError, match="before publish"):
        run(ray_local, rows, cfg)
    assert not (out / "manifest.json").exists() and not list(out.glob("_tmp-*"))
    monkeypatch.undo()

    # (2) a complete run, then a re-run that dies half-way through publishing its shards
    run(ray_local, rows, cfg)
    assert read_manifest(str(out))

    def dying_publish(fs, output, tmp, files_by_split, files, manifest):
        fs.delete_file(output + "/manifest.json")  # what publish does first
        fs.move(files_by_split["train"][0], output + "/train/shard-00000.parquet")
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(job, "publish", dying_publish)
    with pytest.raises(KeyboardInterrupt):
        run(ray_local, rows, cfg)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("_tmp-*"))
    with pytest.raises(FileNotFoundError, match="run incomplete"):
        read_manifest(str(out))


def test_mixture_weights_repeat_and_downsample(ray_local, rows, tmp_path):
    out = tmp_path / "mix"
    cfg = make_config(out)
    cfg.mixture = MixtureConfig(weights={"energy": 2.5, "web": 0.0})
    result = run(ray_local, rows, cfg)
    rep = result.report
    energy, web = rep["domain_counts"]["energy"], rep["domain_counts"]["web"]
    train_energy = energy["points_kept"] - energy["points_val"]
    # 2.5 = every train chunk twice + a hash-chosen ~50% once more
    assert train_energy <= energy["points_repeated"] <= 2 * train_energy
    assert energy["points_repeated"] > 1.1 * train_energy
    assert web["points_kept"] == web["points_val"]  # weight 0: only val (unweighted) survives
    assert web["points_dropped"]["mixture_downsample"] > 0
    assert result.manifest["mixture_weights"]["energy"] == 2.5
    written = sum(s["points"] for s in result.manifest["shards"]["train"] + result.manifest["shards"]["val"])
    assert written == rep["points_kept"] + rep["points_repeated"]


def test_invariant_check_names_the_broken_dataset():
    acc = Accounting()
    t = acc.tally("energy", "solar")
    t.add_series(100, {"nonfinite": 10}, 90)
    check_invariant(acc)
    t.points_kept += 1
    with pytest.raises(AccountingError, match="energy/solar: points_in 100"):
        check_invariant(acc)


def test_config_yaml_round_trip_and_unknown_key(tmp_path):
    cfg = PreprocessConfig(inputs=["a"], output="b")
    cfg.mixture.weights = {"nature": 0.3}
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    with pytest.raises(ValueError, match="unknown key 'window' in section 'pack' \\(did you mean 'window_length'\\?\\)"):
        config_from_dict({"pack": {"window": 5}})


def test_values_of_handles_sliced_and_chunked_columns():
    import pyarrow as pa

    from preprocessing.job import _values_of, dataset_of

    a = pa.array([[1, 2], [3, 4, 5], [6]], pa.large_list(pa.float32()))
    flat, offs = _values_of(pa.table({"values": a}).slice(1))
    assert flat[offs[0]:offs[1]].tolist() == [3, 4, 5] and flat[offs[1]:offs[2]].tolist() == [6]
    two = pa.concat_tables([pa.table({"values": a}).slice(0, 1), pa.table({"values": a}).slice(2)])
    flat, offs = _values_of(two)
    assert flat[offs[1]:offs[2]].tolist() == [6]
    assert dataset_of("other/gas/GasRate(ft3/min)") == "other/gas"


def test_accounting_travels_through_pack_and_write(tmp_path):
    """The clean block's tally rides in one carrier row through pack_and_write and comes back
    intact in its metadata table; carrier rows are not packed."""
    import pyarrow as pa

    from preprocessing.config import OutputConfig
    from preprocessing.job import ACCOUNTING_SPLIT, accounting_row, decode_carrier, pack_and_write
    from preprocessing.schema import TRAIN_DIR

    acc = Accounting()
    acc.tally("d", "ds").add_series(500, {"short_tail": 10}, 490)
    chunk = pa.table({"split": [TRAIN_DIR], "key": ["d/ds/0"],
                      "values": pa.array([np.arange(490, dtype=np.float32)], pa.large_list(pa.float32())),
                      "mean": [0.0], "std": [1.0]})
    table = pa.concat_tables([pa.Table.from_arrays(chunk.columns, schema=accounting_row(acc).schema), accounting_row(acc)])
    meta = pack_and_write(table, 511, str(tmp_path), "_tmp", OutputConfig(), 0).to_pylist()
    carried = [m for m in meta if m["split"] == ACCOUNTING_SPLIT]
    written = [m for m in meta if m["split"] == TRAIN_DIR]
    assert len(carried) == 1 and sum(m["points"] for m in written) == 490
    back = decode_carrier(carried[0]["path"])["acc"]
    assert back.datasets.keys() == acc.datasets.keys()
    t = back.tally("d", "ds")
    assert (t.points_in, t.points_kept, t.points_dropped) == (500, 490, {"short_tail": 10})
    shard = pq.read_table(written[0]["path"])
    assert shard.schema.metadata[b"timemoe.layout"] == b"bytes"


def test_blocks_pack_in_task_and_dedup_fixup_redoes_only_affected_blocks(ray_local, rows, tmp_path, caplog):
    """With pack batches small enough that every read block packs and writes its own chunks
    (no chunk crosses the object store), the result keeps every invariant; the duplicate found
    by the speculative first pass is removed by redoing only the block that holds the dropped
    copy; re-runs are byte-identical."""
    import logging

    from preprocessing.job import ACCOUNTING_SPLIT, StageContext, process_block

    cfg = make_config(tmp_path / "x", pack_batch_chunks=4)
    table = series_table(rows)
    out = process_block(table.slice(0, 9), StageContext(cfg), "_tmp", fingerprint=True)
    splits = set(out.column("split").to_pylist())
    assert splits <= {"#file", ACCOUNTING_SPLIT}, splits  # packed and written in the task, no chunk rows

    with caplog.at_level(logging.INFO, logger="preprocessing.job"):
        a = run(ray_local, rows, make_config(tmp_path / "a", pack_batch_chunks=4))
    assert "dedup fix-up: redid 1 blocks" in caplog.text
    rep = a.report
    assert rep["points_in"] == rep["points_kept"] + sum(rep["points_dropped"].values())
    assert rep["points_dropped"]["duplicate"] == len(rows[0]["values"])
    segs = {**read_segments(tmp_path / "a", "train"), **read_segments(tmp_path / "a", "val")}
    assert sum(len(p) for pieces in segs.values() for p in pieces) == rep["points_kept"]
    pair = ["energy/energy_set0/s0", "web/web_copy/dup_of_s0"]
    survivor = min(pair, key=hash64)
    assert survivor in segs and (set(pair) - {survivor}).isdisjoint(segs)
    assert not list((tmp_path / "a").glob("_tmp-*"))

    run(ray_local, rows, make_config(tmp_path / "b", pack_batch_chunks=4))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.parquet"))
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_publish_is_manifest_last_and_clears_temp_folders_of_killed_runs(tmp_path):
    import json as _json

    import pyarrow.fs as pafs

    from preprocessing.writer import publish

    out = tmp_path / "packed"
    killed = out / "_tmp-killedrun000"  # what a run killed before publishing leaves behind
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "part-x.parquet").write_bytes(b"half")
    tmp = out / "_tmp-thisrun0000"
    (tmp / "train").mkdir(parents=True)
    (tmp / "train" / "part-a.parquet").write_bytes(b"shard")
    publish(pafs.LocalFileSystem(), str(out), str(tmp), {"train": [str(tmp / "train" / "part-a.parquet")]},
            {"report.json": b"{}"}, {"rows": {"train": 1}})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.json", "train"]
    assert (out / "train" / "shard-00000.parquet").read_bytes() == b"shard"
    assert _json.loads((out / "manifest.json").read_text()) == {"rows": {"train": 1}}
