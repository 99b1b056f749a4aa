"""Model registry against a real ``mlflow server``: register a tiny checkpoint, load it by alias
in a fresh subprocess without Ray/DeepSpeed, lineage tags, registration from a training run's
artifacts (the CLI), and promotion refused/granted on a synthetic benchmark folder."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

model_pkg = pytest.importorskip("model")
if not hasattr(model_pkg, "TimeMoeModel"):
    pytest.skip("model.TimeMoeModel not available yet", allow_module_level=True)

import mlflow  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from model import TimeMoeConfig, TimeMoeModel  # noqa: E402
from pipeline.evaluation.protocol import EvalConfig  # noqa: E402
from pipeline.evaluation.registry import CANDIDATE, CHAMPION, promote_if_better, register_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``good``: a tiny random-init model; ``broken``: the same with output heads scaled by 100
    (deterministically much worse forecasts); ``broken2``: scaled by 90 (other weights, as bad)."""
    import torch

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = TimeMoeModel(TimeMoeConfig.preset("tiny"))
    m.save_pretrained(str(root / "good"))
    m.save_pretrained(str(root / "broken"))
    f = root / "broken" / "model.safetensors"
    sd = load_file(str(f))
    heads = [k for k in sd if "lm_head" in k]
    assert heads, f"no lm_head tensors in {sorted(sd)[:10]}"
    save_file({k: (v * 100 if k in heads else v).contiguous() for k, v in sd.items()}, str(f))
    m.save_pretrained(str(root / "broken2"))
    save_file({k: (v * 90 if k in heads else v).contiguous() for k, v in sd.items()}, str(root / "broken2" / "model.safetensors"))
    return {"good": root / "good", "broken": root / "broken", "broken2": root / "broken2"}


