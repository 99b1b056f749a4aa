"""The offline scaling sweep (air-gapped GPU nodes: no Ray, no MLflow there): shards of the plan
train in-process through the real training loop and append JSON-line records; a re-run skips
them; an import into a real MLflow server makes them FINISHED child runs that an online run of
the same sweep skips, and builds the report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

model = pytest.importorskip("model")

sys.path.insert(0, str(Path(__file__).parent))
import _helpers_scaling as H  # noqa: E402

from pipeline.scaling_laws import offline as O  # noqa: E402
from pipeline.scaling_laws import report as R  # noqa: E402
from pipeline.scaling_laws import sweep as S  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("TIMEMOE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "benchmarks"
WINDOW = H.TINY_WINDOW

# One shard of the offline sweep through the CLI, in a fresh interpreter where ray and mlflow cannot
# be imported (as on an air-gapped GPU node; DeepSpeed's optional `import mlflow` copes), then the
# names of those that did get loaded (none may).
SHARD_CODE = """
import importlib.abc, json, sys

class AirGap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r} (air-gapped node)")

sys.meta_path.insert(0, AirGap())
from jobs.sweep import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))}))
"""


def _raw_config(tmp_path: Path, data: Path, name: str) -> dict:
    raw = H.tiny_sweep_raw(tmp_path, data, name)
    if (SHARED_BENCH / "ETTh1.csv.gz").exists():  # exercise the zero-shot metrics through the records too
        raw["evaluation"].update(zero_shot_datasets=["ETTh1"], zero_shot_stride=400,
                                 zero_shot_data_dir=str(SHARED_BENCH))
    return raw


def _boom(train_config):
    raise AssertionError("a finished trial must not train again")


def test_offline_shards_then_import_then_online_skips(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    data = H.write_test_shards(tmp_path / "data", WINDOW, n_train=32, n_val=16)
    raw = _raw_config(tmp_path, data, "offline")
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = S.SweepConfig.from_yaml(cfg_path)
    plans = S.plan_trials(cfg)
    assert len(plans) == 8

    # Two shards at once, as one process per GPU would run (each picks its own MASTER_PORT).
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    records = [tmp_path / "out" / f"records-{k}.jsonl" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_CODE, "--config", str(cfg_path),
                               "--offline-records", str(records[k]), "--shard", f"{k}/2"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(2)]
    for k, proc in enumerate(procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"shard {k}:\n{out[-3000:]}\n{err[-3000:]}"
        res = json.loads(out.strip().splitlines()[-1])
        assert res == {"rc": 0, "loaded": []}, res  # no ray, no mlflow needed
        assert "done: " in out and "held-out loss" in out  # per-trial progress
        recs = O.read_records([records[k]])
        assert [r.config_hash for r in recs] == [p.config_hash for p in plans[k::2]]
        for r in recs:
            p = next(p for p in plans if p.config_hash == r.config_hash)
            assert r.sweep == "offline" and r.trial == p.spec.name and r.params == S.trial_param_values(p)
            assert r.record.trial_hash == p.config_hash and r.record.points_seen == p.points_seen
            assert r.record.heldout_loss > 0 and r.record.heldout_mse > 0 and r.record.wall_time_s > 0
            assert math.isnan(r.record.mfu)  # CPU: stored as null, read back as NaN
            assert (tmp_path / "runs" / p.config_hash / "final_model" / "model.safetensors").exists()
            if raw["evaluation"].get("zero_shot_datasets"):  # only with the shared benchmarks present
                assert r.record.zs_mse > 0 and "zs/ETTh1/96/mse" in r.record.zero_shot

    # A re-run of a shard finds every trial in its file: nothing trains.
    again = O.run_offline(cfg, records[0], shard=(0, 2), train_fn=_boom, log=lambda s: None)
    assert not again.ran and not again.failed and len(again.skipped) == 4

    # A writer killed mid-line leaves a partial last line: it is reported and left out.
    with records[1].open("a") as f:
        f.write('{"sweep": "offline", "config_')
    messages: list[str] = []
    cfg.sweep.tracking_uri = mlflow_server
    imp = O.import_records(cfg, records, log=messages.append)
    assert any("unreadable record" in m for m in messages)
    assert sorted(imp.imported) == sorted(p.config_hash for p in plans) and not imp.skipped and not imp.foreign
    assert imp.report is not None
    for f in ("scaling_fits.json", "scaling_table.md", "loss_vs_flops.png"):
        assert (imp.report.out_dir / f).exists(), f
    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name(cfg.sweep.experiment).experiment_id
    children = R.child_runs(client, exp_id, imp.parent_run_id)
    assert sorted(c.data.tags[R.HASH_TAG] for c in children) == sorted(p.config_hash for p in plans)
    by_hash = {r.config_hash: r for r in O.read_records(records, log=lambda s: None)}
    for c in children:
        h = c.data.tags[R.HASH_TAG]
        p = next(p for p in plans if p.config_hash == h)
        assert c.info.status == "FINISHED" and c.info.run_name == p.spec.name
        assert c.data.tags[R.ROLE_TAG] == R.ROLE_TRIAL and c.data.tags[R.SWEEP_TAG] == "offline"
        assert c.data.tags[R.FAMILY_TAG] == p.spec.family and c.data.tags[O.SOURCE_TAG].startswith("offline:records-")
        assert c.data.params == S.trial_param_values(p)  # exactly what an online trial logs
        assert c.data.metrics["heldout_loss"] == pytest.approx(by_hash[h].record.heldout_loss)
        assert R.record_from_run(c) is not None
    logged = {a.path for a in client.list_artifacts(imp.parent_run_id, R.REPORT_DIR)}
    assert f"{R.REPORT_DIR}/scaling_fits.json" in logged

    # Importing again changes nothing; the online sweep with the same config skips every trial.
    twice = O.import_records(cfg, records, report=False, log=lambda s: None)
    assert twice.parent_run_id == imp.parent_run_id and not twice.imported and len(twice.skipped) == 8
    online = S.run_sweep(cfg, train_fn=_boom, report=False, log=lambda s: None)
    assert online.parent_run_id == imp.parent_run_id
    assert not online.ran and not online.resumed and len(online.skipped) == 8
    assert len(R.child_runs(client, exp_id, imp.parent_run_id)) == 8

    # Records of another config are refused, not mixed in.
    other = S.SweepConfig.from_dict({**raw, "grid": {**raw["grid"], "budgets": [1024]}})
    other.sweep.tracking_uri = mlflow_server
    foreign = O.import_records(other, records, report=False, log=lambda s: None)
    assert not foreign.imported and len(foreign.foreign) == 8


def test_records_round_trip_and_shards():
    rec = R.TrialRecord(family="sparse", size="s", trial_hash="abc", n_total=10, n_active=5, points_seen=64,
                        training_flops=1e9, heldout_loss=0.5, heldout_mse=0.7, zs_mse=math.nan,
                        zero_shot={"zs/ETTh1/96/mse": 0.3})
    line = O.OfflineRecord(sweep="x", config_hash="abc", trial="sparse-s-6e01", params={"family": "sparse"},
                           record=rec).to_json()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = O.OfflineRecord.from_json(line)
    assert back.record.metrics() == rec.metrics() and math.isnan(back.record.mfu)
    assert back.trials_per_gpu == 1
    shared = O.OfflineRecord.from_json(dataclasses.replace(back, trials_per_gpu=3).to_json())
    assert shared.trials_per_gpu == 3 and shared.record.metrics() == rec.metrics()
    with pytest.raises(ValueError, match="trials_per_gpu"):
        O.run_offline(None, "unused.jsonl", trials_per_gpu=0)  # type: ignore[arg-type]
    assert O.parse_shard("3/8") == (3, 8) and O.parse_shard("0/1") == (0, 1)
    for bad in ("8/8", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            O.parse_shard(bad)
    items = list(range(24))
    parts = [O.shard_plans(items, k, 8) for k in range(8)]
    assert sorted(sum(parts, [])) == items and all(len(p) == 3 for p in parts)


def test_offline_8gpu_config_plans_and_fits_its_time_box():
    """configs/sweep-8gpu-offline.yaml: 24 trials, ~1M to ~50M active parameters, window 1024, and by
    the FLOPs estimate (25% of 989 TFLOP/s + 30 s compile per trial) every GPU's shard of 3
    trials ends within 8 minutes."""
    cfg = S.SweepConfig.from_yaml(ROOT / "configs" / "sweep-8gpu-offline.yaml")
    plans = S.plan_trials(cfg)
    assert len(plans) == 24 and cfg.grid.window_length == 1024 and len(cfg.grid.budgets) == 3
    active = sorted({p.spec.n_active for p in plans})
    assert 1e6 <= active[0] < 3e6 and 4e7 <= active[-1] <= 6e7
    assert cfg.training["data"]["loader"] == "plain" and not Path(cfg.training["data"]["path"]).is_absolute()
    from pipeline.config import config_from_dict

    def est(p):  # seconds
        return 30 + p.spec.flops_per_point * p.points_seen / (0.25 * 989e12)

    assert max(est(p) for p in plans) < 90
    assert max(sum(est(p) for p in O.shard_plans(plans, k, 8)) for k in range(8)) < 8 * 60
    for p in plans:
        tc = config_from_dict(p.train_config)
        assert tc.scaling.use_gpu and tc.train.global_batch_size == tc.train.micro_batch_size == 32
        assert tc.parallel.precision == "bf16" and tc.parallel.compile
    assert cfg.training["optim"]["warmup_steps"] == round(0.1 * min(p.steps for p in plans))


def _measured_points_per_s() -> dict[tuple[str, str], float]:
    """(family, size) -> points/s of the committed 8-GPU sweep's 3.6e7-point trials (8 trials at
    once on one host: a conservative speed for one trial alone)."""
    recs = O.read_records(sorted((ROOT / "benchmarks/results/sweep-8gpu-offline").glob("records-*.jsonl")))
    return {(r.record.family, r.record.size): r.record.points_per_s for r in recs if r.record.points_seen > 3e7}


def families_trial_seconds(p: S.TrialPlan, speed: dict[tuple[str, str], float]) -> float:
    """docs/scaling.md's estimate: 35 s start-up and compilation + 15 s evaluation + points at the
    measured speed (sparse_per_layer routes like sparse: same FLOPs, same kernels)."""
    family = "sparse" if p.spec.family == "sparse_per_layer" else p.spec.family
    return 50.0 + p.points_seen / speed[(family, p.spec.size)]


def test_families_config_plans_24_trials_in_runs_under_10_minutes():
    cfg = S.SweepConfig.from_yaml(ROOT / "configs" / "sweep-families-1gpu.yaml")
    plans = S.plan_trials(cfg)
    assert len(plans) == 24 and cfg.grid.seeds == (0, 1)
    cells = {(p.spec.family, p.spec.size, p.spec.budget_points) for p in plans}
    assert len(cells) == 12 and {c[0] for c in cells} == {"dense", "sparse", "sparse_per_layer"}
    assert {c[2] for c in cells} == {36_000_000, 100_000_000} and {c[1] for c in cells} == {"s3", "s4"}
    assert sum(p.spec.family == "sparse_per_layer" for p in plans) >= 8
    speed = _measured_points_per_s()
    runs = [O.shard_plans(plans, k, 24) for k in range(24)]  # --shard K/24: one trial per GPU run
    assert sorted(p.config_hash for r in runs for p in r) == sorted(p.config_hash for p in plans)
    seconds = [sum(families_trial_seconds(p, speed) for p in r) for r in runs]
    assert max(seconds) < 9 * 60  # 10-minute runs with a minute to spare for the interpreter and data
    assert 80 * 60 < sum(seconds) < 120 * 60  # docs/scaling.md: ~100 GPU-minutes in all
    # No training row repeats: the largest budget's rows fit in the KernelSynth part alone.
    script = (ROOT / "benchmarks" / "prepare_families_data.sh").read_text()
    synth_points = float(re.search(r"SYNTH_POINTS=\$\{SYNTH_POINTS:-([0-9.e+]+)\}", script).group(1))
    assert "pack_sweep_corpus" in script  # the packing recipe it sources
    recipe = (ROOT / "benchmarks" / "pack_sweep_corpus.sh").read_text()
    val_fraction = float(re.search(r"val_fraction: ([0-9.]+)", recipe).group(1))
    rows_needed = max(p.points_seen for p in plans) // cfg.grid.window_length
    assert synth_points >= 1e8 and synth_points * (1 - val_fraction) / 1024 > 1.1 * rows_needed


def test_import_accepts_records_with_and_without_the_new_fields(mlflow_server, tmp_path):
    """An old record (no seed, balance or mixture: seed 0) and new ones (seed 1, per-layer balance,
    mixture) import into MLflow, read back unchanged, and jobs.scaling_report rebuilds the report
    (multipliers, routing, mixture) from MLflow alone."""
    from mlflow.tracking import MlflowClient

    from jobs.scaling_report import main as report_main

    raw = H.tiny_sweep_raw(tmp_path, tmp_path / "data", "families-import")
    raw["grid"].update(families=["dense", "sparse", "sparse_per_layer"], seeds=[0, 1])
    raw["sweep"]["tracking_uri"] = mlflow_server
    cfg = S.SweepConfig.from_dict(raw)
    plans = S.plan_trials(cfg)
    assert len(plans) == 3 * 2 * 2 * 2
    rng = np.random.default_rng(0)
    lines = []
    for p in plans:
        loss = 0.3 + 1e12 / p.spec.training_flops ** 0.5 * (0.8 if p.spec.family != "dense" else 1.0)
        rec = R.TrialRecord(family=p.spec.family, size=p.spec.size, trial_hash=p.config_hash,
                            n_total=p.spec.n_total, n_active=p.spec.n_active, points_seen=p.points_seen,
                            training_flops=p.spec.flops_per_point * p.points_seen,
                            heldout_loss=loss * float(np.exp(rng.normal(0, 0.01))), heldout_mse=2 * loss,
                            seed=p.spec.seed,
                            expert_balance=[] if p.spec.family == "dense" else [3.9, 4.0] if p.spec.family == "sparse" else [1.6, 1.8],
                            data_mixture={"real": 1000.0, "synthetic/kernelsynth": 9000.0},
                            resumed_from_step=1000 if p.spec.family == "sparse_per_layer" and p.spec.seed == 1 else 0)
        line = json.loads(O.OfflineRecord(sweep=cfg.sweep.name, config_hash=p.config_hash, trial=p.spec.name,
                                          params=S.trial_param_values(p), record=rec,
                                          trials_per_gpu=2 if p.spec.family == "sparse_per_layer" else 1).to_json())
        if p.spec.seed == 0 and p.spec.family == "dense" and p.spec.size == "xs":  # as written before the fields existed
            for key in ("seed", "expert_balance", "train_expert_balance", "data_mixture"):
                line["record"].pop(key)
            line.pop("trials_per_gpu")
        lines.append(json.dumps(line))
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    imp = O.import_records(cfg, [records], report=False, log=lambda s: None)
    assert len(imp.imported) == 24 and not imp.foreign
    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.get_experiment_by_name(cfg.sweep.experiment).experiment_id
    children = R.child_runs(client, exp_id, imp.parent_run_id)
    back = {r.trial_hash: r for r in (R.record_from_run(c) for c in children)}
    # a trial that shared its GPU says so on its run (its points/s is a share); the others carry no tag
    shared = {c.data.tags[R.HASH_TAG]: c.data.tags.get(O.SHARED_GPU_TAG) for c in children}
    assert shared == {p.config_hash: "2" if p.spec.family == "sparse_per_layer" else None for p in plans}
    for p in plans:
        r = back[p.config_hash]
        assert r.family == p.spec.family and r.seed == p.spec.seed
        old = p.spec.seed == 0 and p.spec.family == "dense" and p.spec.size == "xs"
        assert r.data_mixture == ({} if old else {"real": 1000.0, "synthetic/kernelsynth": 9000.0})
        assert r.expert_balance == {"dense": [], "sparse": [3.9, 4.0], "sparse_per_layer": [1.6, 1.8]}[p.spec.family]
        # a trial finished by a resumed run says from which step its wall time and points/s count
        assert r.resumed_from_step == (1000 if p.spec.family == "sparse_per_layer" and p.spec.seed == 1 else 0)
    out = tmp_path / "report"
    assert report_main(["--experiment", cfg.sweep.experiment, "--tracking-uri", mlflow_server,
                        "--out", str(out), "--n-boot", "10", "--no-log"]) == 0
    fits = json.loads((out / "scaling_fits.json").read_text())
    assert set(fits["multipliers"]) == {"sparse", "sparse_per_layer"}
    assert fits["routing"]["sparse"]["mean"] == pytest.approx(3.95)
    assert fits["routing"]["sparse_per_layer"]["mean"] == pytest.approx(1.7)
    assert all(c["n_seeds"] == 2 for fam in fits["families"].values() for c in fam["cells"])
    assert {tuple(sorted(m["points"])) for m in fits["data_mixtures"]} == {(), ("real", "synthetic/kernelsynth")}
    table = (out / "scaling_table.md").read_text().split("## Fits")[0]
    header, *rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    col = cells(header).index("resumed from step")
    resumed = [cells(line)[col] for line in rows]
    assert sorted(resumed) == ["-"] * 20 + ["1000"] * 4, resumed


@pytest.mark.parametrize("args, message", [
    (["--trials-per-gpu", "2"], "go with --offline-records"),
    (["--offline-records", "r.jsonl", "--trials-per-gpu", "0"], "must be >= 1"),
    (["--checkpoint-every", "50"], "go with --offline-records"),
    (["--offline-records", "r.jsonl", "--checkpoint-every", "-1"], "must be >= 0"),
])
def test_sweep_cli_rejects_a_gpu_share_it_cannot_record(args, message, capsys):
    from jobs.sweep import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(ROOT / "configs" / "sweep-families-1gpu.yaml"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _losses_by_step(run_dir: Path) -> dict[int, float]:
    """The trajectory in a trial's metrics.jsonl: a step logged twice (redone after a resume)
    counts once, as the later run logged it."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def test_a_trial_cut_short_resumes_from_its_checkpoint_and_trains_what_an_unbroken_run_trains(tmp_path):
    """``--checkpoint-every``: a shard stopped mid-trial by SIGTERM (a job's time limit) saves a
    checkpoint of the step it was in, exits 143 without a record, and started again goes on from
    that checkpoint (the only one kept); the record says where, the steps after it repeat an
    unbroken run of the same trial, and the checkpoints are gone once the record is written."""
    steps, every = 40, 4
    data = H.write_test_shards(tmp_path / "data", WINDOW, n_train=32, n_val=16)
    raw = H.tiny_sweep_raw(tmp_path, data, "resume")
    raw["grid"].update(sizes=raw["grid"]["sizes"][:1], families=["sparse"], budgets=[steps * 4 * WINDOW])
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    (plan,) = S.plan_trials(S.SweepConfig.from_yaml(cfg_path))
    assert plan.steps == steps
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    records = tmp_path / "records.jsonl"
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(cfg_path), "--offline-records", str(records),
           "--checkpoint-every", str(every)]
    run_dir = tmp_path / "runs" / plan.config_hash
    ckpts = run_dir / "checkpoints"

    # asked to stop once its first periodic checkpoint is on disk
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(ckpts.glob("step*/resume_state.json")):
        assert proc.poll() is None, "the shard ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stopped_log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, stopped_log[-3000:]
    assert not records.exists() or not records.read_text().strip()  # cut short: no record
    saved = [json.loads(p.read_text())["step"] for p in ckpts.glob("step*/resume_state.json")]
    assert len(saved) == 1 and every <= saved[0] < steps  # the step it stopped in; only the newest is kept
    cut_at = saved[0]
    assert f"stopped by SIGTERM after step {cut_at}/{steps}" in stopped_log
    assert _losses_by_step(run_dir).keys() == set(range(1, cut_at + 1))  # it stopped at a step's end

    # the same command again resumes the trial and finishes it
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (rec,) = O.read_records([records])
    assert rec.config_hash == plan.config_hash and rec.record.resumed_from_step == cut_at
    assert f"resumed from step {cut_at}" in again.stdout
    assert not ckpts.exists()  # recorded: its resume points are deleted
    resumed = _losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, steps + 1))

    # the same trial unbroken, without checkpoints, in another folder: the same steps after the cut
    raw["sweep"]["output_dir"] = str(tmp_path / "unbroken")
    unbroken_cfg = tmp_path / "unbroken.yaml"
    unbroken_cfg.write_text(yaml.safe_dump(raw))
    unbroken_records = tmp_path / "unbroken.jsonl"
    whole = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(unbroken_cfg), "--offline-records",
                            str(unbroken_records)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    (ref,) = O.read_records([unbroken_records])
    assert ref.config_hash == plan.config_hash and ref.record.resumed_from_step == 0  # checkpoints: not in the hash
    unbroken = _losses_by_step(tmp_path / "unbroken" / plan.config_hash)
    for step in range(cut_at + 1, steps + 1):
        assert resumed[step] == pytest.approx(unbroken[step], rel=1e-5), (step, resumed[step], unbroken[step])
    assert rec.record.heldout_loss == pytest.approx(ref.record.heldout_loss, rel=1e-5)
