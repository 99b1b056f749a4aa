"""``benchmarks/train_step.py``: the windows axis, the released code's row when it cannot run, and
which released figure each of our rows is divided by (measured in the same call with the
released recipe's FlashAttention-2, else the quoted one for the same card)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import RELEASED_QUOTED, card_of, released_reference  # noqa: E402


def test_smoke_measures_every_windows_count_and_names_why_the_released_code_did_not_run(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--presets", "tiny", "--windows", "1", "2",
           "--length", "128", "--steps", "1", "--warmup", "1", "--device", "cpu",
           "--variants", "grouped", "released", "--inference", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    grouped = {r["windows"]: r for r in rows if r["variant"] == "grouped"}
    assert set(grouped) == {1, 2} and all(r["points_per_s"] > 0 for r in grouped.values())
    # --inference: the forward alone on the same batch, faster than the full step
    assert all(r["infer_points_per_s"] > r["points_per_s"] for r in grouped.values())
    released = [r for r in rows if r["variant"] == "released"]
    assert len(released) == 2 and all("--reference-dir not given" in r["error"] for r in released)


def test_released_reference_prefers_a_flash_attention_row_measured_in_the_same_call():
    assert card_of("NVIDIA H100 80GB HBM3") == "H100" and card_of("NVIDIA H200") == "H200"
    rows = [dict(preset="timemoe-50m", variant="released", windows=16, points_per_s=1.0, attention="eager"),
            dict(preset="timemoe-200m", variant="released", windows=16, points_per_s=2.0,
                 attention="flash_attention_2")]
    ref = released_reference(rows, "H200")
    # eager is not the released recipe: the quoted FlashAttention-2 figure stays the reference
    assert ref[("timemoe-50m", 16)] == (RELEASED_QUOTED[("H200", "timemoe-50m", 16)], "quoted (H200, not re-measured)")
    assert ref[("timemoe-200m", 16)] == (2.0, "measured in this call")
    assert ("timemoe-50m", 8) in ref and ("timemoe-50m", 8) not in released_reference([], "H100")


def test_flash_attn_stand_in_keeps_flash_attn_layout_and_causal_alignment():
    import pytest
    import torch

    from benchmarks.released_code import flash_attn_func_via_sdpa

    def naive(q, k, v, causal):  # [B, L, H, D], flash-attn's bottom-right causal alignment
        s = torch.einsum("blhd,bshd->bhls", q, k) / q.shape[-1] ** 0.5
        if causal:
            lq, lk = q.shape[1], k.shape[1]
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
        return torch.einsum("bhls,bshd->blhd", s.softmax(-1), v)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 16, generator=g) for _ in range(3))
    for causal in (True, False):
        torch.testing.assert_close(flash_attn_func_via_sdpa(q, k, v, causal=causal), naive(q, k, v, causal),
                                   rtol=1e-5, atol=1e-5)
    # a decode step: one query sees every key
    torch.testing.assert_close(flash_attn_func_via_sdpa(q[:, -1:], k, v, causal=True), naive(q[:, -1:], k, v, True),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="fewer queries than keys"):
        flash_attn_func_via_sdpa(q[:, -3:], k, v, causal=True)


def test_revisions_part_times_an_earlier_commit_beside_this_tree_in_one_table(tmp_path):
    """benchmarks/baseline_revisions.sh archives a commit's model code; gpu_training_speed.sh's
    "revisions" part runs train_step.py in it and in this tree; compare_revisions.py puts both in
    one table, each row against the first revision's."""
    base = tmp_path / "baseline"
    made = subprocess.run(["bash", "benchmarks/baseline_revisions.sh", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "BASELINE_DIR": str(base)}, timeout=60)
    assert made.returncode == 0, made.stderr
    (rev_dir,) = base.iterdir()
    assert rev_dir.name.startswith("01-") and (rev_dir / "model" / "moe.py").is_file()
    out = tmp_path / "out"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "REVISIONS": str(rev_dir), "PRESETS": "tiny",
           "WINDOWS": "1", "VARIANT": "grouped", "STEPS": "1", "NO_RELEASED": "1",
           "STEP_ARGS": "--device cpu --length 128 --warmup 1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_training_speed.sh", str(out), "revisions"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "revisions.json").read_text())
    assert [r["revision"] for r in rows] == [rev_dir.name, "working-tree"]
    assert rows[0]["x_first"] == 1.0 and rows[1]["points_per_s"] > 0
    assert rows[1]["x_first"] == rows[1]["points_per_s"] / rows[0]["points_per_s"]
    assert rev_dir.name in (out / "revisions.txt").read_text()


def test_tuned_flex_tiles_name_options_the_flex_kernels_take_and_fit_the_block_mask():
    """``TUNED_FLEX_TILES`` reaches the Triton templates only on a GPU, where a misspelt key is
    silently ignored (the kernel's defaults run): every key must be a forward or backward option
    that this torch's FlexAttention lowering reads, and every tile must divide the block mask's
    block (128), else the lowering rejects it. The outputs are checked on CUDA (tests/test_gpu.py)."""
    import inspect

    import torch._inductor.kernel.flex.flex_attention as lowering

    from model.attention import TUNED_FLEX_TILES

    source = inspect.getsource(lowering)
    known = {"fwd": ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"),
             "bwd": ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps", "num_stages")}
    assert set(TUNED_FLEX_TILES) == {32, 64}  # the published presets' head dims (ultra: 64)
    for head_dim, options in TUNED_FLEX_TILES.items():
        assert options, head_dim
        for key, value in options.items():
            kernel, _, name = key.partition("_")
            assert name in known.get(kernel, ()), key
            assert f'"{name}"' in source, f"{key}: this torch's flex lowering does not read {name!r}"
            if name.startswith("BLOCK"):
                assert value in (16, 32, 64, 128) and 128 % value == 0, key


def test_packed_block_masks_break_the_contiguous_blocks_premise_and_one_series_rows_keep_it():
    """Why FlexAttention's BLOCKS_ARE_CONTIGUOUS flag gave wrong outputs on packed rows: a query
    block inside a later series needs that series' first key block and the diagonal block, both
    partial, with full blocks between them. Counted on the CPU-built block mask."""
    import torch
    from flex_tiles import mask_premises
    from train_step import packed_segment_ids

    from model.attention import flex_block_mask

    seg = packed_segment_ids(4, 2048, 4, torch.Generator().manual_seed(0))
    packed = mask_premises(flex_block_mask(seg, seg))
    assert packed["partial_kv_not_contiguous"] > 0.3 and packed["full_kv_not_contiguous"] == 0.0
    one = torch.ones(2, 2048, dtype=torch.long)
    assert mask_premises(flex_block_mask(one, one)) == {"partial_kv_not_contiguous": 0.0,
                                                        "full_kv_not_contiguous": 0.0}
