#!/usr/bin/env bash
# Wheels a GPU image with torch but no DeepSpeed (Python 3.12) lacks for the real train loop
# without Ray (pipeline.train.torchrun): DeepSpeed and what it needs beyond the image. Run where
# PyPI is reachable, in the repo root; copy .whl/ (git-ignored) to the air-gapped host with the
# repository. deploy/build_offline_bundle.sh builds the full set (Ray and MLflow too).
# Versions: those the CPU venv resolved (pydantic needs the typing-inspection it was released with).
# Ray and MLflow are not carried: pipeline.train.torchrun needs neither (metrics go to files).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PY:-.venv/bin/python}
# DeepSpeed is an sdist; its wheel is pure Python, so building it here serves any platform
$PY -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
