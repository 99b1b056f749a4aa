"""The main job through ``ray job submit``, as docs/cluster.md runs it, against a real Ray head
with its dashboard on 127.0.0.1.

The head is started the way a user with the venv activated starts one (``ray start --head``,
``python`` on ``PATH`` is the venv's, which the jobs inherit), in a private ``--temp-dir`` and
on free ports, with ``--block`` so that this module owns its processes: teardown stops exactly
them (``ray stop`` would stop every Ray instance on the machine).

Two jobs share one output folder and one MLflow store (``MLFLOW_TRACKING_URI`` handed over in
the runtime env's ``env_vars``, as on the cluster):

1. a long job, stopped with ``ray job stop`` while it trains: nothing it left may look
   complete (the packed data is either published whole or not at all, no final model, no
   evaluation, nothing registered), and its processes are gone;
2. a quick job, the re-run: it must succeed next to the stopped one; its logs, its outputs and
   the MLflow run and model version are checked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._train_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
NAME = "timemoe-quickstart"  # configs/quickstart.yaml: register.name and the experiment
QUICK = ["--scale", "0.1", "train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=0",
         "train.log_every=2"]
# never finishes before it is stopped: 2000 steps, a checkpoint every 2
LONG = ["--scale", "0.1", "train.max_steps=2000", "train.eval_every=0", "train.checkpoint_every=2",
        "train.log_every=1"]


def user_env() -> dict[str, str]:
    """A shell with the venv activated (stack.md: no token auth, no usage stats)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "VIRTUAL_ENV")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # SIGTERM to `ray start --block` shuts down at once (default: drains the node for 30 s)
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    return env


@dataclass
class Head:
    address: str  # the dashboard / job API
    temp_dir: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)


