"""Expert parallelism: dispatcher permutation logic, all-to-all vs local dispatch on 2 gloo ranks,
and ep=2 vs ep=1 training equivalence under DeepSpeed ZeRO-1/2 (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from pipeline.parallel.ep_dispatch import regroup_by_local_expert
from tests._ep_helpers import dispatcher_worker, run_two_ranks, train_worker

moe = pytest.importorskip("model.moe", reason="model.moe not written yet")


def plan_dispatch(topk_idx_TK, num_experts):
    """Reference planning, written independently of the dispatcher: stable sort of the
    (token, slot) pairs by expert, the token of each sorted row, rows per expert."""
    k = topk_idx_TK.shape[1]
    order_N = torch.argsort(topk_idx_TK.reshape(-1), stable=True)
    return dict(order_N=order_N, token_of_row_N=order_N // k,
                counts_E=torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts))


def combine(y_sorted_ND, plan, topk_weight_TK, num_tokens):
    """Reference combine: weighted scatter-add of each sorted row onto its token."""
    w_N = topk_weight_TK.reshape(-1)[plan["order_N"]]
    y_TD = y_sorted_ND.new_zeros(num_tokens, y_sorted_ND.shape[1])
    return y_TD.index_add(0, plan["token_of_row_N"], (y_sorted_ND.to(w_N.dtype) * w_N[:, None]).to(y_sorted_ND.dtype))


def _simulate_two_rank_dispatch(xs, idxs, ws, experts_per_rank, num_experts):
    """The AllToAllDispatcher's data movement with the two all-to-alls done by hand."""
    S, El = len(xs), num_experts // len(xs)
    plans = [plan_dispatch(i, num_experts) for i in idxs]
    sends = [list(torch.split(x[p["token_of_row_N"]], p["counts_E"].view(S, El).sum(1).tolist())) for x, p in zip(xs, plans)]
    ys_back = [[None] * S for _ in range(S)]
    for dst in range(S):
        counts_recv_SE = torch.stack([p["counts_E"].view(S, El)[dst] for p in plans])
        x_recv = torch.cat([sends[src][dst] for src in range(S)])
        perm = regroup_by_local_expert(counts_recv_SE)
        y_local = experts_per_rank[dst](x_recv[perm], counts_recv_SE.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local)
        for src, part in enumerate(torch.split(y_recv, counts_recv_SE.sum(1).tolist())):
            ys_back[src][dst] = part
    return [combine(torch.cat(ys_back[r]), plans[r], ws[r], xs[r].shape[0]) for r in range(S)]


def _sliced_experts(full, lo, hi):
    part = moe.GroupedExperts(hi - lo, full.gate_proj.shape[2], full.gate_proj.shape[1])
    with torch.no_grad():
        for name, p in part.named_parameters():
            p.copy_(getattr(full, name)[lo:hi])
    return part


def test_regroup_by_local_expert_orders_blocks_by_expert_then_source():
    counts_recv_SE = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rank 0 sends 2,0,1; rank 1 sends 1,3,0
    # received rows: r0e0 r0e0 r0e2 | r1e0 r1e1 r1e1 r1e1  ->  e0: 0,1,3  e1: 4,5,6  e2: 2
    assert regroup_by_local_expert(counts_recv_SE).tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_simulated_two_rank_dispatch_matches_local_dispatcher_with_empty_splits():
    torch.manual_seed(0)
    E, D, F, T, K = 8, 16, 12, 10, 2
    full = moe.GroupedExperts(E, D, F)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2 * T, D)
    idx = torch.stack([torch.randperm(E - 1)[:K] + 1 for _ in range(2 * T)])  # expert 0 gets nothing
    idx[T:] = torch.stack([torch.randperm(4)[:K] + 4 for _ in range(T)])  # rank 1 sends nothing to rank 0
    w = torch.rand(2 * T, K)
    ref = moe.LocalDispatcher()(x, idx, w, full)
    got = _simulate_two_rank_dispatch([x[:T], x[T:]], [idx[:T], idx[T:]], [w[:T], w[T:]],
                                      [_sliced_experts(full, 0, 4), _sliced_experts(full, 4, 8)], E)
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], torch.zeros_like(got[0]))


