"""Placement "as the config says" on a two-node Ray cluster simulated on this machine.

``ray.cluster_utils.Cluster`` starts a head that runs no work (``CPU: 0``, as in cluster.yaml)
and two worker nodes that advertise cluster.yaml's custom resources: a "gpu-like" trainer node
(``trainer``) and a CPU data node (``data``). The real preprocessing job runs with
``task_resources: {data: 1}`` and the real Ray Train run with ``scaling.resources_per_worker:
{trainer: 1}``; Ray's state API then says on which node every task and worker ran.

The trainer node has the MORE free CPUs, so without the ``data`` marker Ray would put
preprocessing tasks there too (cluster.yaml's reason for the marker); with it, only the data
node qualifies.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests._train_helpers import free_port, tiny_config

TINY_CPU = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def _restore_session_ray(was_initialized: bool) -> None:
    """The suite's session Ray (conftest ``ray_local``) was shut down to connect to the simulated
    cluster; later modules expect it back with the same settings."""
    import ray

    if was_initialized and not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_initialized = ray.is_initialized()
    if was_initialized:
        ray.shutdown()  # one driver per process: leave the session's local Ray for this cluster
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0,  # as cluster.yaml's head: job drivers only
        "include_dashboard": True,  # the state API (where did each task run?) is served by the dashboard
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
    })
    try:
        trainer = c.add_node(num_cpus=2, resources={"trainer": 2})
        data = c.add_node(num_cpus=1, resources={"data": 2})
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield {"trainer": trainer.node_id, "data": data.node_id, "head": c.head_node.node_id}
    finally:
        ray.shutdown()
        c.shutdown()
        _restore_session_ray(was_initialized)


def _tasks_when_settled(job_id: str, since: set[str], timeout: float = 60.0) -> list:
    """Normal (non-actor) tasks of ``job_id`` not in ``since``, once every one of them is
    FINISHED (task events reach the state API with a delay of about a second)."""
    from ray.util.state import list_tasks

    deadline = time.time() + timeout
    while True:
        tasks = [t for t in list_tasks(filters=[("job_id", "=", job_id), ("type", "=", "NORMAL_TASK")],
                                       detail=True, limit=10_000, raise_on_missing_output=False)
                 if t.task_id not in since]
        if tasks and all(t.state == "FINISHED" for t in tasks):
            time.sleep(1.5)  # one more flush interval: nothing late may be missing
            again = [t for t in list_tasks(filters=[("job_id", "=", job_id), ("type", "=", "NORMAL_TASK")],
                                           detail=True, limit=10_000, raise_on_missing_output=False)
                     if t.task_id not in since]
            if len(again) == len(tasks) and all(t.state == "FINISHED" for t in again):
                return again
        if time.time() > deadline:
            raise AssertionError(f"tasks did not settle: {[(t.name, t.state) for t in tasks]}")
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_preprocessing_on_data_node_and_trainers_on_trainer_node(cluster, tmp_path):
    import ray
    from ray.util.state import list_actors, list_tasks

    from pipeline.config import config_from_dict
    from pipeline.train.ray_runtime import run_ray
    from preprocessing.config import config_from_dict as preprocess_config
    from preprocessing.job import run_preprocess
    from preprocessing.synthetic import generate_default_corpus

    job_id = ray.get_runtime_context().get_job_id()
    before = {t.task_id for t in list_tasks(filters=[("job_id", "=", job_id)], limit=10_000,
                                            raise_on_missing_output=False)}

    # -- preprocessing: the real job (read -> fingerprint/clean/pack/write per block -> pack the rest) with the marker
    corpus = generate_default_corpus(str(tmp_path / "corpus"), seed=0, scale=0.05)
    pre = preprocess_config({
        "inputs": [corpus["root"]], "output": str(tmp_path / "packed"),
        "clean": {"window": 128, "min_run_length": 257, "min_series_length": 257},
        "pack": {"window_length": 64, "val_fraction": 0.05, "pack_batch_chunks": 64},
        "output_options": {"rows_per_shard": 64},
        "task_resources": {"data": 1},
    })
    result = run_preprocess(pre)
    assert result.manifest["rows"]["train"] >= 16  # enough rows for the training below

    tasks = _tasks_when_settled(job_id, before)
    names = {t.name for t in tasks}
    # every stage ran as Ray tasks: the read, the per-block fingerprint + clean + pack + write,
    # and the pack + write of what small blocks left over
    for stage in ("_read_batch", "process_block", "pack_and_write"):
        assert any(stage in n for n in names), (stage, names)
    # Two kinds of Ray Data plumbing take no remote args in Ray 2.60 and stay unmarked
    # (docs/cluster.md "Placing work"): ``from_arrow``'s metadata task for the read plan's
    # spec rows, and the pass-through re-block of ``Dataset.repartition`` between clean and
    # pack. Every task of ours carries the marker and ran on the data node only.
    plumbing = ("StreamingRepartition", "get_table_block_metadata_schema")
    ours = [t for t in tasks if not t.name.startswith(plumbing)]
    assert len(ours) >= 2 and len(ours) < len(tasks)
    assert {(t.name, t.node_id) for t in ours} == {(t.name, cluster["data"]) for t in ours}
    assert all(t.required_resources.get("data") == 1 for t in ours), \
        {(t.name, str(t.required_resources)) for t in ours}
    assert not any("data" in t.required_resources for t in tasks if t.name.startswith(plumbing))

    # -- training: 2 Ray Train workers with the trainer marker, on the preprocessed shards
    cfg = config_from_dict(tiny_config(
        Path(pre.output), tmp_path / "train",
        data={"loader": "ray"},
        train={"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 4},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5, "resources_per_worker": {"trainer": 1}},
    ))
    res = run_ray(cfg)
    assert res.error is None, res.error
    assert res.metrics["step"] == 2

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == {cluster["trainer"]}, [(w.pid, w.node_id) for w in workers]
    # workers are placed through a placement group: their demand reads "trainer_group_<i>_<pg>"
    assert all(_amount(w.required_resources, "trainer") == 1 for w in workers), [w.required_resources for w in workers]


def _amount(resources: dict, name: str) -> float:
    """How much of resource ``name`` a demand holds, also inside a placement group bundle."""
    return max((v for k, v in resources.items() if k == name or k.startswith(f"{name}_group_")), default=0)


def test_placement_knobs_are_off_by_default_and_checked():
    """Empty knobs ask Ray for nothing extra (today's behaviour on one machine); CPU and GPU
    have their own settings and are refused in the custom-resource mappings."""
    from pipeline.config import load_config
    from preprocessing.config import PreprocessConfig, config_from_dict, validate
    from preprocessing.job import task_remote_args

    assert task_remote_args(PreprocessConfig()) == {}
    assert task_remote_args(config_from_dict({"task_resources": {"data": 1}})) == {"resources": {"data": 1}}
    for bad in ({"CPU": 1}, {"data": 0}, ["data"]):
        with pytest.raises(ValueError, match="task_resources"):
            validate(config_from_dict({"inputs": ["in"], "output": "out", "task_resources": bad}))

    assert load_config(TINY_CPU).scaling.resources_per_worker == {}
    cfg = load_config(TINY_CPU, ["scaling.resources_per_worker={trainer: 1}"])
    assert cfg.scaling.resources_per_worker == {"trainer": 1}
    for bad in ("{GPU: 1}", "{trainer: -1}", "[trainer]"):
        with pytest.raises(ValueError, match="resources_per_worker"):
            load_config(TINY_CPU, [f"scaling.resources_per_worker={bad}"])