def _own_processes(temp_dir: Path) -> list:
    """Processes of this module's Ray instance: every Ray process names its session folder
    (under our private temp dir) on its command line."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return mine


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM to the blocking ``ray start``: it shuts its node down; then any process of this
    instance still alive is killed by pid."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    left = _own_processes(temp_dir)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def head():
    # short and private: Ray's socket paths live under it (length limit ~107 characters)
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))
    dash = free_port()
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=user_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{(temp_dir / 'ray-start.log').read_text()}")
            try:
                urllib.request.urlopen(address + "/api/jobs/", timeout=2)  # the job API, not just the UI
                break
            except Exception:
                if time.time() > deadline:
                    raise TimeoutError(f"dashboard at {address} did not answer")
                time.sleep(0.5)
        yield Head(address, temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)


def submit(head: Head, sid: str, out: Path, job_args: list[str], wait: bool, timeout: float = 300):
    """``ray job submit --working-dir .`` from the repository root, the tracking URI in
    ``env_vars`` (docs/cluster.md, step 3)."""
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}}
    return ray_cli("job", "submit", "--address", head.address, "--submission-id", sid, "--working-dir", ".",
                   "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]),
                   "--", "python", "-m", "jobs.pipeline", "--output-dir", str(out), *job_args, timeout=timeout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(what)


def trained_steps(out: Path) -> int:
    files = list(out.glob("run-*/train/metrics.jsonl"))
    return sum(1 for _ in files[0].open()) if files else 0


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("submitted")


@pytest.fixture(scope="module")
def stopped(head, out):
    """The long job, stopped with ``ray job stop`` once it has checkpointed; what it left."""
    from ray.job_submission import JobStatus

    sid = f"qs-stopped-{uuid.uuid4().hex[:6]}"
    proc = submit(head, sid, out, LONG, wait=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = head.client()

    def mid_training() -> bool:
        status = client.get_job_status(sid)
        assert not status.is_terminal(), f"{status}:\n{client.get_job_logs(sid)[-4000:]}"
        return trained_steps(out) >= 3  # metrics of step 3 follow the checkpoint of step 2

    t0 = time.time()
    wait_for(mid_training, 240, "the long job never reached training step 3")
    t1 = time.time()
    stop = ray_cli("job", "stop", "--address", head.address, sid, timeout=120)  # waits for a terminal state
    print(f"long job: training step 3 after {t1 - t0:.1f}s, `ray job stop` took {time.time() - t1:.1f}s")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # The next job's driver is sent the cluster's error lines while it runs: let the stopped job's
    # actors finish dying first, or the GCS's "Failed to kill actor" for a worker that is already
    # gone reaches the re-run's log (a teardown race, not the re-run's error).
    from ray.util.state import list_actors

    job_id = client.get_job_info(sid).job_id

    def actors_dead() -> bool:
        alive = list_actors(address=head.address, filters=[("state", "!=", "DEAD"), ("job_id", "=", job_id)],
                            detail=True, raise_on_missing_output=False)
        return not [a for a in alive if not a.is_detached]  # Ray Data's detached stats actor stays

    wait_for(actors_dead, 60, "the stopped job's actors never died")
    time.sleep(2)  # the log monitor forwards error lines in batches
    runs = sorted(out.glob("run-*"))
    assert len(runs) == 1, runs
    return {"sid": sid, "status": client.get_job_status(sid), "run": runs[0],
            "steps_at_stop": trained_steps(out), "logs": client.get_job_logs(sid), "JobStatus": JobStatus}


@pytest.fixture(scope="module")
def rerun(head, out, stopped):
    """The quick job into the same output folder, after the stopped one: blocking submit."""
    sid = f"qs-{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    proc = submit(head, sid, out, QUICK, wait=True, timeout=300)
    seconds = time.time() - t0
    client = head.client()
    runs = [r for r in sorted(out.glob("run-*")) if r != stopped["run"]]
    return {"sid": sid, "proc": proc, "seconds": seconds, "status": client.get_job_status(sid),
            "logs": client.get_job_logs(sid), "info": client.get_job_info(sid), "runs": runs}


# Error-level lines as Ray (glog "E"/"F" and Python logging), MLflow and Python print them.
ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]|\b(ERROR|CRITICAL|FATAL)\b"
                        r"|Traceback \(most recent call last\)|Exception in thread")
ANSI = re.compile(r"\x1b\[")
# Ray's GCS forwards its own error lines to every driver. When it kills an actor whose worker
# process has already exited (a Ray Data or Ray Train helper finishing at the moment it is
# stopped), the kill RPC fails and GCS logs it at error level; the actor is dead either way and
# the job is unaffected (docs/cluster.md, "Read the results"). Only that message is let through.
RAY_TEARDOWN_RACE = re.compile(r"^\(pid=gcs_server\) .*gcs_actor_scheduler\.cc:\d+: Failed to kill actor [0-9a-f]+, "
                               r"return status: Invalid: KillActor RPC failed")


def check_readable_log(logs: str, max_steps: int, log_every: int) -> dict[str, int]:
    """What a job log must be off a terminal (docs: pipeline/console.py): no carriage-return
    redraws, no colour codes, no error-level line, the resolved config once and first, each
    stage a bounded number of lines, the summary last. Returns the lines per stage."""
    assert "\r" not in logs, [line[:120] for line in logs.split("\n") if "\r" in line][:5]
    assert not ANSI.search(logs), [line[:120] for line in logs.splitlines() if ANSI.search(line)][:5]
    errors = [line[:200] for line in logs.splitlines()
              if ERROR_LINE.search(line) and not RAY_TEARDOWN_RACE.search(line)]
    assert not errors, errors
    assert logs.count("# resolved config") == 1, logs.count("# resolved config")
    # before it only Ray's job manager speaks (runtime env, entrypoint)
    before = [line for line in logs.split("# resolved config", 1)[0].splitlines() if line.strip()]
    assert all("job_manager.py" in line or line.startswith("Running entrypoint") for line in before), before
    parts = re.split(r"^===== ", logs, flags=re.M)
    sizes = {"config": len(parts[0].strip().splitlines())}
    sizes |= {p.split(" =====", 1)[0].split(" (", 1)[0]: len(p.strip().splitlines()) - 1 for p in parts[1:]}
    limits = {"config": 130, "1/5 corpus: embedded synthetic": 3, "2/5 preprocess": 45,
              # step lines, plus Ray Train's and Ray Data's start-up lines, one execution per eval
              "3/5 pretrain": 40 + max_steps // log_every, "4/5 zero-shot evaluation": 15,
              "5/5 register + promote": 45, "summary": 15}
    assert set(sizes) == set(limits), sizes
    over = {k: (n, limits[k]) for k, n in sizes.items() if n > limits[k]}
    assert not over, over
    # the summary is the last thing in the log: every line after its heading is one of its items
    summary = [line for line in parts[-1].strip().splitlines()[1:] if line.strip()]
    assert all(re.match(r"^(worse than a baseline: |[A-Za-z][A-Za-z ]+ *: )", line) for line in summary), summary
    assert summary[-1].startswith("MLflow UI"), summary
    return sizes


def _published_whole(packed: Path) -> dict:
    """The packed output is complete: its manifest names exactly the shard files on disk, each
    with the manifest's row count, and no temporary folder is left."""
    import pyarrow.parquet as pq

    from preprocessing.schema import read_manifest

    manifest = read_manifest(str(packed))
    assert not list(packed.glob("_tmp-*"))
    for split, shards in manifest["shards"].items():
        assert sorted(p.name for p in (packed / split).glob("*")) == sorted(s["file"] for s in shards), split
        for s in shards:
            assert pq.ParquetFile(packed / split / s["file"]).metadata.num_rows == s["rows"], s
    assert manifest["rows"]["train"] > 0
    return manifest


