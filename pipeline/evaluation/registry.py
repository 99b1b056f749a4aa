"""MLflow model registry: a pyfunc wrapper around an exported checkpoint, registration with
lineage tags, and alias-based promotion gated on zero-shot MSE.

Serving contract (``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(df, params=...)``):
  input   DataFrame, one row per series: ``id`` (string), ``values`` (list of floats; the
          context, any length, NaNs allowed)
  params  ``horizon`` (int, default 96)
  output  DataFrame: ``id``, ``forecast`` (list of ``horizon`` floats, in the input's units)

The pyfunc imports only ``model`` + numpy/pandas/torch at load time (no Ray, no DeepSpeed): this
module keeps everything else out of its top-level imports, and the checkpoint is an artifact.

Aliases, not stages: ``candidate`` is set on registration; ``champion`` moves to a candidate
only when its average zero-shot MSE (``pipeline.evaluation.protocol``) beats the champion's, or when
there is no champion. The decision and both scores are written as tags on both versions.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.evaluation.inference import InferenceOptions, ModelForecaster, load_checkpoint
from pipeline.evaluation.protocol import EvalConfig

CANDIDATE, CHAMPION = "candidate", "champion"
DEFAULT_HORIZON = 96
WEIGHTS_FILE = "model.safetensors"
TRAIN_ARTIFACT_PATH = "final_model"  # where pipeline.train.loop logs the exported model
MANIFEST_ARTIFACT = "data/manifest.json"  # where pipeline.train.loop logs the data manifest


class TimeMoePyfunc(mlflow.pyfunc.PythonModel):
    """Forecasts with ``TimeMoeModel.forecast`` from the ``checkpoint`` artifact, on the device
    and dtype of ``model_config`` (``device``, ``dtype``, ``batch_size``) or of
    ``$TIMEMOE_DEVICE`` / ``$TIMEMOE_DTYPE``; by default the first CUDA GPU in bf16 when there
    is one, else the CPU in fp32 (``pipeline.evaluation.inference``)."""

    def load_context(self, context) -> None:
        options = InferenceOptions.from_env(getattr(context, "model_config", None))
        model, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.forecaster = ModelForecaster(model, options)
        self.model = self.forecaster.model

    # model_input is hinted pd.DataFrame, a type MLflow 3 derives no schema from (a list hint would
    # add a second, enforced schema); without any hint it warns at import about missing hints.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        horizon = int((params or {}).get("horizon", DEFAULT_HORIZON))
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        df = pd.DataFrame(model_input)
        missing = {"id", "values"} - set(df.columns)
        if missing:
            raise ValueError(f"input DataFrame lacks column(s) {sorted(missing)}; got {list(df.columns)}")
        series = [np.asarray(v, dtype=np.float64) for v in df["values"]]
        for sid, s in zip(df["id"], series):
            if s.ndim != 1 or not np.isfinite(s).any():
                raise ValueError(f"series {sid!r}: values must be a non-empty 1-D list with finite values")
        preds_BH = np.asarray(self.forecaster.forecast(series, horizon), dtype=np.float64)
        return pd.DataFrame({"id": [str(i) for i in df["id"]], "forecast": [p.tolist() for p in preds_BH]})


def model_signature(default_horizon: int = DEFAULT_HORIZON):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "id"), ColSpec(Array("double"), "values")]),
        outputs=Schema([ColSpec("string", "id"), ColSpec(Array("double"), "forecast")]),
        params=ParamSchema([ParamSpec("horizon", "long", default_horizon)]),
    )


def input_example(length: int = 64) -> pd.DataFrame:
    t = np.arange(length)
    return pd.DataFrame({"id": ["sine", "ramp"],
                         "values": [np.sin(2 * np.pi * t / 24).tolist(), (0.1 * t).tolist()]})


# ---------------------------------------------------------------------------------- lineage
def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_hash(checkpoint_dir: str | Path) -> str:
    """sha256 of the checkpoint's config.json in canonical form (key order does not matter)."""
    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(checkpoint_dir: str | Path, training_run_id: str | None = None,
                 manifest_path: str | Path | None = None, client=None) -> dict[str, str]:
    """training_run_id, weights_sha256 (of model.safetensors: what makes a registration the same
    model), data_manifest_fingerprint (sha256 of the run's data/manifest.json or of
    ``manifest_path``), config_hash, code_version (the run's git tag, else this checkout's HEAD)."""
    tags = {"training_run_id": training_run_id or "none", "config_hash": config_hash(checkpoint_dir),
            "weights_sha256": _sha256_file(Path(checkpoint_dir) / WEIGHTS_FILE),
            "data_manifest_fingerprint": "unknown", "code_version": "unknown"}
    if manifest_path is not None:
        tags["data_manifest_fingerprint"] = _sha256_file(Path(manifest_path))
    if training_run_id is not None and client is not None:
        run = client.get_run(training_run_id)
        tags["code_version"] = run.data.tags.get("mlflow.source.git.commit", "unknown")
        if manifest_path is None:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = client.download_artifacts(training_run_id, MANIFEST_ARTIFACT, tmp)
                    tags["data_manifest_fingerprint"] = _sha256_file(Path(local))
                except Exception:  # a run trained on synthetic in-memory data has no manifest
                    pass
    if tags["code_version"] == "unknown":
        tags["code_version"] = _git_commit()
    return tags


