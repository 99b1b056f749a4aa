"""The offline bundle for air-gapped GPU hosts (deploy/, docs/cluster.md), without building it.

Building the real bundle downloads ~120 MB and runs xz for minutes, so CI checks the two things
that can silently go wrong between builds:
- the build script's pins are the project's pins (ray, deepspeed, mlflow in pyproject.toml),
  and every bundled wheel is pinned exactly, once;
- install_offline_bundle.sh, run on a small fabricated bundle (a fake ray tree and one real
  wheel built here with `pip wheel`), writes PREFIX/site, the bin/ray and bin/mlflow wrappers
  and env.sh that work from a clean environment, is idempotent, and refuses what it must.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "build_offline_bundle.sh"
INSTALL = ROOT / "deploy" / "install_offline_bundle.sh"
PYTHON_TAG = "%d.%d" % sys.version_info[:2]


def _build_script_pins() -> dict[str, str]:
    """NAME -> VERSION of every wheel the build script downloads or builds, ${X} resolved."""
    text = BUILD.read_text()
    variables = dict(re.findall(r"^([A-Z_]+_VERSION)=(\S+)$", text, flags=re.M))
    specs = re.findall(r'"(\w+)==\$(\w+_VERSION)"', text)  # ray==$RAY_VERSION, deepspeed==...
    pins = {name: variables[var] for name, var in specs}
    arrays = re.findall(r'^download "[^"]*" "\$\{(\w+)\[@\]\}"$', text, flags=re.M)
    assert len(arrays) >= 4, "the build script's download lines changed shape"
    for array in arrays:
        (body,) = re.findall(rf"^{array}=\((.*?)\)$", text, flags=re.M | re.S)
        for line in body.splitlines():
            for spec in line.split("#", 1)[0].split():
                spec = re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], spec)
                name, sep, version = spec.partition("==")
                assert sep and version, f"{BUILD.name}: {spec!r} in {array} is not pinned with =="
                key = re.sub(r"[-_.]+", "-", name).lower()
                assert key not in pins, f"{BUILD.name}: {name} is listed twice"
                pins[key] = version
    return pins


def test_build_pins_equal_pyproject():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pyproject = {r.name: r for r in map(Requirement, deps)}
    pins = _build_script_pins()
    for name in ("ray", "deepspeed", "mlflow"):
        (spec,) = pyproject[name].specifier
        assert spec.operator == "==", f"pyproject.toml no longer pins {name}"
        assert pins[name] == spec.version, (
            f"{BUILD.name} bundles {name} {pins[name]}, pyproject.toml pins {spec.version}")
    # the full mlflow wheel holds mlflow-skinny and mlflow-tracing: neither may ride along at
    # another version, and pydantic is bundled once for ray, deepspeed and mlflow
    assert "mlflow-skinny" not in pins and "mlflow-tracing" not in pins
    assert {"pydantic", "pydantic-core", "hjson", "jsonschema"} <= pins.keys()


def _fake_ray_tree() -> bytes:
    """An xz tar with ray/ (a `main` that reports where it runs from), an executable raylet
    and the dist-info whose entry_points.txt the installer reads."""
    files = {
        "ray/__init__.py": "",
        "ray/scripts/__init__.py": "",
        "ray/scripts/scripts.py": textwrap.dedent("""\
            import os, sys
            import ray
            def main():
                print("ray-file", ray.__file__)
                print("pythonpath", os.environ.get("PYTHONPATH", ""))
                print("argv", " ".join(sys.argv[1:]))
                return 0
            """),
        "ray/core/src/ray/raylet/raylet": "#!/bin/sh\necho raylet\n",
        "ray-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: ray\nVersion: 0.0.1\n",
        "ray-0.0.1.dist-info/entry_points.txt":
            "[console_scripts]\nray = ray.scripts.scripts:main\nserve = ray.serve.scripts:cli\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith("raylet") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _pip_wheel(src: Path, out: Path) -> Path:
    """Build src's wheel with pip; without build isolation where the venv's setuptools can
    build wheels alone (>= 70.1), else pip fetches setuptools from the index."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    try:
        if Version(metadata.version("setuptools")) >= Version("70.1"):
            cmd[5:5] = ["--no-build-isolation"]
    except metadata.PackageNotFoundError:
        pass
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory) -> Path:
    """A bundle folder shaped like .bundle/: the fake ray tree and one group holding a small
    pure-Python wheel (distribution `mlflow`, so that the mlflow wrapper is written too)."""
    tmp = tmp_path_factory.mktemp("fake-bundle")
    src = tmp / "src"
    (src / "mlflow").mkdir(parents=True)
    (src / "mlflow" / "__init__.py").write_text("")
    (src / "mlflow" / "cli.py").write_text(textwrap.dedent("""\
        import os
        def cli():
            print("job-execution", os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION"))
            return 0
        """))
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "mlflow"
        version = "0.0.1"
        [project.scripts]
        mlflow = "mlflow.cli:cli"
        [tool.setuptools]
        packages = ["mlflow"]
        """))
    wheel = _pip_wheel(src, tmp / "dist")
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "ray-0.0.1-test.tar.xz").write_bytes(_fake_ray_tree())
    with tarfile.open(bundle / "wheels-test.tar.xz", "w:xz") as tar:
        tar.add(wheel, arcname=wheel.name)
    (bundle / "BUNDLE_INFO").write_text(
        f"python={PYTHON_TAG}\nray=0.0.1\nray_archive=ray-0.0.1-test.tar.xz\nwheel_groups=test\n")
    return bundle


def _install(prefix: Path, bundle: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), str(prefix), str(bundle)], capture_output=True, text=True,
        timeout=120, env={"PATH": os.environ["PATH"], "HOME": str(prefix.parent),
                          "PYTHON": sys.executable, **env})


def _clean_env(**extra) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **extra}


def test_install_writes_site_wrappers_and_env(fake_bundle, tmp_path):
    prefix = tmp_path / "prefix"
    first = _install(prefix, fake_bundle)
    assert first.returncode == 0, first.stderr
    site = prefix / "site"
    assert (site / "mlflow" / "cli.py").is_file() and (site / "ray" / "scripts").is_dir()
    assert os.access(site / "ray/core/src/ray/raylet/raylet", os.X_OK), "mode bits lost"
    assert f"export PYTHONPATH={site}" in first.stdout and f"export PATH={prefix}/bin" in first.stdout

    # the wrappers run the image's interpreter by path, with no PYTHONPATH set by the caller,
    # and hand PREFIX/site on to what they start
    ray = (prefix / "bin" / "ray").read_text()
    assert ray.startswith(f"#!{sys.executable}\n") and "from ray.scripts.scripts import main" in ray
    assert not (prefix / "bin" / "serve").exists(), "only ray and mlflow get wrappers"
    out = subprocess.run([str(prefix / "bin" / "ray"), "start", "--head"], capture_output=True,
                         text=True, env=_clean_env(), check=True).stdout
    assert f"ray-file {site}/ray/__init__.py" in out
    assert f"pythonpath {site}\n" in out and "argv start --head" in out
    out = subprocess.run([str(prefix / "bin" / "mlflow")], capture_output=True, text=True,
                         env=_clean_env(), check=True).stdout
    assert "job-execution false" in out  # huey is not bundled: the server's job runner is off
    out = subprocess.run([str(prefix / "bin" / "mlflow")], capture_output=True, text=True,
                         env=_clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true"), check=True).stdout
    assert "job-execution true" in out

    # env.sh: sourcing it twice adds each folder once, and ray then resolves to the wrapper
    shell = (f"source {prefix}/env.sh; source {prefix}/env.sh; echo \"$PYTHONPATH\"; "
             "echo \"$PATH\"; command -v ray")
    pythonpath, path, which = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, env=_clean_env(PYTHONPATH="/x"),
        check=True).stdout.splitlines()
    assert pythonpath == f"{site}:/x"
    assert path.split(":").count(f"{prefix}/bin") == 1 and which == f"{prefix}/bin/ray"


def test_install_is_idempotent_and_refuses_what_it_must(fake_bundle, tmp_path):
    prefix = tmp_path / "prefix"
    assert _install(prefix, fake_bundle).returncode == 0
    marker = prefix / "site" / "left-by-user"
    marker.write_text("x")
    again = _install(prefix, fake_bundle)
    assert again.returncode == 0 and "already holds this bundle" in again.stdout
    assert marker.exists(), "an unchanged bundle must not reinstall"
    forced = _install(prefix, fake_bundle, FORCE="1")
    assert forced.returncode == 0 and not marker.exists()
    assert not list(prefix.glob(".install.*")), "the temporary folder is removed"

    # a folder the script did not write is never replaced
    foreign = tmp_path / "foreign"
    (foreign / "site").mkdir(parents=True)
    (foreign / "site" / "keep.txt").write_text("mine")
    refused = _install(foreign, fake_bundle)
    assert refused.returncode != 0 and "not replacing it" in refused.stderr
    assert (foreign / "site" / "keep.txt").read_text() == "mine"

    # a bundle built for another Python is refused before anything is unpacked
    other = tmp_path / "other-python"
    other.mkdir()
    for f in fake_bundle.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "BUNDLE_INFO").write_text(
        (fake_bundle / "BUNDLE_INFO").read_text().replace(f"python={PYTHON_TAG}", "python=2.7"))
    wrong = _install(tmp_path / "p2", other)
    assert wrong.returncode != 0 and "built for Python 2.7" in wrong.stderr
    assert not (tmp_path / "p2" / "site").exists()