@pytest.mark.timeout(600)
def test_stopped_job_leaves_nothing_half_published(stopped, rerun, head):
    import psutil
    from mlflow.tracking import MlflowClient

    run = stopped["run"]
    assert stopped["status"] == stopped["JobStatus"].STOPPED
    assert "===== 3/5 pretrain" in stopped["logs"] and "===== summary" not in stopped["logs"]
    # stopped while training: the preprocessing stage had published, whole
    _published_whole(run / "packed")
    # training was under way and checkpointing; its processes are gone with the job
    assert 3 <= stopped["steps_at_stop"] < 2000
    ckpts = sorted((run / "train" / "ray").glob("*/checkpoint_step*"))
    assert ckpts and all((c / "resume_state.json").exists() for c in ckpts[:-1]), ckpts
    pids = [int(p.read_text()) for p in (run / "train" / "pids").glob("rank*.pid")]
    assert len(pids) == 2

    def gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)

    wait_for(gone, 30, f"training workers {pids} still alive after the job stopped")
    # nothing after training exists: no exported model (not even a partial one), no evaluation
    assert not (run / "train" / "final_model").exists()
    assert not (run / "eval").exists()

    # the re-run in the same output folder completed next to it...
    assert rerun["status"] == stopped["JobStatus"].SUCCEEDED, rerun["logs"][-6000:]
    assert len(rerun["runs"]) == 1
    # ...and the stopped job registered nothing: the only model version is the re-run's, and
    # of the two training runs (registering adds "register-*" runs) only the re-run's FINISHED
    client = MlflowClient(tracking_uri=f"sqlite:///{stopped['run'].parent / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    exp = client.get_experiment_by_name(NAME)
    training = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])
                if not (r.info.run_name or "").startswith("register-")}
    assert len(training) == 2, training
    finished = [rid for rid, s in training.items() if s == "FINISHED"]
    assert finished == [versions[0].tags["training_run_id"]], training


