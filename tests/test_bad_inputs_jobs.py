"""Bad inputs through the real CLIs of the model-facing jobs (``jobs.evaluate``, ``jobs.register``,
``jobs.pretrain``, ``jobs.pipeline``): each gives one line on stderr naming the option, file or
override and the reason, a non-zero exit, no traceback, and changes nothing (no registered
version, no output). The preprocessing job's cases are in tests/test_bad_inputs_preprocess.py.

The CLIs run in-process (``main(argv)``), as ``python -m jobs.X`` would; none of these cases gets
as far as starting Ray or training.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests._train_helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    t = np.arange(600)
    df = pd.DataFrame({"date": pd.date_range("2022-01-01", periods=600, freq="h").strftime("%Y-%m-%d %H:%M:%S"),
                       "a": np.sin(t / 7.0), "b": np.cos(t / 5.0)})
    df.to_csv(root / "small.csv", index=False)
    return root


def broken_copy(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / f"ckpt-{how}"
    shutil.copytree(checkpoint, bad)
    weights = bad / "model.safetensors"
    if how == "no-weights":
        weights.unlink()
    elif how == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + weights.read_bytes()[64:])
    elif how == "no-config":
        (bad / "config.json").unlink()
    return bad


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- jobs.evaluate
@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["--device", "tpu"], "--device 'tpu': unknown"),
    (["--dtype", "fp64"], "--dtype 'fp64': unknown"),
    (["--batch-size", "lots"], "--batch-size 'lots': not an integer"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--horizons", "0"], "--horizons 0: must be >= 1"),
    (["--stride", "0"], "--stride 0: must be >= 1"),
    (["--context", "100000", "--horizons", "96"], "--context 100000 is longer than the model's maximum context 4096"),
])
def test_evaluate_bad_options(checkpoint, bench, tmp_path, capsys, extra, message):
    from jobs.evaluate import main

    out = tmp_path / "out"
    rc = main(["--model", str(checkpoint), "--benchmarks", str(bench), "--output", str(out), "--eval-workers", "0",
               "--device", "cpu", *extra])
    assert rc == 2
    assert message in one_line_error(capsys, "jobs.evaluate")
    assert not out.exists()


@pytest.mark.parametrize("how, message", [
    ("no-weights", "missing model.safetensors"),
    ("corrupt", "model.safetensors: not a readable safetensors file"),
    ("no-config", "nor a checkpoint directory with config.json"),
])
def test_evaluate_broken_checkpoint(checkpoint, bench, tmp_path, capsys, how, message):
    from jobs.evaluate import main

    bad = broken_copy(checkpoint, tmp_path, how)
    rc = main(["--model", str(bad), "--benchmarks", str(bench), "--output", str(tmp_path / "out"),
               "--eval-workers", "0", "--device", "cpu", "--horizons", "24", "--context", "64"])
    assert rc == 2
    line = one_line_error(capsys, "jobs.evaluate")
    assert message in line and str(bad) in line


def test_evaluate_debug_shows_the_traceback(checkpoint, bench, tmp_path):
    from jobs.evaluate import main

    bad = broken_copy(checkpoint, tmp_path, "corrupt")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        main(["--model", str(bad), "--benchmarks", str(bench), "--output", str(tmp_path / "o"), "--eval-workers", "0",
              "--device", "cpu", "--horizons", "24", "--context", "64", "--debug"])


# ----------------------------------------------------------------------------- jobs.register
@pytest.mark.parametrize("how, message", [
    ("no-weights", "model.safetensors is missing"),
    ("corrupt", "model.safetensors: not a readable safetensors file"),
    ("no-config", "config.json is missing"),
])
def test_register_refuses_a_checkpoint_without_usable_weights(checkpoint, tmp_path, capsys, mlflow_server, how, message):
    from mlflow.tracking import MlflowClient

    from jobs.register import main

    name = f"bad-{how}"
    bad = broken_copy(checkpoint, tmp_path, how)
    rc = main(["--checkpoint", str(bad), "--name", name, "--tracking-uri", mlflow_server])
    assert rc == 2
    line = one_line_error(capsys, "jobs.register")
    assert message in line and str(bad) in line
    assert MlflowClient(mlflow_server).search_model_versions(f"name = '{name}'") == []  # nothing registered


def test_registering_the_same_weights_twice_keeps_one_version(checkpoint, tmp_path, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    from jobs.register import main

    name = "twice"
    assert main(["--checkpoint", str(checkpoint), "--name", name, "--tracking-uri", mlflow_server]) == 0
    assert main(["--checkpoint", str(checkpoint), "--name", name, "--tracking-uri", mlflow_server]) == 0
    assert "models:/twice/1 (unchanged)" in capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    # other weights are a new version
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    assert main(["--checkpoint", str(other), "--name", name, "--tracking-uri", mlflow_server]) == 0
    assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]


# ----------------------------------------------------------------------------- jobs.pretrain
@pytest.mark.parametrize("yaml_text, extra, message", [
    ("train: {max_steps: 5}\n", ["train.max_stepz=3"],
     "override 'train.max_stepz=3': unknown key 'max_stepz' in section 'train' (did you mean 'max_steps'?)"),
    ("train: {max_steps: 5}\n", ["optim.lr=fast"], "override 'optim.lr=fast': optim.lr: expected float, got 'fast'"),
    ("train: {max_steps: 5}\n", ["train.max_steps"], "override 'train.max_steps': must look like section.key=value"),
    ("train: {max_steps: many}\n", [], "train.max_steps: expected int, got 'many'"),
    ("optim: {lr: 1e-3, wd: 0.1}\n", [], "unknown key 'wd' in section 'optim'"),
    ("train: [1, 2\n", [], "not valid YAML"),
    ("parallel: {zero_stage: 3, ep_size: 2}\n", [], "needs ZeRO stage 1 or 2"),
])
def test_pretrain_bad_config(tmp_path, capsys, yaml_text, extra, message):
    from jobs.pretrain import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert main(["--config", str(path), "--data", str(tmp_path / "data"), *extra]) == 2
    line = one_line_error(capsys, "jobs.pretrain")
    assert message in line
    if not extra:  # a mistake in the file names the file
        assert str(path) in line


def test_pretrain_missing_config_file(tmp_path, capsys):
    from jobs.pretrain import main

    assert main(["--config", str(tmp_path / "nope.yaml"), "--data", "x"]) == 2
    assert "nope.yaml does not exist" in one_line_error(capsys, "jobs.pretrain")


# ----------------------------------------------------------------------------- jobs.pipeline
@pytest.mark.parametrize("yaml_text, extra, message", [
    ("eval: {stride: often}\n", [], "eval.stride: expected int, got 'often'"),
    ("register: {nam: x}\n", [], "unknown key 'nam' in section 'register' (did you mean 'name'?)"),
    ("train: {config: configs/tiny-cpu.yaml}\n", ["train.max_stepz=2"], "unknown key 'max_stepz'"),
    ("{}\n", ["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
])
def test_pipeline_bad_config_stops_before_any_stage(tmp_path, capsys, yaml_text, extra, message):
    from jobs.pipeline import main

    path = tmp_path / "qs.yaml"
    path.write_text(yaml_text)
    out = tmp_path / "out"
    assert main(["--config", str(path), "--output-dir", str(out), *extra]) == 2
    assert message in one_line_error(capsys, "jobs.pipeline")
    assert not list(out.glob("run-*/packed"))  # no stage ran
