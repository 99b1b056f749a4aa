"""Time-300B writer and reader (preprocessing/time300b.py) against a slow, independent reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocessing.ingest import IngestConfig, plan_inputs, read_series_local
from preprocessing.time300b import load_meta, write_time300b_dataset


def reference_read(folder: Path) -> list[np.ndarray]:
    """Slow reference: concatenate every file, then cut each sequence by its scale entry."""
    meta = json.loads((folder / "meta.json").read_text())
    names = sorted(meta["files"], key=lambda n: int(n.split("-")[1]))
    flat = np.concatenate([np.fromfile(folder / n, dtype=np.float32) for n in names])
    out = []
    for s in meta["scales"]:
        x = flat[s["offset"]: s["offset"] + s["length"]].astype(np.float64)
        if "mean" in s:
            x = x * s["std"] + s["mean"]
        out.append(x)
    return out


def _values(table) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in table.column("values").to_pylist()]


def _random_sequences(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=int(rng.integers(1, 60))) * 7 + 3).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("block", [1, 50, 10**6])
def test_round_trip_straddling_and_scales(tmp_path, block):
    seqs = _random_sequences(0, 40)
    scales = [(float(i), 0.5 + i % 3) if i % 3 == 0 else None for i in range(len(seqs))]
    folder = tmp_path / "energy" / "ds"
    meta = write_time300b_dataset(str(folder), seqs, max_elements_per_file=37, scales=scales)
    assert len(meta["files"]) > 10 and sum(meta["files"].values()) == sum(len(s) for s in seqs)
    # at least one sequence straddles a file boundary
    bounds = np.cumsum(list(meta["files"].values()))
    assert any(s["offset"] < b < s["offset"] + s["length"] for s in meta["scales"] for b in bounds)
    assert all(("mean" in e) == (scales[i] is not None) for i, e in enumerate(meta["scales"]))
    table = read_series_local([str(folder)], config=IngestConfig(block_elements=block))
    assert table.column("domain").unique().to_pylist() == ["energy"]
    assert table.column("dataset").unique().to_pylist() == ["ds"]
    assert table.column("series").to_pylist() == [str(i) for i in range(len(seqs))]
    got = _values(table)
    ref = reference_read(folder)
    for i, (g, r, s) in enumerate(zip(got, ref, seqs)):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-5, err_msg=f"sequence {i}")
        np.testing.assert_allclose(g, s, rtol=1e-5, atol=1e-4, err_msg=f"sequence {i} vs raw")
    assert table.column("claimed_points").to_pylist() == [len(s) for s in seqs]


def test_unordered_offsets_use_gather(tmp_path):
    """Scale entries need not tile the files in order (nor cover them): the reader gathers them.
    (Overlapping entries are quarantined: tests/test_bad_inputs_preprocess.py.)"""
    folder = tmp_path / "web" / "shuffled"
    folder.mkdir(parents=True)
    flat = np.arange(100, dtype=np.float32)
    flat.tofile(folder / "data-1-of-1.bin")
    scales = [{"offset": 60, "length": 10}, {"offset": 0, "length": 5}, {"offset": 30, "length": 20},
              {"offset": 82, "length": 3, "mean": 1.0, "std": 2.0}]
    (folder / "meta.json").write_text(json.dumps({"num_sequences": 4, "dtype": "float32",
                                                  "files": {"data-1-of-1.bin": 100}, "scales": scales}))
    got = _values(read_series_local([str(folder)]))
    for g, r in zip(got, reference_read(folder)):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(got[3], np.array([82, 83, 84]) * 2.0 + 1.0)


def test_root_of_domain_folders(tmp_path):
    layout = {("energy", "a"): 3, ("energy", "b"): 2, ("nature", "c"): 4}
    for (domain, name), n in layout.items():
        write_time300b_dataset(str(tmp_path / domain / name), _random_sequences(n, n))
    specs = plan_inputs([str(tmp_path)])
    assert {(s.domain, s.dataset) for s in specs} == set(layout)
    table = read_series_local([str(tmp_path)])
    counts = {}
    for d, ds in zip(table.column("domain").to_pylist(), table.column("dataset").to_pylist()):
        counts[(d, ds)] = counts.get((d, ds), 0) + 1
    assert counts == layout


def test_chunks_carry_only_their_slice(tmp_path):
    """The planner parses meta.json once; each read unit holds a contiguous slice of it."""
    seqs = [np.full(100, i, np.float32) for i in range(50)]
    write_time300b_dataset(str(tmp_path / "sales" / "big"), seqs, max_elements_per_file=1000)
    specs = plan_inputs([str(tmp_path / "sales" / "big")], config=IngestConfig(block_elements=1000))
    assert len(specs) == 5
    assert [s.chunk.first for s in specs] == [0, 10, 20, 30, 40]
    assert all(len(s.chunk.offsets) == 10 for s in specs)
    meta = load_meta(str(tmp_path / "sales" / "big"))
    assert meta.total_points == 5000