@pytest.mark.timeout(600)
def test_submitted_pipeline_succeeds_with_logs_and_outputs(rerun, head, out):
    import numpy as np
    from mlflow.tracking import MlflowClient

    proc, logs = rerun["proc"], rerun["logs"]
    # `ray job submit` (blocking) streams the job's logs and exits 0 only when it succeeded
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "succeeded" in proc.stdout and "===== summary" in proc.stdout
    assert rerun["status"] == "SUCCEEDED"
    print(f"submitted quickstart: {rerun['seconds']:.1f}s from submit to exit; stages:\n"
          + "\n".join(line for line in logs.splitlines() if line.startswith(("[pipeline]", "===== summary"))))

    # the code travelled with the job (--working-dir .), without what .gitignore lists
    info = rerun["info"]
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{out / 'mlflow.db'}"
    pkgs = [p for p in head.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert pkgs, list(head.temp_dir.glob("session_*/runtime_resources/*"))
    for pkg in pkgs:
        assert (pkg / "jobs" / "pipeline.py").exists() and (pkg / "configs" / "quickstart.yaml").exists()
        assert not (pkg / ".venv").exists() and not (pkg / "outputs").exists()
        assert sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) < 50 * 2**20

    # the resolved config is printed once, first, with the URI from env_vars
    run = rerun["runs"][0]
    resolved_text = logs.split("# resolved config\n", 1)[1].split("\n=====", 1)[0]
    import yaml

    resolved = yaml.safe_load(resolved_text)
    assert resolved["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    assert resolved["run_dir"] == str(run) and resolved["train"]["train"]["max_steps"] == 4
    assert logs.count("# resolved config") == 1 and logs.index("# resolved config") < logs.index("===== 1/5")
    # every step-log line of the Ray Train worker reaches the job's log once (Ray 2.60 printed
    # each worker print twice; pipeline.console.say goes around that)
    step_lines = [line for line in logs.splitlines() if "[train] step " in line]
    assert step_lines and len(step_lines) == len(set(step_lines)), "\n".join(step_lines)
    for stage in ("1/5 corpus", "2/5 preprocess", "3/5 pretrain", "4/5 zero-shot evaluation", "5/5 register"):
        assert f"===== {stage}" in logs, stage
    # readable as a file: ray job logs, or `make demo > demo.log`
    sizes = check_readable_log(logs, max_steps=4, log_every=2)
    print(f"job log: {len(logs.splitlines())} lines; per stage {sizes}")
    summary = logs.split("===== summary", 1)[1]
    for line in ("curation report :", "manifest        :", "MLflow run id   :", "model           :",
                 "registered      : models:/timemoe-quickstart/1", "eval table      :", "forecast plot   :"):
        assert line in summary, line

    # outputs: published data + report, a loadable final model, the evaluation
    _published_whole(run / "packed")
    assert (run / "packed" / "report.html").stat().st_size > 0
    assert f"manifest        : {run / 'packed' / 'manifest.json'}" in summary
    from model import TimeMoeModel

    model = TimeMoeModel.from_pretrained(str(run / "train" / "final_model"))
    pred = model.forecast([np.sin(np.arange(300) / 7.0)], 16)[0]
    assert np.asarray(pred).shape == (16,) and np.isfinite(pred).all()
    evals = json.loads((run / "eval" / "summary.json").read_text())
    assert set(evals["models"]) == {"timemoe", "naive", "seasonal_naive"}
    assert (run / "eval" / "forecasts.png").stat().st_size > 1000

    # MLflow (the store named in env_vars): the training run, its zero-shot metric, model v1 as champion
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    mv = client.get_model_version_by_alias(NAME, "champion")
    run_id = mv.tags["training_run_id"]
    assert str(mv.version) == "1" and f"MLflow run id   : {run_id}" in summary
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["zeroshot/avg_mse"] == pytest.approx(evals["models"]["timemoe"]["avg_mse"])
    assert mlrun.data.params["train.max_steps"] == "4"


@pytest.fixture(scope="module")
def resumed(head, out, stopped, rerun):
    """The stopped run, continued in its own folder with ``--resume`` (after the other tests
    have looked at what the stop left), training to 2 steps past where it stopped."""
    sid = f"qs-resumed-{uuid.uuid4().hex[:6]}"
    target = stopped["steps_at_stop"] + 2
    proc = submit(head, sid, out, LONG + ["--resume", str(stopped["run"]), f"train.max_steps={target}"],
                  wait=True, timeout=300)
    client = head.client()
    return {"proc": proc, "status": client.get_job_status(sid), "logs": client.get_job_logs(sid), "target": target}


@pytest.mark.timeout(600)
def test_stopped_job_resumes_from_its_checkpoint(stopped, resumed):
    import yaml

    run, logs = stopped["run"], resumed["logs"]
    assert resumed["status"] == "SUCCEEDED", logs[-6000:]
    # the published data was kept, not redone; training restarted from the newest complete checkpoint
    assert f"resuming {run}: preprocessing published, skipped" in logs
    assert "was published by the run being resumed: not redone" in logs and "===== 1/5 corpus" not in logs
    resumed_at = int(logs.split("[train] resumed from ", 1)[1].split(" at step ", 1)[1].split(",", 1)[0])
    assert 2 <= resumed_at <= stopped["steps_at_stop"] and resumed_at % 2 == 0  # checkpoint_every=2
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    # the steps after the checkpoint that the stopped job had done are done again, once
    redone = 2 if resumed_at < stopped["steps_at_stop"] else 1
    assert steps[-1] == resumed["target"] and steps.count(resumed_at + 1) == redone, steps
    # MLflow: one training run across the stop, each step's metrics once (the redone steps are
    # not logged twice)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{stopped['run'].parent / 'mlflow.db'}")
    run_id = json.loads((run / "summary.json").read_text())["mlflow_run_id"]
    logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(logged) == sorted(set(logged)) and max(logged) == resumed["target"], logged
    # the run folder now holds what a finished run has, in the same place
    assert (run / "train" / "final_model" / "model.safetensors").exists()
    assert (run / "eval" / "summary.json").exists()
    # the first resolution is kept; the resume wrote its own next to it
    first = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert first["train"]["train"]["max_steps"] == 2000
    again = list(run.glob("resolved_config-resume-*.yaml"))
    assert len(again) == 1 and yaml.safe_load(again[0].read_text())["train"]["train"]["max_steps"] == resumed["target"]


def test_final_model_export_is_all_or_nothing(tmp_path, monkeypatch):
    """The export publishes ``final_model`` by rename: a writer dying mid-way (a stopped job)
    leaves the previous complete model, or none, never a partial directory."""
    from model import TimeMoeConfig, TimeMoeModel
    from pipeline.config import config_from_dict
    from pipeline.train.loop import export_model

    cfg = config_from_dict({"model": {"preset": "tiny"}})
    engine = type("Engine", (), {"module": TimeMoeModel(TimeMoeConfig.preset("tiny"))})()
    out_dir = tmp_path / "final_model"
    assert export_model(engine, None, cfg, out_dir, rank=0) == out_dir
    before = (out_dir / "model.safetensors").read_bytes()

    def dies_after_config(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.config.save_json(Path(directory) / "config.json")
        raise KeyboardInterrupt("job stopped while writing the weights")

    monkeypatch.setattr(TimeMoeModel, "save_pretrained", dies_after_config)
    with pytest.raises(KeyboardInterrupt):
        export_model(engine, None, cfg, out_dir, rank=0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert (out_dir / "model.safetensors").read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        export_model(engine, None, cfg, tmp_path / "fresh_model", rank=0)
    assert not (tmp_path / "fresh_model").exists()

    monkeypatch.undo()  # the next export clears what the killed ones left
    export_model(engine, None, cfg, out_dir, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir() if "final_model" in p.name) == ["final_model"]
