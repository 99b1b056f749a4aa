"""The layering holds: model/ is plain PyTorch, preprocessing/ never touches torch, and the
heavy frameworks appear only in the pipeline/ modules that own them (style habit 15)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_model_imports_only_torch_numpy_safetensors_yaml():
    allowed = {"torch", "numpy", "safetensors", "yaml", "model"}
    offenders = {}
    for path in package_files("model"):
        bad = {m for m in imported_top_modules(path) if m.split(".")[0] not in allowed | STDLIB}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"model/ must stay plain PyTorch; found: {offenders}"


def test_preprocessing_never_imports_torch_or_training_frameworks():
    forbidden = {"torch", "deepspeed", "mlflow", "model", "pipeline"}
    offenders = {}
    for path in package_files("preprocessing"):
        bad = {m for m in imported_top_modules(path) if m.split(".")[0] in forbidden}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"preprocessing/ must not import torch or training code; found: {offenders}"


@pytest.mark.parametrize("framework", ["deepspeed", "mlflow", "ray.train"])
def test_training_frameworks_live_only_in_pipeline(framework):
    offenders = []
    for package in ("model", "preprocessing", "jobs"):
        for path in package_files(package):
            mods = imported_top_modules(path)
            if any(m == framework or m.startswith(framework + ".") for m in mods):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{framework} imported outside pipeline/: {offenders}"
