"""cluster.yaml holds: Ray's own launcher code accepts it, and the invariants our jobs rely on.

Three layers, cheapest first:
- Ray's schema and default-filling (`prepare_config` + `validate_config`, what `ray up` runs
  before it touches AWS);
- Ray's whole `ray up` bootstrap (`_bootstrap_config`: resource autodetection from EC2's
  instance-type catalogue, key pair, subnets, security groups) against moto's in-process EC2,
  so the declared CPU/GPU counts are checked against what AWS says the instances have;
- our invariants: node shapes, autoscaling bounds, the custom resources and where the
  autoscaler places work asking for them, no secrets, pins equal to pyproject.toml.
"""
from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"

HEAD, GPU, CPU = "head", "gpu_trainer", "cpu_data"


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture
def config(raw_text) -> dict:
    return yaml.safe_load(raw_text)


def node_types(config: dict) -> dict:
    return config["available_node_types"]


# --- Ray's own validation -----------------------------------------------------------------


def test_ray_schema_and_prepare_config_accept_it(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # jsonschema ray-schema.json + Ray's cross-field checks
    assert prepared["head_node_type"] == HEAD
    assert set(node_types(prepared)) == {HEAD, GPU, CPU}


@pytest.fixture
def mocked_aws(monkeypatch, tmp_path, config):
    """moto's in-process AWS; HOME in tmp_path (Ray writes the SSH key under ~/.ssh)."""
    moto = pytest.importorskip("moto")
    import boto3
    from ray.autoscaler._private.aws import node_provider
    from ray.autoscaler._private.aws import utils as aws_utils

    # Ray pages through EC2's whole catalogue (~1,400 instance types, ~30 s under moto);
    # asking for our instance types only returns the same entries for them.
    ours = sorted({nt["node_config"]["InstanceType"] for nt in node_types(config).values()})

    def list_our_instance_types(region, aws_credentials=None):
        ec2 = boto3.client("ec2", region_name=region)
        return ec2.describe_instance_types(InstanceTypes=ours)["InstanceTypes"]

    monkeypatch.setattr(node_provider, "list_ec2_instances", list_our_instance_types)

    # conftest points every AWS client at a local S3 server; EC2 must go to moto's mock.
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("HOME", str(tmp_path))
    aws_utils.client_cache.cache_clear()
    aws_utils.resource_cache.cache_clear()
    with moto.mock_aws():
        yield
    aws_utils.client_cache.cache_clear()
    aws_utils.resource_cache.cache_clear()


def test_ray_up_bootstrap_against_mocked_ec2(config, mocked_aws):
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.commands import _bootstrap_config

    # Ray's autodetection, alone, from EC2's instance-type catalogue: what the hardware has.
    detected = AWSNodeProvider.fillout_available_node_types_resources(
        {**config, "available_node_types": {
            name: {**nt, "resources": {}} for name, nt in node_types(config).items()}}
    )["available_node_types"]
    assert detected[GPU]["resources"]["GPU"] == 8
    assert detected[GPU]["resources"]["accelerator_type:H100"] == 1
    assert "GPU" not in detected[CPU]["resources"]
    for name in (GPU, CPU):
        # what we declare is what the instance has: the autoscaler plans with our numbers
        declared = node_types(config)[name]["resources"]
        assert declared["CPU"] == detected[name]["resources"]["CPU"], name
        assert declared.get("GPU", 0) == detected[name]["resources"].get("GPU", 0), name

    # The whole `ray up` bootstrap short of launching instances.
    # (_bootstrap_config runs validate_config itself, before the AWS steps.)
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    nts = node_types(resolved)
    assert nts[GPU]["resources"]["GPU"] == 8 and nts[GPU]["resources"]["trainer"] == 8
    assert nts[CPU]["resources"]["GPU"] == 0 and nts[CPU]["resources"]["data"] == 32
    assert nts[GPU]["resources"]["memory"] > 0  # autodetected for workers
    for name, nt in nts.items():
        nc = nt["node_config"]
        assert nc["SubnetIds"] and nc["SecurityGroupIds"], name
        assert nc["IamInstanceProfile"] == node_types(config)[name]["node_config"]["IamInstanceProfile"]
    # our head profile is used as given: Ray did not create its broad default role
    assert resolved["head_node"] == {}


# --- node shapes and autoscaling bounds -----------------------------------------------------


def test_gpu_worker_type_is_p5_with_eight_gpus(config):
    gpu = node_types(config)[GPU]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"]["GPU"] == 8
    # one `trainer` unit per GPU: a Train worker asks {"GPU": 1, "trainer": 1}
    assert gpu["resources"]["trainer"] == gpu["resources"]["GPU"]
    assert "data" not in gpu["resources"]


def test_cpu_worker_type_has_no_gpu(config):
    cpu = node_types(config)[CPU]
    assert re.fullmatch(r"[mc]7i\.\d*x?large", cpu["node_config"]["InstanceType"])
    assert cpu["resources"]["GPU"] == 0
    # one `data` unit per vCPU: a preprocessing task asks {"data": 1} next to num_cpus=1
    assert cpu["resources"]["data"] == cpu["resources"]["CPU"]
    assert "trainer" not in cpu["resources"]


def test_head_runs_no_work_and_is_not_autoscaled(config):
    head = node_types(config)[HEAD]
    assert head["resources"] == {"CPU": 0}
    assert head["min_workers"] == head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g")), "no GPU head"


def test_autoscaling_bounds(config):
    nts = node_types(config)
    for name in (GPU, CPU):
        assert 0 <= nts[name]["min_workers"] <= nts[name]["max_workers"], name
    # no idle p5 by default: ~$98/h each
    assert nts[GPU]["min_workers"] == 0
    assert 1 <= nts[GPU]["max_workers"] <= 16  # 16 nodes = 128 GPUs, the paper's scale
    assert 1 <= nts[CPU]["max_workers"]
    assert nts[GPU]["max_workers"] + nts[CPU]["max_workers"] <= config["max_workers"]
    assert sum(nt.get("min_workers", 0) for nt in nts.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_every_node_runs_the_same_os_and_can_reach_s3(config):
    images = {nt["node_config"]["ImageId"] for nt in node_types(config).values()}
    # Ray needs one Python minor version cluster-wide; all images are Ubuntu 22.04 (3.10).
    assert all("22.04" in image for image in images), images
    for name, nt in node_types(config).items():
        assert "IamInstanceProfile" in nt["node_config"], f"{name} has no S3 access"


# --- the custom resources place work where the docs say ------------------------------------


def plan(config: dict, demands: list[dict]) -> tuple[dict, list]:
    """The node types Ray's autoscaler would launch for `demands` on an empty cluster."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    prepared = prepare_config(copy.deepcopy(config))
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({})
    )
    to_add, residual = get_nodes_for(
        node_types(prepared), {HEAD: 1}, HEAD, prepared["max_workers"], demands, scorer
    )
    return {k: v for k, v in to_add.items() if v}, residual


def test_train_workers_land_on_gpu_nodes(config):
    workers = [{"CPU": 8, "GPU": 1, "trainer": 1}] * 16
    assert plan(config, workers) == ({GPU: 2}, [])


def test_preprocessing_tasks_land_on_cpu_nodes(config):
    assert plan(config, [{"CPU": 1, "data": 1}] * 64) == ({CPU: 2}, [])
    # a big preprocessing job is capped at cpu_data's max_workers, never spills onto p5s
    to_add, residual = plan(config, [{"CPU": 1, "data": 1}] * 1000)
    assert to_add == {CPU: node_types(config)[CPU]["max_workers"]} and residual


def test_custom_resources_are_documented():
    doc = CLUSTER_DOC.read_text()
    for snippet in ('"trainer": 1', '"data": 1', "ray job submit --working-dir ."):
        assert snippet in doc, snippet


# --- no secrets -----------------------------------------------------------------------------


def test_no_secrets_in_the_file(raw_text, config):
    lowered = raw_text.lower()
    for word in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token",
                 "password", "token", "secret"):
        assert word not in lowered, word
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", raw_text), "AWS access key id"
    # the tracking URI and MLflow credentials come from the environment at submit time
    assert not re.search(r"MLFLOW_TRACKING_\w+\s*[=:]", raw_text)
    assert not re.search(r"https?://", raw_text), "no endpoint (tracking server, ...) baked in"
    assert "aws_credentials" not in config["provider"]
    assert "ssh_private_key" not in config.get("auth", {})


# --- the environment on the nodes matches pyproject.toml -----------------------------------


def installed_requirements(config: dict) -> dict[str, Requirement]:
    """Requirements of the `pip install` setup command, by normalised name."""
    installs = [c for c in config["setup_commands"] if "pip install" in c and "ray[" in c]
    assert len(installs) == 1, installs
    args = shlex.split(installs[0])
    args = args[args.index("install") + 1:]
    reqs = [Requirement(a) for a in args if not a.startswith("-")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_setup_commands_pin_what_pyproject_pins(config):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = [Requirement(d) for d in project["dependencies"]]
    installed = installed_requirements(config)
    for want in wanted:
        name = want.name.lower().replace("_", "-")
        assert name in installed, f"{name} from pyproject.toml is not installed on the nodes"
        got = installed[name]
        assert got.extras == want.extras, name
        if any(s.operator == "==" for s in want.specifier):
            assert got.specifier == want.specifier, f"{name}: {got.specifier} != {want.specifier}"
        elif got.specifier != want.specifier:
            # a tighter pin is fine when pyproject's range allows it (torch==2.13.0)
            (pin,) = list(got.specifier)
            assert pin.operator == "==" and want.specifier.contains(pin.version), name
    # the nodes run the Ray that drives `ray up`/`ray job submit` here
    assert str(installed["ray"].specifier) == f"=={ray.__version__}"
    extra = set(installed) - {w.name.lower().replace("_", "-") for w in wanted}
    assert not extra, f"installed on the nodes but not a dependency in pyproject.toml: {extra}"
