#!/usr/bin/env bash
# Install the offline bundle (deploy/build_offline_bundle.sh) on a host with no package index:
# unpack the trimmed ray tree and install the bundled wheels into PREFIX/site, write the console
# entry points that unpacking does not create (PREFIX/bin/ray, PREFIX/bin/mlflow) and
# PREFIX/env.sh. Needs only the image's python3 (with pip); no network.
#
#   deploy/install_offline_bundle.sh PREFIX [BUNDLE_DIR]     # BUNDLE_DIR: default .bundle/
#   source PREFIX/env.sh                                      # PYTHONPATH and PATH
#
# Idempotent: a second run with the same bundle leaves PREFIX/site as it is (FORCE=1 reinstalls)
# and rewrites bin/ and env.sh. PYTHON=... picks another interpreter than the first python3.
set -euo pipefail

usage() { echo "usage: $0 PREFIX [BUNDLE_DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -eq 2 ]; then bundle=$2
elif [ -f "$here/BUNDLE_INFO" ]; then bundle=$here          # the copy inside the bundle
else bundle=$here/../.bundle; fi
[ -f "$bundle/BUNDLE_INFO" ] || { echo "no bundle at $bundle (BUNDLE_INFO missing)" >&2; exit 1; }
bundle=$(cd "$bundle" && pwd)
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

# The interpreter the wrappers will run: the image's python, by absolute path.
py=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
want=$(sed -n 's/^python=//p' "$bundle/BUNDLE_INFO")
have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "the bundle is built for Python $want, $py is $have (rebuild with TARGET_PY=$have)" >&2
    exit 1
fi

# One stamp for the bundle's contents: the archives' checksums.
stamp=$(cd "$bundle" && cat BUNDLE_INFO && sha256sum ./*.tar.xz)
site=$prefix/site
if [ -f "$site/.offline-bundle" ] && [ "$(cat "$site/.offline-bundle")" = "$stamp" ] \
        && [ "${FORCE:-0}" != 1 ]; then
    echo "PREFIX/site already holds this bundle: $site"
else
    if [ -e "$site" ] && [ ! -f "$site/.offline-bundle" ] && [ -n "$(ls -A "$site")" ]; then
        echo "$site exists and was not written by this script; not replacing it" >&2; exit 1
    fi
    tmp=$(mktemp -d "$prefix/.install.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/site" "$tmp/wheels"
    # Python's tarfile rather than tar -J: the host may lack xz; the "data" filter keeps the
    # executable bits of gcs_server and raylet and refuses links or paths leaving the folder.
    "$py" - "$bundle" "$tmp" <<'EOF'
import pathlib, sys, tarfile
bundle, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
info = dict(l.split("=", 1) for l in (bundle / "BUNDLE_INFO").read_text().splitlines() if l)
jobs = [(bundle / info["ray_archive"], tmp / "site")]
jobs += [(bundle / f"wheels-{g}.tar.xz", tmp / "wheels") for g in info["wheel_groups"].split()]
for archive, dest in jobs:
    with tarfile.open(archive, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
EOF
    "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$tmp/site" "$tmp"/wheels/*.whl
    printf '%s\n' "$stamp" > "$tmp/site/.offline-bundle"
    rm -rf "$site"
    mv "$tmp/site" "$site"
    echo "installed into $site"
fi

# Console entry points: read from the packages' own entry_points.txt. Each wrapper also puts
# PREFIX/site on PYTHONPATH, so the processes `ray start` spawns (raylet, workers, job drivers)
# import the same packages even when env.sh was not sourced.
mkdir -p "$prefix/bin"
"$py" - "$site" "$prefix/bin" "$py" <<'EOF'
import configparser, pathlib, sys
site, bindir, python = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
WRAPPERS = {"ray": "ray", "mlflow": "mlflow"}  # script name -> distribution
EXTRA = {  # environment defaults a wrapper sets (setdefault: the caller's value wins)
    # huey, which runs the server's job workers, is not in the bundle
    "mlflow": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
}
for script, dist in WRAPPERS.items():
    found = sorted(site.glob(f"{dist}-*.dist-info/entry_points.txt"))
    if not found:
        continue
    eps = configparser.ConfigParser(delimiters=("=",))
    eps.optionxform = str
    eps.read(found[0])
    module, _, attr = eps["console_scripts"][script].strip().partition(":")
    env = "".join(f"os.environ.setdefault({k!r}, {v!r})\n" for k, v in EXTRA.get(script, {}).items())
    text = f"""#!{python}
# {script}: console entry point for the offline bundle in {site} (install_offline_bundle.sh)
import os
import sys
SITE = {str(site)!r}
if SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
if SITE not in sys.path:
    sys.path.insert(0, SITE)
{env}from {module} import {attr.strip()}
sys.exit({attr.strip()}())
"""
    path = bindir / script
    path.write_text(text)
    path.chmod(0o755)
    print(f"wrote {path} -> {module}:{attr.strip()}")
EOF

cat > "$prefix/env.sh" <<EOF
# source this file: the offline bundle in $site on top of the image's Python ($py)
case ":\${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site\${PYTHONPATH:+:\$PYTHONPATH}" ;; esac
case ":\$PATH:" in *":$prefix/bin:"*) ;; *) export PATH="$prefix/bin:\$PATH" ;; esac
EOF

# What the bundle expects the image to provide; a missing one is a warning, not a failure.
PYTHONPATH=$site "$py" - <<'EOF' || true
import importlib.util
need = ["torch", "numpy", "pandas", "pyarrow", "aiohttp", "grpc", "google.protobuf", "yaml",
        "requests", "psutil", "click", "msgpack", "packaging", "jinja2", "werkzeug",
        "prometheus_client", "typing_extensions", "filelock", "fsspec", "cloudpickle", "tqdm",
        "einops", "cpuinfo", "safetensors", "matplotlib", "scipy"]
def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a dotted name whose parent package is absent
        return False
missing = [m for m in need if not present(m)]
if missing:
    print("warning: the image lacks", ", ".join(missing), "(the bundle expects them there)")
EOF

echo
echo "# add the bundle to this shell (also in $prefix/env.sh):"
echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
echo "export PATH=$prefix/bin:\$PATH"
