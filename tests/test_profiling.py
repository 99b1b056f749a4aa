"""Step profiling (``train.profile_steps``): kernel categories and the all-to-all share, on a
real 2-rank gloo run with and without expert parallelism."""
from __future__ import annotations

import json

import pytest

from pipeline.train.profiling import categorize, summarize
from tests._train_helpers import run_ranks, tiny_config, torchrun_worker, write_shards


@pytest.mark.parametrize("name,category", [
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all_to_all"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "reduce_scatter"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all_reduce"),
    ("ncclDevKernel_AllGather_RING_LL", "all_gather"),
    ("gloo:all_to_all", "all_to_all"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("triton_tem_fused_flex_attention_backward_0", "attention"),
    ("triton_poi_fused_mul_silu_3", "other_compute"),
])
def test_kernel_names_fall_in_the_right_category(name, category):
    assert categorize(name) == category


def test_summary_shares_are_per_wall_time():
    s = summarize([("ncclDevKernel_SendRecv", 300.0), ("nvjet_gemm", 500.0), ("ncclDevKernel_SendRecv", 100.0)],
                  wall_us=2000.0, steps=2)
    assert s["all_to_all_share"] == pytest.approx(0.2)
    assert s["busy_share"] == pytest.approx(0.45)
    assert s["kernel_ms_per_step"] == {"all_to_all": pytest.approx(0.2), "gemm": pytest.approx(0.25)}
    assert s["wall_ms_per_step"] == pytest.approx(1.0)


def test_profiled_steps_report_the_all_to_all_only_with_expert_parallelism(tmp_path):
    data = write_shards(tmp_path / "data")
    cfgs = [tiny_config(data, tmp_path / f"ep{ep}", parallel={"zero_stage": 1, "precision": "fp32", "ep_size": ep},
                        train={"profile_steps": [2, 3], "checkpoint_at_end": False, "max_steps": 4})
            for ep in (1, 2)]
    results = run_ranks(torchrun_worker, tmp_path / "res", 2, cfgs)
    for ep in (1, 2):
        for rank in (0, 1):
            prof = json.loads((tmp_path / f"ep{ep}" / "profile" / f"rank{rank}.json").read_text())
            assert prof["steps"] == 2
            comm = prof["kernel_ms_per_step"]
            assert comm.get("all_reduce", 0) + comm.get("all_gather", 0) + comm.get("reduce_scatter", 0) > 0  # ZeRO's traffic
            if ep == 1:
                assert "all_to_all" not in comm and prof["all_to_all_share"] == 0
            else:
                assert comm["all_to_all"] > 0 and 0 < prof["all_to_all_share"] < 1
        # the share is in the step's metrics too, only for the last profiled step
        hist = {h["step"]: h for h in results[0][ep - 1]["history"]}
        assert ("all_to_all_share" in hist[3]) and ("all_to_all_share" not in hist[2])
        # checkpoint_at_end=False: a benchmark run leaves no checkpoint behind
        assert not (tmp_path / f"ep{ep}" / "checkpoints").exists()


def test_profile_steps_are_validated():
    from pipeline.config import load_config

    with pytest.raises(ValueError, match="profile_steps"):
        load_config(None, ["train.profile_steps=[3, 2]"])
