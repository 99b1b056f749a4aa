"""MLflow tracking behind one object that does nothing off rank 0.

One MLflow run per training, across restarts: the run id lives in the resume state and a
resumed run re-opens it. The tracking server is an observer, not a dependency: if a call
fails (server gone, network), the tracker says so once and turns itself off; training goes on.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import TrackingSection
from pipeline.console import say
from typed_config import redact_secrets

log = logging.getLogger("pipeline.tracking")
PROGRESS_METRIC = "loss"  # logged at every logging step: its last step is where a run's metrics end


def tracking_uri(explicit: str | None = None, store_dir: str | Path | None = None) -> str:
    """The MLflow tracking URI every job uses: ``explicit`` (a config key or ``--tracking-uri``),
    else ``$MLFLOW_TRACKING_URI``, else a sqlite store ``mlflow.db`` in ``store_dir`` (the job's
    output folder; the working directory when it has none)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(store_dir or Path.cwd()) / 'mlflow.db').resolve()}"
    keep_credentials_out_of_logs(uri)
    return uri


def experiment_id(client: Any, name: str, artifact_dir: str | Path | None = None) -> str:
    """The id of experiment ``name``, created when missing; ``client`` is an ``MlflowClient`` or a
    tracking URI. With a local (sqlite) store its artifacts go under ``artifact_dir``, so that they
    do not land in whatever working directory a Ray worker has."""
    if isinstance(client, str):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=client)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_dir is not None and str(client.tracking_uri).startswith("sqlite:"):
        location = Path(artifact_dir).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def keep_credentials_out_of_logs(uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>" when a run ends, credentials included;
    with a URI that holds any, that line is switched off (this process and those it starts)."""
    if redact_secrets(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class Tracker:
    """``Tracker(section, rank)``; on rank != 0 (or disabled) every method is a no-op."""

    def __init__(self, section: TrackingSection, rank: int):
        self.section = section
        self.active = section.enabled and rank == 0
        self.run_id: str | None = None
        self._client = None
        self._logged_until = 0  # steps up to this one were logged before a resume

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any failure of the observer must not stop training
            self.active = False
            msg = redact_secrets(f"MLflow {what} failed ({type(err).__name__}: {err}); tracking is OFF, training continues")
            log.warning(msg)
            say(f"[tracking] {msg}")
            return None

    def start(self, run_id: str | None, params: dict[str, Any]) -> str | None:
        """Open (or, with ``run_id``, re-open) the run; log params on first open only."""
        if not self.active:
            return run_id
        # Fail fast instead of mlflow's default minutes of retries when the server is gone.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

        def open_run() -> str:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri(self.section.tracking_uri))
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
                # a resume redoes the steps after its checkpoint that the run had already logged:
                # those are not logged twice
                logged = self._client.get_metric_history(run_id, PROGRESS_METRIC)
                self._logged_until = max((m.step for m in logged), default=0)
                return run_id
            exp_id = experiment_id(self._client, self.section.experiment)
            run = self._client.create_run(exp_id, run_name=self.section.run_name)
            items = [(k, str(v)[:6000]) for k, v in params.items()]
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                self._client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            return run.info.run_id

        self.run_id = self._guard("start", open_run) or run_id
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._logged_until:
            return

        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        self._guard("log_metrics", send)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            return

        def send() -> None:
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

        self._guard(f"log_artifact({path.name})", send)

    def log_text(self, text: str, name: str) -> None:
        self._guard(f"log_text({name})", lambda: self._client.log_text(self.run_id, text, name))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("finish", lambda: self._client.set_terminated(self.run_id, status=status))
