#!/usr/bin/env bash
# Build .bundle/: what a GPU image with torch (Python 3.12, x86_64 manylinux, no package index)
# lacks for this project's user path: Ray 2.60 (head with dashboard, job server, Ray Data, Ray
# Train), DeepSpeed 0.19.8, MLflow 3.17.2 (sqlite tracking store, model registry, pyfunc models
# and the tracking server with its UI). Run from the repository root on a machine WITH PyPI
# access; the air-gapped host then runs deploy/install_offline_bundle.sh PREFIX.
#
#   deploy/build_offline_bundle.sh                    # -> .bundle/ (36.2 MiB)
#   BUNDLE_OUT=/tmp/b TARGET_PY=3.11 deploy/build_offline_bundle.sh   # another image's Python
#
# Layout of the bundle:
#   ray-<ver>-cp312.tar.xz   the ray wheel unpacked and trimmed (see trim_ray), one xz stream
#   wheels-<group>.tar.xz    the other wheels, members re-stored uncompressed so that xz sees the
#                            text and compresses across wheels (~40% smaller than the wheels);
#                            the files inside each wheel are byte-identical to PyPI's
#   MANIFEST.txt             sha256 of every wheel as downloaded (deepspeed: as built)
#   BUNDLE_INFO, SIZES.txt   target Python and pins; the size table printed at the end
#   install_offline_bundle.sh  a copy, so the folder installs on its own
#
# Needs: python3 with pip, strip (binutils), xz, GNU tar. Takes about 2.5 minutes on 2 cores
# (most of it xz -9e). docs/cluster.md ("Air-gapped GPU hosts") tells what was verified. Versions are pinned: the ones the project's CPU venv resolves
# (tests/test_offline_bundle.py checks ray, deepspeed and mlflow against pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_VERSION=2.60.0
DEEPSPEED_VERSION=0.19.8
MLFLOW_VERSION=3.17.2

TARGET_PY=${TARGET_PY:-3.12}
OUT=${BUNDLE_OUT:-.bundle}
LIMIT_MIB=${BUNDLE_LIMIT_MIB:-40}
PY=${PY:-python3}
PYTAG=cp${TARGET_PY/./}

# Each group: the wheels one part of the user path needs beyond the image (packages the image
# already has are left out: numpy, pandas, pyarrow, aiohttp, grpcio, protobuf, requests, click,
# jinja2, werkzeug, prometheus-client, typing-extensions, ...). Found by removing packages one at
# a time and re-running `ray start` + `ray job submit`, the MLflow client path and the server;
# zipp, flask-cors and graphene stay although those checks pass without them (declared by
# importlib-metadata and mlflow; the UI calls /graphql).

# Shared by Ray, DeepSpeed and MLflow.
SHARED=(
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    # Ray's dashboard (metrics agent) and MLflow's tracing both import the SDK and the protos
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
    opentelemetry-semantic-conventions==0.66b2
)
# Ray core (jsonschema) and what the dashboard's optional_deps check imports (aiohttp-cors,
# opencensus, the Prometheus exporter); opencensus imports google.rpc (googleapis-common-protos)
# and six. Left out, optional for this path: py-spy (the dashboard's stack-trace and flame-graph
# buttons), virtualenv and smart_open (runtime_env pip/venv and remote working_dir URIs),
# colorful (CLI colours), tensorboardX (Tune's TensorBoard logger), google-api-core.
RAY_DEPS=(
    jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
    aiohttp-cors==0.8.1 opencensus==0.11.4 opencensus-context==0.1.3
    googleapis-common-protos==1.76.0 six==1.17.0 opentelemetry-exporter-prometheus==0.66b2
)
# DeepSpeed's wheel is built from its sdist below; einops, py-cpuinfo, ninja, msgpack, psutil
# and tqdm come with the torch image.
DEEPSPEED_DEPS=(hjson==3.1.0)
# MLflow client with a sqlite:/// store and the registry. The full `mlflow` wheel holds every
# file of mlflow-skinny and mlflow-tracing plus the server and its UI, so it replaces both
# (installed with --no-deps). The sqlalchemy model registry imports cryptography (Fernet, for
# webhook secrets) at import time, hence cryptography + cffi; databricks-sdk because
# mlflow.genai probes find_spec("databricks.agents"), which raises without a `databricks`
# package. GitPython is left out: runs then carry no git tags (pipeline.evaluation.registry falls back to
# `git rev-parse`), and mlflow logs a warning.
MLFLOW_DEPS=(
    mlflow==${MLFLOW_VERSION}
    sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1 cachetools==7.3.3
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7
    importlib-metadata==9.1.0 zipp==4.1.2 databricks-sdk==0.167.0
    cryptography==50.0.2 cffi==2.1.1
)
# `mlflow server` (uvicorn + the Flask app + GraphQL for the UI) and the `mlflow` CLI
# (python-dotenv). huey is left out: the wrapper sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false.
MLFLOW_SERVER=(
    uvicorn==0.55.0 python-dotenv==1.2.4 flask==3.1.3 flask-cors==6.0.5 itsdangerous==2.2.0
    blinker==1.9.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0
)

