"""Shared test fixtures: real local services, never mocks.

- ``ray_local``: one local Ray instance for the session (4 logical CPUs so that Ray Train
  workers and Ray Data tasks can both schedule on a 2-core CI machine).
- ``s3_server``: moto's S3 server on 127.0.0.1; the AWS environment variables pointing at it
  are set at start-up (before Ray starts) so that Ray workers inherit them.
- ``mlflow_server``: a real ``mlflow server`` with a sqlite backend on 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TIMEMOE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"

# Set before anything starts Ray, so that every worker process sees the same environment.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_ACCESS_KEY_ID"] = "testing-key-id"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-secret-key"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_REGION"] = "us-east-1"
os.environ["AWS_ENDPOINT_URL"] = S3_ENDPOINT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MANIFEST.md").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """moto S3 server on 127.0.0.1; yields the endpoint URL (also in AWS_ENDPOINT_URL)."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(S3_ENDPOINT, 30, proc)
        yield S3_ENDPOINT
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh empty bucket; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (sqlite backend) on 127.0.0.1; yields its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [
            mlflow_bin, "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", 120, proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def scaling_report(tmp_path_factory):
    """The scaling report of the fake sweep in tests/_helpers_scaling.py, built once (its fits
    take most of a minute on 2 cores) for the report's own tests and the browser test."""
    from pipeline.scaling_laws import report as R
    from tests._helpers_scaling import fake_trials

    return R.build_report(fake_trials(seed=0), tmp_path_factory.mktemp("scaling_report"), n_boot=20)