# ------------------------------------------------------------------------------ registration
def download_run_checkpoint(run_id: str, dest: str | Path, artifact_path: str = TRAIN_ARTIFACT_PATH,
                            tracking_uri: str | None = None) -> Path:
    """The exported ``save_pretrained`` directory from a training run's artifacts."""
    client = mlflow.MlflowClient(tracking_uri)
    try:
        local = Path(client.download_artifacts(run_id, artifact_path, str(dest)))
    except Exception as e:
        raise FileNotFoundError(f"run {run_id}: no artifact {artifact_path!r} ({e})") from e
    if not (local / "config.json").exists():
        raise FileNotFoundError(f"run {run_id}: artifact {artifact_path!r} has no config.json "
                                f"(files: {sorted(p.name for p in local.iterdir())})")
    return local


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    tags: dict[str, str]
    new: bool = True  # False: these weights were already registered (that version is returned)


def register_checkpoint(checkpoint_dir: str | Path, name: str, *, training_run_id: str | None = None,
                        manifest_path: str | Path | None = None, tracking_uri: str | None = None,
                        experiment: str = "model-registry", default_horizon: int = DEFAULT_HORIZON) -> Registered:
    """Log ``checkpoint_dir`` as a pyfunc model (in a registration run of its own), register it
    under ``name``, tag the version with its lineage and point the ``candidate`` alias at it."""
    ckpt = Path(checkpoint_dir)
    check_checkpoint(ckpt)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    tags = lineage_tags(ckpt, training_run_id, manifest_path, client)
    existing = registered_version_of(client, name, tags)
    if existing is not None:  # e.g. a finished pipeline run resumed: the same weights again
        print(f"[register] {name} version {existing} already holds these weights from the same training "
              f"run ({tags['weights_sha256'][:12]}); not registered again", flush=True)
        return Registered(name, existing, f"models:/{name}/{existing}", tags, new=False)
    if training_run_id is not None:  # register from the training run's experiment
        mlflow.set_experiment(experiment_id=client.get_run(training_run_id).info.experiment_id)
    else:
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"register-{name}") as run:
        mlflow.set_tags({f"lineage.{k}": v for k, v in tags.items()})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TimeMoePyfunc(),
            artifacts={"checkpoint": str(ckpt)},
            signature=model_signature(default_horizon),
            input_example=input_example(),
            # explicit, so that MLflow does not spend a subprocess inferring them
            pip_requirements=["torch", "numpy", "pandas", "safetensors", "pyyaml", f"mlflow=={mlflow.__version__}"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_model_version_tag(name, version, "registration_run_id", run.info.run_id)
    client.set_registered_model_alias(name, CANDIDATE, version)
    print(f"[register] {name} version {version} <- {ckpt} (alias {CANDIDATE}); lineage {tags}", flush=True)
    return Registered(name, version, f"models:/{name}/{version}", tags)


def check_checkpoint(ckpt: Path) -> None:
    """A registrable ``save_pretrained`` folder: config.json that parses, model.safetensors whose
    header reads; otherwise an error naming the file and what is wrong (nothing is registered)."""
    from safetensors import safe_open

    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint folder")
    for name in ("config.json", WEIGHTS_FILE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt}: not a save_pretrained checkpoint: {name} is missing "
                                    f"(files: {sorted(p.name for p in ckpt.iterdir()) or 'none'})")
    try:
        json.loads((ckpt / "config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{ckpt / 'config.json'}: not valid JSON ({err})") from None
    try:
        with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as err:  # safetensors raises its own error type without the path
        raise ValueError(f"{ckpt / WEIGHTS_FILE}: not a readable safetensors file ({err})") from None


def registered_version_of(client, name: str, tags: dict[str, str]) -> str | None:
    """The version of ``name`` already registered with the same weights and training run."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # no such registered model yet
        return None
    for mv in versions:
        if (mv.tags.get("weights_sha256") == tags["weights_sha256"]
                and mv.tags.get("training_run_id") == tags["training_run_id"]):
            return str(mv.version)
    return None


# --------------------------------------------------------------------------------- promotion
@dataclass
class PromotionDecision:
    promoted: bool
    candidate_version: str
    candidate_mse: float
    champion_version: str | None
    champion_mse: float | None
    reason: str
    # the candidate's per-(dataset, horizon) rows when it was evaluated in this call (empty when
    # its cached score was reused): what a version description shows
    candidate_rows: list[dict[str, Any]] = field(default_factory=list)


def _benchmark_digest(benchmarks_dir: str | Path) -> str:
    items = sorted((p.name, p.stat().st_size) for p in Path(benchmarks_dir).iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def zero_shot_score(name: str, version: str, benchmarks_dir: str | Path, cfg: EvalConfig, client,
                    tracking_uri: str | None = None, options: InferenceOptions | None = None,
                    workers: int | str = "auto") -> float:
    """Average zero-shot MSE of one version; cached as version tags, reused only for the same
    protocol and benchmark files (the device and dtype that produced it are tagged beside it)."""
    return _zero_shot(name, version, benchmarks_dir, cfg, client, tracking_uri, options, workers)[0]


def _zero_shot(name: str, version: str, benchmarks_dir: str | Path, cfg: EvalConfig, client,
               tracking_uri: str | None, options: InferenceOptions | None,
               workers: int | str) -> tuple[float, list[dict[str, Any]]]:
    """``zero_shot_score`` and the rows of the evaluation it ran (none when the score was cached)."""
    from pipeline.evaluation.workers import evaluate_model  # Ray: not for the pyfunc's imports

    mv = client.get_model_version(name, version)
    if mv.tags.get("zeroshot.protocol") == _score_key(cfg, benchmarks_dir) and "zeroshot.avg_mse" in mv.tags:
        return float(mv.tags["zeroshot.avg_mse"]), []
    uri = f"models:/{name}/{version}"
    result = evaluate_model(uri, benchmarks_dir, cfg, options, workers, tracking_uri, model_name=uri)
    print(result.table(), flush=True)
    rows = [{"dataset": r.dataset, "horizon": r.horizon, "mse": r.mse, "mae": r.mae} for r in result.rows]
    return record_zero_shot_score(name, version, benchmarks_dir, result, client), rows


def _score_key(cfg: EvalConfig, benchmarks_dir: str | Path) -> str:
    return f"{cfg.protocol_key()};bench={_benchmark_digest(benchmarks_dir)}"


def record_zero_shot_score(name: str, version: str, benchmarks_dir: str | Path, result,
                           client=None, tracking_uri: str | None = None) -> float:
    """Tag a version with the average MSE of an evaluation of its own checkpoint, so that the
    promotion gate reuses it instead of evaluating the same weights on the same protocol again."""
    client = client or mlflow.MlflowClient(tracking_uri)
    score = result.average_mse()
    client.set_model_version_tag(name, version, "zeroshot.protocol", _score_key(result.config, benchmarks_dir))
    client.set_model_version_tag(name, version, "zeroshot.avg_mse", repr(score))
    for k in ("device", "dtype", "gpu", "workers"):
        if k in result.inference:
            client.set_model_version_tag(name, version, f"zeroshot.{k}", str(result.inference[k]))
    return score


def promote_if_better(name: str, candidate_version: str, benchmarks_dir: str | Path, cfg: EvalConfig | None = None,
                      tracking_uri: str | None = None, options: InferenceOptions | None = None,
                      workers: int | str = "auto") -> PromotionDecision:
    """Move ``champion`` to the candidate iff its average zero-shot MSE is strictly lower than
    the champion's (or there is no champion). Tags ``promotion.*`` on both versions."""
    from mlflow.exceptions import MlflowException

    cfg = cfg or EvalConfig()
    client = mlflow.MlflowClient(tracking_uri)
    cand = str(candidate_version)
    try:
        champ: str | None = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        champ = None
    cand_mse, cand_rows = _zero_shot(name, cand, benchmarks_dir, cfg, client, tracking_uri, options, workers)
    if champ is None:
        decision = PromotionDecision(True, cand, cand_mse, None, None, "no champion yet", cand_rows)
    elif champ == cand:  # nothing to decide, and its promotion tags stay as they were
        return PromotionDecision(False, cand, cand_mse, champ, cand_mse, "candidate is already champion", cand_rows)
    else:
        champ_mse = zero_shot_score(name, champ, benchmarks_dir, cfg, client, tracking_uri, options, workers)
        better = cand_mse < champ_mse
        decision = PromotionDecision(better, cand, cand_mse, champ, champ_mse,
                                     f"candidate {cand_mse:.6g} {'<' if better else '>='} champion {champ_mse:.6g}",
                                     cand_rows)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, cand)
    verdict = "promoted" if decision.promoted else "rejected"
    for k, v in {"promotion.decision": verdict, "promotion.reason": decision.reason,
                 "promotion.candidate_mse": repr(cand_mse), "promotion.champion_version": champ or "none",
                 "promotion.champion_mse": "none" if decision.champion_mse is None else repr(decision.champion_mse),
                 "promotion.protocol": cfg.protocol_key()}.items():
        client.set_model_version_tag(name, cand, k, v)
    if champ is not None and champ != cand:
        client.set_model_version_tag(name, champ, f"promotion.challenge.v{cand}",
                                     f"{'replaced' if decision.promoted else 'kept'}: champion "
                                     f"{decision.champion_mse!r} vs candidate {cand_mse!r}")
    print(f"[register] {name} v{cand}: {verdict} ({decision.reason})", flush=True)
    return decision


def aliases_of(name: str, version: str, tracking_uri: str | None = None) -> list[str]:
    """The aliases pointing at ``name`` version ``version``."""
    return list(mlflow.MlflowClient(tracking_uri).get_model_version(name, version).aliases)