for tool in strip xz tar; do
    command -v "$tool" >/dev/null || { echo "build_offline_bundle: '$tool' not found" >&2; exit 1; }
done
"$PY" -m pip --version >/dev/null

# The output folder is replaced whole: refuse to empty a folder that is not an earlier bundle.
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && [ ! -f "$OUT/BUNDLE_INFO" ]; then
    echo "build_offline_bundle: $OUT exists and is not a bundle; not touching it" >&2; exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/offline-bundle.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

download() {  # download DIR SPEC...: binary wheels for the target image, no dependencies
    local dir=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$dir" \
        --python-version "$TARGET_PY" --implementation cp --abi "$PYTAG" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "$@"
}

xz_tar() {  # xz_tar ARCHIVE DIR ENTRY...: one xz stream, members in a fixed order
    tar -C "$2" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - "${@:3}" \
        | xz -9e -T1 > "$1"
}

echo "== ray $RAY_VERSION ($PYTAG)"
download "$WORK/ray-whl" "ray==$RAY_VERSION"
RAY_WHL=$(ls "$WORK"/ray-whl/ray-"$RAY_VERSION"-*.whl)
mkdir -p "$WORK/ray"
# zipfile drops the mode bits; gcs_server, raylet and the extension modules need theirs
"$PY" - "$RAY_WHL" "$WORK/ray" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    for info in whl.infolist():
        path = whl.extract(info, sys.argv[2])
        mode = info.external_attr >> 16
        if mode and not info.is_dir():
            os.chmod(path, mode & 0o755)
EOF

trim_ray() {  # what the user path does not load: Java jars, RLlib, Serve, LLM, source maps, symbols
    local root=$1/ray
    rm -rf "$root/jars" "$root/rllib" "$root/serve" "$root/llm"
    find "$root/dashboard" -name '*.js.map' -delete
    # --strip-unneeded keeps the dynamic symbols the interpreter and the loader use
    strip --strip-unneeded "$root/_raylet.so" "$root/core/src/ray/gcs/gcs_server" \
        "$root/core/src/ray/raylet/raylet"
    find "$root" -name '*.so' ! -name _raylet.so -exec strip --strip-unneeded {} +
}
trim_ray "$WORK/ray"
RAY_TAR=ray-$RAY_VERSION-$PYTAG.tar.xz
xz_tar "$OUT/$RAY_TAR" "$WORK/ray" ray "ray-$RAY_VERSION.dist-info"

echo "== deepspeed $DEEPSPEED_VERSION (built from its sdist: a pure-Python wheel)"
mkdir -p "$WORK/wheels/deepspeed"
"$PY" -m pip wheel -q --no-deps -w "$WORK/wheels/deepspeed" "deepspeed==$DEEPSPEED_VERSION"
ls "$WORK/wheels/deepspeed/deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl" >/dev/null
download "$WORK/wheels/deepspeed" "${DEEPSPEED_DEPS[@]}"