def test_all_to_all_dispatcher_on_two_gloo_ranks_matches_local_forward_and_backward(tmp_path):
    results = run_two_ranks(dispatcher_worker, tmp_path, 8, 12, 16, 12)
    for scenario in ("mixed", "starve0", "mixed+shared", "mixed+shared-chunks3", "starve0-chunks3"):
        for r, by_scenario in enumerate(results):
            res, where = by_scenario[scenario], f"{scenario} rank {r}"
            assert res["rows_received"] == res["rows_expected"], where
            if res["g_shared"] is not None:  # the concurrent branch is added and gets its gradient
                torch.testing.assert_close(res["g_shared"], res["g_shared_ref"], rtol=1e-5, atol=1e-6, msg=f"{where} d/dshared")
            torch.testing.assert_close(res["y"], res["y_ref"], rtol=1e-5, atol=1e-6, msg=f"{where} output")
            torch.testing.assert_close(res["gx"], res["gx_ref"], rtol=1e-5, atol=1e-6, msg=f"{where} d/dx")
            torch.testing.assert_close(res["gw"], res["gw_ref"], rtol=1e-5, atol=1e-6, msg=f"{where} d/dweights")
            for name, g in res["gexp"].items():
                assert g is not None, f"{where} {name}: no gradient"
                # chunks sum the weight gradient in another order: tolerance relative to its scale
                ref = res["gexp_ref"][name]
                torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6 * max(1.0, float(ref.abs().max())), msg=f"{where} {name}")
    # nothing is routed to expert 0 ("mixed") or to any of rank 0's experts ("starve0"):
    # their gradients must be exactly zero, while rank 1's are not
    assert torch.count_nonzero(results[0]["mixed"]["gexp"]["gate_proj"][0]) == 0
    for starve in ("starve0", "starve0-chunks3"):
        assert torch.count_nonzero(results[0][starve]["gexp"]["gate_proj"]) == 0
        assert torch.count_nonzero(results[1][starve]["gexp"]["gate_proj"]) > 0
        assert results[0][starve]["rows_received"] == 0
    # the branch really contributes (otherwise the "+shared" comparison would be vacuous)
    assert not torch.allclose(results[0]["mixed+shared"]["y"], results[0]["mixed"]["y"])
    # backward order: the row gradients' exchange (the second one of the backward) is started
    # before the shared expert's backward and waited on after it. In 3 chunks: the 3 output-gradient exchanges start at once, then per
    # chunk (last first) wait for its own, run its experts' backward while the others are in
    # flight and start its row-gradient exchange; the shared backward overlaps all 3 of those.
    for r in range(2):
        assert results[r]["mixed+shared"]["backward_events"] == [
            "a2a_start", "a2a_wait", "a2a_start", "shared_bwd", "a2a_wait"]
        assert results[r]["mixed+shared-chunks3"]["backward_events"] == (
            ["a2a_start"] * 3 + ["a2a_wait", "a2a_start"] * 3 + ["shared_bwd"] + ["a2a_wait"] * 3)


STEPS = 5


def _require_full_model():
    try:
        from model import TimeMoeModel  # noqa: F401
    except ImportError:
        pytest.skip("model.TimeMoeModel not written yet")


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    _require_full_model()
    runs = [(stage, ep, 0.0, "adamw") for stage in (1, 2) for ep in (1, 2)]
    runs += [(2, ep, 0.05, "adamw") for ep in (1, 2)]  # clipping active: the grad norm must span all experts
    runs += [(1, ep, 0.0, "sgd") for ep in (1, 2)]  # SGD: sensitive to the expert-gradient scale
    return run_two_ranks(train_worker, tmp_path_factory.mktemp("ep"), runs, STEPS, 32)


