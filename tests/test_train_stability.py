"""Steps with a non-finite loss or gradient norm are skipped, counted and logged, and too many in a
row stop the run with a clear message (the real loop, 2 gloo ranks, one training shard whose
values overflow the forward)."""
from __future__ import annotations

import math

import pytest

from tests._train_helpers import run_ranks, tiny_config, torchrun_worker, write_shards

STEPS = 8


def _losses(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_nonfinite_steps_are_skipped_with_and_without_zero(tmp_path):
    data = write_shards(tmp_path / "data", nan_train_shard=1)  # 16 rows = 2 steps of 8 windows
    cfgs = [tiny_config(data, tmp_path / f"z{stage}", parallel={"zero_stage": stage},
                        train={"max_steps": STEPS, "export": False, "max_nonfinite_in_row": 3})
            for stage in (0, 1)]
    results = run_ranks(torchrun_worker, tmp_path / "res", 2, cfgs)
    runs = {stage: results[0][i]["history"] for i, stage in enumerate((0, 1))}
    for stage, history in runs.items():
        losses = _losses(history)
        bad = [s for s, loss in losses if not math.isfinite(loss)]
        assert len(bad) == 2 and bad[1] == bad[0] + 1, (stage, losses)
        # the skipped updates left the weights intact: every later loss is finite
        assert all(math.isfinite(loss) for s, loss in losses if s > bad[1]), (stage, losses)
        assert [h for h in history if "loss" in h][-1]["nonfinite_steps"] == 2
    # without ZeRO the loop drops the update itself, ZeRO-1's overflow check does the same: the
    # same losses before, and after up to Adam's moments (they decay once without ZeRO: 4e-4)
    after = {stage: [loss for s, loss in _losses(h) if math.isfinite(loss)] for stage, h in runs.items()}
    assert after[0][:4] == pytest.approx(after[1][:4], rel=1e-6)
    assert after[0] == pytest.approx(after[1], rel=2e-3)
    assert math.isinf(next(h["grad_norm"] for h in runs[1] if not math.isfinite(h["loss"])))


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    data = write_shards(tmp_path / "data", nan_train_shard=1)
    cfg = tiny_config(data, tmp_path / "stop", train={"max_steps": STEPS, "export": False, "max_nonfinite_in_row": 2})
    with pytest.raises(AssertionError, match=r"FloatingPointError: 2 training steps in a row had a non-finite loss "
                                             r"or gradient norm .*train.max_nonfinite_in_row"):
        run_ranks(torchrun_worker, tmp_path / "res", 2, [cfg])


def test_early_stopping_on_the_held_out_loss(tmp_path):
    """At learning rate 0 the held-out loss never improves after the first evaluation: with
    patience 2 the run stops after 3 evaluations, not at max_steps."""
    from pipeline.train.loop import EarlyStop

    stop = EarlyStop(2)
    assert [stop.stop_after(x) for x in (1.0, 0.9, 0.95, 0.91, 0.92)] == [False, False, False, True, True]
    assert not any(EarlyStop(0).stop_after(x) for x in (1.0, 2.0, 3.0))
    data = write_shards(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "es", optim={"lr": 0.0, "warmup_steps": 0},
                      train={"max_steps": STEPS, "eval_every": 1, "early_stop_patience": 2, "export": False})
    history = run_ranks(torchrun_worker, tmp_path / "res", 2, [cfg])[0][0]["history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3], steps


def _unbroken_then_stopped_then_resumed(rank: int, world: int, unbroken: dict, stopped: dict) -> dict:
    """One rank: an unbroken run, then a run in another folder that a SIGTERM stops (sent by the
    test to rank 1 only), then the same command resumed, as a scheduler's restart would. Rank 0
    also returns the stopped run's MLflow status before the resume."""
    from pipeline.config import config_from_dict
    from pipeline.train.loop import run_training
    from pipeline.train.stop_request import TrainingStopped
    from pipeline.train.torchrun import TorchrunRuntime

    def losses(history: list[dict]) -> dict[int, float]:
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    cfg = config_from_dict(unbroken)
    whole = losses(run_training(cfg, TorchrunRuntime(cfg, False)).history)
    cfg = config_from_dict(stopped)
    try:
        run_training(cfg, TorchrunRuntime(cfg, False))
        stop = None
    except TrainingStopped as exc:
        stop = (exc.step, exc.signal_name)
    status = None
    if rank == 0:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.tracking_uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        status = [r.info.status for r in client.search_runs([exp.experiment_id])]
    resumed = losses(run_training(cfg, TorchrunRuntime(cfg, True)).history)
    return {"unbroken": whole, "stop": stop, "resumed": resumed, "status_after_stop": status}


def test_sigterm_on_one_rank_stops_every_rank_at_one_step_and_resuming_repeats_the_unbroken_run(tmp_path,
                                                                                                  mlflow_server):
    """A scheduler's SIGTERM (twice) reaching one rank only: both ranks stop at the end of the same step
    (the flag rides in the step's all-reduce), a checkpoint of that step is saved although none
    was due, the MLflow run is KILLED, and the resumed run's steps equal an unbroken run's, in the
    same MLflow run, FINISHED at the end."""
    import os
    import signal
    import threading
    import uuid

    from mlflow.tracking import MlflowClient

    from tests._train_helpers import read_metrics, wait_for_step

    steps = 48  # the signal lands within a step or two of step 3: a wide margin before the end
    data = write_shards(tmp_path / "data")
    unbroken = tiny_config(data, tmp_path / "unbroken", train={"max_steps": steps, "export": False})
    stopped_dir = tmp_path / "stopped"
    experiment = f"stopped-{uuid.uuid4().hex[:6]}"
    stopped = tiny_config(data, stopped_dir, train={"max_steps": steps, "export": False, "checkpoint_every": 0},
                          tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": experiment})
    sent = {}

    def stop_rank1() -> None:
        wait_for_step(stopped_dir, 3, timeout=600)
        pid = int((stopped_dir / "pids" / "rank1.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)  # as SLURM and a torchrun agent both send one: the second changes nothing
        sent["pid"] = pid

    thread = threading.Thread(target=stop_rank1, daemon=True)
    thread.start()
    ranks = run_ranks(_unbroken_then_stopped_then_resumed, tmp_path / "res", 2, unbroken, stopped)
    thread.join(timeout=5)
    assert "pid" in sent, "the signal was never sent"
    (at, name0), (at1, name1) = ranks[0]["stop"], ranks[1]["stop"]
    assert at == at1 and 3 <= at < steps, (at, at1)
    assert (name0, name1) == ("SIGTERM on another rank", "SIGTERM")
    saved = sorted(p.name for p in (stopped_dir / "checkpoints").iterdir())
    assert saved == [f"step{at:08d}", f"step{steps:08d}"]  # the stop's, and the resumed run's at its end
    # metrics.jsonl: the stopped run's steps 1..at, then the resumed run's at+1..steps, equal to the unbroken run's
    logged = {m["step"]: m["loss"] for m in read_metrics(stopped_dir) if "loss" in m}
    whole = ranks[0]["unbroken"]
    assert sorted(ranks[0]["resumed"]) == list(range(at + 1, steps + 1))
    assert sorted(logged) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert logged[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), (step, at)
    assert ranks[0]["status_after_stop"] == ["KILLED"]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, steps + 1))
