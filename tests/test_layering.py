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


# --------------------------------------------------------------------------- pipeline/'s inner borders
# Which part of pipeline/ may import which (function-level imports count too). Reading down the
# table is reading up the stack: a part imports only parts listed for it.
PIPELINE_PARTS = {
    "config": set(),          # the typed training config
    "console": set(),         # what a job prints (progress lines, logs that read well in a file)
    "tracking": {"config", "console"},  # MLflow behind one object
    "reports": set(),         # plots, MLflow pictures and tables, offline HTML pages
    "parallel": {"config"},   # model -> distributed training engine (EP, AC, compile, optimizer, ZeRO)
    "train": {"config", "console", "tracking", "parallel", "reports"},  # the loop, its runtimes, data, checkpoints
    "evaluation": {"parallel", "tracking"},  # the zero-shot protocol, inference, Ray workers, registry
    "scaling_laws": {"config", "tracking", "reports", "train", "evaluation"},  # sweeps, fits, reports
    "finetune": {"config", "tracking", "parallel", "train", "evaluation"},  # benchmark train data, in-distribution protocol
    "quickstart": {"config", "console", "tracking", "train", "evaluation", "reports"},  # the one-machine job's stages
}


def _pipeline_modules() -> dict[str, Path]:
    mods = {}
    for path in package_files("pipeline"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _pipeline_edges() -> dict[str, set[str]]:
    mods = _pipeline_modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pipeline")]
            for t in targets:
                dep = owner(t)
                if dep and dep not in (name, "pipeline"):
                    edges[name].add(dep)
    return edges


def _part(module: str) -> str:
    return module.split(".")[1]


def test_pipeline_has_few_top_level_modules_and_named_parts():
    top = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
    parts = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert set(top) | set(parts) == set(PIPELINE_PARTS), (top, parts)
    assert len(top) <= 3, top


def test_pipeline_parts_import_only_downwards():
    upward = sorted(f"{m} -> {d}" for m, deps in _pipeline_edges().items() for d in deps
                    if _part(d) != _part(m) and _part(d) not in PIPELINE_PARTS[_part(m)])
    assert not upward, f"imports against pipeline/'s layering (PIPELINE_PARTS): {upward}"


def test_no_import_cycles_in_pipeline():
    edges, state, cycles = _pipeline_edges(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles (function-level imports included): {cycles}"