@pytest.mark.parametrize("stage,clip,opt", [(1, 0.0, "adamw"), (2, 0.0, "adamw"), (2, 0.05, "adamw"), (1, 0.0, "sgd")])
def test_ep2_matches_ep1_losses_and_weights_under_zero(ep_runs, stage, clip, opt):
    for rank, res in enumerate(ep_runs):
        base, ep2 = res[(stage, 1, clip, opt)], res[(stage, 2, clip, opt)]
        torch.testing.assert_close(torch.tensor(ep2["losses"]), torch.tensor(base["losses"]), rtol=1e-4, atol=0,
                                   msg=f"rank {rank} losses")
        # the weights moved (same batch every step, so a changing loss means changed weights):
        # the comparison is not vacuous
        assert max(base["losses"]) - min(base["losses"]) > 1e-3, base["losses"]
        assert base["weights"].keys() == ep2["weights"].keys()
        for name, w in base["weights"].items():
            torch.testing.assert_close(ep2["weights"][name], w, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
    # sanity: the weights moved, and experts on the two EP ranks differ (no accidental broadcast)
    name = next(n for n in ep_runs[0][(stage, 2, clip, opt)]["weights"] if n.endswith("experts.gate_proj"))
    w = ep_runs[0][(stage, 2, clip, opt)]["weights"][name]
    half = w.shape[0] // 2
    assert not torch.allclose(w[:half], w[half:])


def test_zero3_with_expert_parallel_is_refused(ep_runs):
    assert "ZeRO Stage 3" in (ep_runs[0]["zero3_error"] or ""), ep_runs[0]["zero3_error"]


def test_apply_expert_parallel_rejects_bad_sizes_and_dense_models():
    from pipeline.parallel.expert_parallel import apply_expert_parallel
    from tests._ep_helpers import make_model

    _require_full_model()
    model = make_model(seed=0)
    n_experts = next(m.experts.gate_proj.shape[0] for m in model.modules() if hasattr(m, "dispatcher"))
    with pytest.raises(ValueError, match=f"ep_size=3 must divide num_experts={n_experts}"):
        apply_expert_parallel(model, ep_size=3)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        apply_expert_parallel(model, ep_size=2)
    with pytest.raises(ValueError, match="no MoE layers"):
        apply_expert_parallel(torch.nn.Sequential(torch.nn.Linear(2, 2)), ep_size=2)
    info = apply_expert_parallel(model, ep_size=1)  # EP = 1 leaves the model untouched
    assert info.num_local_experts == n_experts and isinstance(info.moe_layers, list) and info.moe_layers
    assert all(type(m.dispatcher).__name__ == "LocalDispatcher" for m in model.modules() if hasattr(m, "dispatcher"))


def test_ep_layer_benchmark_on_two_gloo_ranks_counts_the_hot_rank_and_matches_ep1(tmp_path):
    """benchmarks/ep_layer.py --cpu: the routing regimes load the ranks as documented, and the EP
    layer (the overlapped dispatcher, alone and pipelined in chunks)
    reproduces ep = 1 on the same tokens. (The compiled-experts rows are CUDA only.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests._train_helpers import free_port

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ep_layer.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         str(repo / "benchmarks/ep_layer.py"), "--cpu", "--presets", "tiny:1", "--window", "48", "--iters", "1",
         "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["regime"] != "all_to_all_bandwidth"]
    copies = 48 * 2  # tokens per rank x top-2
    by = {(r["regime"], r["ep"], r["dispatcher"]): r for r in rows}
    assert set(by) == {(g, 1, "local") for g in ("balanced", "collapsed")} | {
        (g, 2, d) for g in ("balanced", "collapsed") for d in ("overlap", "overlap-c2")}
    for (regime, ep, _), r in by.items():
        assert r["max_rel_err"] < 1e-5, r
        if ep == 2:  # balanced: every rank gets its share; collapsed: experts 0, 1 = rank 0 gets all
            assert r["rows_received_max"] == (copies if regime == "balanced" else 2 * copies), r


def test_compile_under_ep_wraps_the_parts_the_dispatcher_calls():
    """With EP the dispatcher runs outside the layer's graph, so apply_compile must compile the
    shared expert and the routed experts on their own; without EP neither is compiled on its
    own (they are inside the compiled layer)."""
    from model import TimeMoeConfig, TimeMoeModel
    from pipeline.parallel.parallelize import apply_compile

    def compiled(module) -> bool:
        return getattr(module, "_compiled_call_impl", None) is not None

    for expert_parallel in (True, False):
        model = TimeMoeModel(TimeMoeConfig.preset("tiny"))
        apply_compile(model, expert_parallel=expert_parallel)
        moes = [m for m in model.modules() if hasattr(m, "dispatcher")]
        assert moes
        for moe in moes:
            assert compiled(moe.shared_expert) is expert_parallel
            assert compiled(moe.experts) is expert_parallel