echo "== wheels"
download "$WORK/wheels/shared" "${SHARED[@]}"
download "$WORK/wheels/ray-deps" "${RAY_DEPS[@]}"
download "$WORK/wheels/mlflow" "${MLFLOW_DEPS[@]}"
download "$WORK/wheels/mlflow-server" "${MLFLOW_SERVER[@]}"

(cd "$WORK/ray-whl" && sha256sum ./*.whl | sed 's| \./| ray/|') > "$OUT/MANIFEST.txt"
WHEEL_GROUPS=(shared ray-deps deepspeed mlflow mlflow-server)
for group in "${WHEEL_GROUPS[@]}"; do
    (cd "$WORK/wheels/$group" && sha256sum ./*.whl | sed "s| \./| $group/|") >> "$OUT/MANIFEST.txt"
    mkdir -p "$WORK/stored/$group"
    # Re-store each wheel uncompressed (same members, same order, same bytes): pip installs it
    # as any wheel, and xz then compresses the whole group as one stream.
    "$PY" - "$WORK/wheels/$group" "$WORK/stored/$group" <<'EOF'
import pathlib, sys, zipfile
src, dst = map(pathlib.Path, sys.argv[1:])
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
EOF
    xz_tar "$OUT/wheels-$group.tar.xz" "$WORK/stored/$group" $(ls "$WORK/stored/$group")
done

cp deploy/install_offline_bundle.sh "$OUT/"
cat > "$OUT/BUNDLE_INFO" <<EOF
python=$TARGET_PY
ray=$RAY_VERSION
deepspeed=$DEEPSPEED_VERSION
mlflow=$MLFLOW_VERSION
ray_archive=$RAY_TAR
wheel_groups=${WHEEL_GROUPS[*]}
EOF

# Size table: on disk (what travels) and installed (what PREFIX/site holds), per component.
"$PY" - "$OUT" "$WORK" "$LIMIT_MIB" <<'EOF' | tee "$OUT/SIZES.txt"
import os, pathlib, sys, zipfile
out, work, limit = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
MiB = 1024 * 1024
info = dict(line.split("=", 1) for line in (out / "BUNDLE_INFO").read_text().split("\n") if line)
rows = []
tree = work / "ray"
installed = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
rows.append(("ray (trimmed tree)", info["ray_archive"], "ray " + info["ray"], installed))
for group in info["wheel_groups"].split():
    wheels = sorted((work / "wheels" / group).glob("*.whl"))
    installed = sum(i.file_size for w in wheels for i in zipfile.ZipFile(w).infolist())
    names = " ".join("%s %s" % tuple(w.name.split("-")[:2]) for w in wheels)
    rows.append((f"wheels: {group}", f"wheels-{group}.tar.xz", names, installed))
total_disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "SIZES.txt")
print(f"Offline bundle for Python {info['python']} (x86_64 manylinux): {out}")
print(f"{'component':<22} {'on disk MiB':>11} {'installed MiB':>13}  archive")
for name, archive, contents, inst in rows:
    disk = (out / archive).stat().st_size / MiB
    print(f"{name:<22} {disk:>11.2f} {inst / MiB:>13.1f}  {archive}")
other = total_disk - sum((out / r[1]).stat().st_size for r in rows)
print(f"{'other files':<22} {other / MiB:>11.2f} {'':>13}  BUNDLE_INFO, MANIFEST.txt, install script")
print(f"{'total':<22} {total_disk / MiB:>11.2f} {sum(r[3] for r in rows) / MiB:>13.1f}  (limit {limit:g} MiB on disk)")
print()
for name, archive, contents, inst in rows:
    print(f"{archive}: {contents}")
if total_disk / MiB > limit:
    sys.exit(f"bundle is {total_disk / MiB:.1f} MiB, over the {limit:g} MiB limit")
EOF
