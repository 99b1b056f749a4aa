"""The docs follow the code: every repository path and every ``package.module[.name]`` they name
in backticks exists (a file moved or a function renamed fails here, not in a reader's hands)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
TOP = ("model", "preprocessing", "pipeline", "jobs", "tests", "benchmarks", "configs", "deploy", "docs", "typed_config")
PATH = re.compile(r"`((?:%s)/[\w/-]+(?:\.\w+)?)(?:[:( ][^`]*)?`" % "|".join(TOP))
DOTTED = re.compile(r"`((?:model|preprocessing|pipeline|jobs|typed_config)(?:\.\w+)+)")


def _defines(module_file: Path, name: str) -> bool:
    text = module_file.read_text()
    return re.search(rf"^\s*(?:def|class|async def)\s+{name}\b|^\s*{name}\s*[:=]|\bimport .*\b{name}\b", text, re.M) is not None


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if module.exists():
            rest = parts[cut:]
            return not rest or _defines(module, rest[0])
    return False


def test_paths_named_in_docs_exist():
    missing = sorted({f"{doc.name}: {m}" for doc in DOCS for m in PATH.findall(doc.read_text())
                      if not any(c in m for c in "*{<") and not (ROOT / m.rstrip(".")).exists()})
    assert not missing, missing


def _is_code_reference(dotted: str) -> bool:
    """``model.init_from`` is a config key and ``model.safetensors`` a file; ``model.flops`` code."""
    first, second = dotted.split(".")[:2]
    return first != "model" or (ROOT / "model" / f"{second}.py").exists()


def test_modules_and_names_in_docs_exist():
    missing = sorted({f"{doc.name}: {m}" for doc in DOCS for m in DOTTED.findall(doc.read_text())
                      if _is_code_reference(m) and not _resolves(m)})
    assert not missing, missing