@pytest.fixture(scope="module")
def synth_bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    t = np.arange(1200)
    rng = np.random.default_rng(0)
    vals = np.stack([np.sin(2 * np.pi * t / 24), np.cos(2 * np.pi * t / 12) + 0.01 * t], axis=1)
    vals = vals + 0.05 * rng.normal(size=vals.shape)
    df = pd.DataFrame(vals, columns=["a", "OT"])
    df.insert(0, "date", pd.date_range("2021-01-01", periods=len(t), freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    df.to_csv(root / "synth.csv", index=False)
    return root


def _name() -> str:
    return f"timemoe-test-{uuid.uuid4().hex[:8]}"


def test_register_and_load_by_alias_in_fresh_process(checkpoints, mlflow_server, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": 3, "window_length": 512}))
    name = _name()
    reg = register_checkpoint(checkpoints["good"], name, manifest_path=manifest, tracking_uri=mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias(name, CANDIDATE)
    assert mv.version == reg.version
    assert mv.tags["data_manifest_fingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert mv.tags["training_run_id"] == "none"
    assert len(mv.tags["config_hash"]) == 64 and mv.tags["code_version"]

    t = np.arange(300, dtype=float)
    series = {"s1": (np.sin(t / 5) * 3 + 10).tolist(), "s2": (0.5 * t[:150]).tolist()}
    code = f"""
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri({mlflow_server!r})
m = mlflow.pyfunc.load_model("models:/{name}@candidate")
series = json.loads({json.dumps(json.dumps(series))})
df = pd.DataFrame({{"id": list(series), "values": list(series.values())}})
out = m.predict(df, params={{"horizon": 12}})
default = m.predict(df.iloc[:1])
bad = [k for k in ("ray", "deepspeed") if k in sys.modules]
print(json.dumps({{"bad": bad, "ids": out["id"].tolist(), "fc": out["forecast"].apply(list).tolist(),
                   "default_len": len(default["forecast"][0])}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bad"] == []
    assert res["ids"] == ["s1", "s2"] and res["default_len"] == 96
    fc = np.array(res["fc"])
    assert fc.shape == (2, 12) and np.isfinite(fc).all()
    # the served forecast equals the checkpoint's own forecast
    local = TimeMoeModel.from_pretrained(str(checkpoints["good"])).eval()
    ref = np.asarray(local.forecast([np.asarray(v) for v in series.values()], 12))
    np.testing.assert_allclose(fc, ref, rtol=1e-4, atol=1e-4)


def test_register_cli_from_training_run(checkpoints, synth_bench, mlflow_server, tmp_path, capsys):
    """The training run logs the exported model under ``final_model/`` and the data manifest under
    ``data/``; ``jobs.register --run-id`` finds both."""
    from jobs.register import main

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment(f"train-{uuid.uuid4().hex[:6]}")
    run = client.create_run(exp, tags={"mlflow.source.git.commit": "abc123"})
    client.log_artifacts(run.info.run_id, str(checkpoints["good"]), "final_model")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"windows": 10}')
    client.log_artifact(run.info.run_id, str(manifest), "data")
    client.set_terminated(run.info.run_id)
    name = _name()
    assert main(["--run-id", run.info.run_id, "--name", name, "--tracking-uri", mlflow_server, "--promote",
                 "--benchmarks", str(synth_bench), "--datasets", "synth", "--horizons", "8", "--context", "64",
                 "--stride", "50"]) == 0
    mv = client.get_model_version_by_alias(name, CANDIDATE)
    assert client.get_model_version_by_alias(name, CHAMPION).version == mv.version  # first one: promoted
    assert mv.tags["promotion.decision"] == "promoted" and float(mv.tags["zeroshot.avg_mse"]) > 0
    assert mv.tags["training_run_id"] == run.info.run_id
    assert mv.tags["code_version"] == "abc123"
    assert mv.tags["data_manifest_fingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    # the version's page: its evaluation table (the gate's own score) and its lineage
    text = client.get_model_version(name, mv.version).description
    row = next(line for line in text.splitlines() if line.startswith("| synth | 8 |"))
    assert abs(float(row.split("|")[3].strip("* ")) - float(mv.tags["zeroshot.avg_mse"])) < 1e-4
    assert f"training run: `{run.info.run_id}`" in text and "promotion: promoted" in text
    assert main(["--run-id", run.info.run_id, "--name", name, "--tracking-uri", mlflow_server,
                 "--artifact-path", "nowhere"]) == 2  # one line naming the run and the path
    assert f"jobs.register: run {run.info.run_id}: no artifact 'nowhere'" in capsys.readouterr().err


def test_promotion_refused_for_worse_and_granted_for_better(checkpoints, synth_bench, mlflow_server):
    client = mlflow.MlflowClient(mlflow_server)
    name = _name()
    cfg = EvalConfig(datasets=["synth"], horizons=[16], context=96, stride=7, batch_size=64, progress=False)

    broken = register_checkpoint(checkpoints["broken"], name, tracking_uri=mlflow_server)
    d1 = promote_if_better(name, broken.version, synth_bench, cfg, tracking_uri=mlflow_server)
    assert d1.promoted and d1.champion_version is None  # no champion yet

    good = register_checkpoint(checkpoints["good"], name, tracking_uri=mlflow_server)
    d2 = promote_if_better(name, good.version, synth_bench, cfg, tracking_uri=mlflow_server)
    assert d2.promoted and d2.champion_version == broken.version and d2.candidate_mse < d2.champion_mse
    assert client.get_model_version_by_alias(name, CHAMPION).version == good.version

    worse = register_checkpoint(checkpoints["broken2"], name, tracking_uri=mlflow_server)
    d3 = promote_if_better(name, worse.version, synth_bench, cfg, tracking_uri=mlflow_server)
    assert not d3.promoted and d3.candidate_mse > d3.champion_mse
    assert client.get_model_version_by_alias(name, CHAMPION).version == good.version
    assert client.get_model_version_by_alias(name, CANDIDATE).version == worse.version

    tags = client.get_model_version(name, worse.version).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.candidate_mse"]) == pytest.approx(d3.candidate_mse)
    assert float(tags["promotion.champion_mse"]) == pytest.approx(d2.candidate_mse)
    champ_tags = client.get_model_version(name, good.version).tags
    assert champ_tags["promotion.decision"] == "promoted"
    assert champ_tags[f"promotion.challenge.v{worse.version}"].startswith("kept")
    assert client.get_model_version(name, broken.version).tags[f"promotion.challenge.v{good.version}"].startswith("replaced")


def test_evaluate_cli_accepts_checkpoint_dir_and_models_uri(checkpoints, synth_bench, mlflow_server, tmp_path):
    """The same weights score identically as a checkpoint directory and as a registered model,
    and a fresh process (the CLI) resolves ``models:/NAME@candidate`` via --tracking-uri."""
    from pipeline.evaluation.protocol import evaluate, load_forecaster

    name = _name()
    register_checkpoint(checkpoints["good"], name, tracking_uri=mlflow_server)
    cfg = EvalConfig(datasets=["synth"], horizons=[8], context=64, stride=11, progress=False)
    direct = evaluate(load_forecaster(str(checkpoints["good"]))[0], synth_bench, cfg).rows[0]
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--model", f"models:/{name}@candidate", "--benchmarks",
         str(synth_bench), "--datasets", "synth", "--horizons", "8", "--context", "64", "--stride", "11",
         "--output", str(out), "--tracking-uri", mlflow_server],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["windows"] == direct.windows
    assert row["mse"] == pytest.approx(direct.mse, rel=1e-6)
    runs = mlflow.MlflowClient(mlflow_server).search_runs(
        [mlflow.MlflowClient(mlflow_server).get_experiment_by_name("zeroshot-eval").experiment_id])
    assert any(r.data.metrics.get("zeroshot/synth/8/mse") == pytest.approx(direct.mse, rel=1e-6) for r in runs)


def test_pyfunc_takes_device_and_dtype_from_model_config_or_environment(checkpoints, mlflow_server, monkeypatch):
    """``model_config`` (or ``$TIMEMOE_DEVICE`` / ``$TIMEMOE_DTYPE``) chooses where the served
    model runs; a GPU asked for on a machine without one fails at load, naming the option."""
    import torch

    name = _name()
    register_checkpoint(checkpoints["good"], name, tracking_uri=mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    uri = f"models:/{name}@candidate"
    df = pd.DataFrame({"id": ["a"], "values": [np.sin(np.arange(200) / 7).tolist()]})
    fp32 = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu", "dtype": "fp32"})
    assert fp32.unwrap_python_model().forecaster.describe()["dtype"] == "fp32"
    monkeypatch.setenv("TIMEMOE_DTYPE", "bf16")
    bf16 = mlflow.pyfunc.load_model(uri)
    inner = bf16.unwrap_python_model().forecaster
    assert inner.dtype == torch.bfloat16 and inner.model.heads.weight.dtype == torch.bfloat16
    a = np.array(fp32.predict(df, params={"horizon": 8})["forecast"][0])
    b = np.array(bf16.predict(df, params={"horizon": 8})["forecast"][0])
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() and not np.array_equal(a, b)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TIMEMOE_DEVICE", "cuda")
        with pytest.raises(Exception, match="--device cuda: no CUDA GPU"):
            mlflow.pyfunc.load_model(uri)
