#!/usr/bin/env bash
# Prepares .reference/ (git-ignored) for `benchmarks/evaluate_gpu.py --reference-dir .reference`:
# the released Time-MoE model files (github Time-MoE/Time-MoE, Apache-2.0: its code is measured
# beside ours but never committed here) and the wheels they need that a GPU image lacks.
#
#   bash benchmarks/released_timemoe.sh [SOURCE] [BENCHMARKS_DIR]
#
# SOURCE: a clone or a bare mirror of Time-MoE/Time-MoE (default: a shallow git clone from GitHub).
# BENCHMARKS_DIR: where ETTh1.csv(.gz) is; copied to .reference/benchmarks for the end-to-end check
# (the other datasets' window counts follow from the paper's split sizes).
# PYVER (default 3.12, the GPU image's Python) picks the wheels' CPython version; REFERENCE_DIR
# the output folder. About 14 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-}
BENCH=${2:-}
OUT=${REFERENCE_DIR:-.reference}
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}

if [ -z "$SRC" ]; then
    SRC=$(mktemp -d)/Time-MoE
    git clone -q --depth 1 https://github.com/Time-MoE/Time-MoE "$SRC"
fi
rm -rf "$OUT/time_moe"
mkdir -p "$OUT/time_moe/models" "$OUT/wheels"
# the model files import only transformers and each other (relative imports inside models/)
if [ "$(git -C "$SRC" rev-parse --is-bare-repository 2>/dev/null)" = "true" ]; then
    for f in $(git -C "$SRC" ls-tree --name-only HEAD time_moe/models/ | grep '\.py$') time_moe/__init__.py; do
        git -C "$SRC" show "HEAD:$f" > "$OUT/$f"
    done
    git -C "$SRC" show HEAD:LICENSE > "$OUT/time_moe/LICENSE"
else
    cp "$SRC"/time_moe/__init__.py "$OUT/time_moe/"
    cp "$SRC"/time_moe/models/*.py "$OUT/time_moe/models/"
    cp "$SRC"/LICENSE "$OUT/time_moe/LICENSE"
fi
git -C "$SRC" rev-parse HEAD > "$OUT/time_moe/SOURCE_COMMIT" 2>/dev/null || echo unknown > "$OUT/time_moe/SOURCE_COMMIT"

# the versions the released code pins (transformers 4.40.1) and their tokenizer/hub releases;
# safetensors, tqdm, filelock, packaging, pyyaml, requests and numpy come with the GPU image
rm -f "$OUT"/wheels/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT/wheels" \
    transformers==4.40.1 tokenizers==0.19.1 huggingface_hub==0.23.4 regex==2026.12.2

if [ -n "$BENCH" ]; then
    mkdir -p "$OUT/benchmarks"
    cp --no-preserve=mode "$BENCH"/ETTh1.csv* "$OUT/benchmarks/"
fi
du -sh "$OUT"
ls "$OUT"/time_moe/models "$OUT"/wheels
