#!/usr/bin/env bash
# The users' whole path on one GPU node, offline: start a Ray head that owns the node's GPUs
# (dashboard and job server on 127.0.0.1), start an MLflow tracking server on 127.0.0.1 (or use a
# sqlite store where the server's packages are not installed), submit jobs.pipeline
# (preprocess -> pretrain -> evaluate -> register) with `ray job submit`, collect what it
# produced, and stop everything it started.
#
#   bash deploy/gpu_node_quickstart.sh --results DIR [--input CORPUS] [--benchmarks DIR]
#       [--config configs/quickstart-gpu.yaml] [--gpus N] [--bundle PREFIX] [--address http://HEAD:8265]
#       [-- extra jobs.pipeline arguments]
#
# --bundle PREFIX   source PREFIX/env.sh first (deploy/install_offline_bundle.sh made it)
# --address URL     submit to a running Ray cluster instead of starting (and stopping) a head here
# Paths must be absolute or relative to the repository root; the job runs in a copy of the
# repository that `ray job submit --working-dir .` uploads (git-ignored files are not uploaded).
# DIR receives: summary.json (stage times, training speed, protocol table, registry outcome),
# eval_summary.json, job.log, job_tail.log, ray_status.txt, nvidia_smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

results="" input="" bench="" config="configs/quickstart-gpu.yaml" gpus="" bundle="" address="" extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --results) results=$2; shift 2 ;;
        --input) input=$2; shift 2 ;;
        --benchmarks) bench=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --gpus) gpus=$2; shift 2 ;;
        --bundle) bundle=$2; shift 2 ;;
        --address) address=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "gpu_node_quickstart.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$results" ] || { echo "gpu_node_quickstart.sh: --results DIR is required" >&2; exit 2; }
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
results=$(abspath "$results"); mkdir -p "$results"
[ -n "$bundle" ] && { . "$(abspath "$bundle")/env.sh" || exit 1; }
[ -n "$gpus" ] || gpus=$(nvidia-smi -L 2>/dev/null | wc -l)

# Ray: no usage reporting from an offline node; no token auth on a loopback-only head (a token
# left in ~/.ray by an earlier ray.init would otherwise make `ray job submit` fail).
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
# NVLink multicast stays off: a program using it can take the node's GPUs out of service.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
work=$(mktemp -d /tmp/timemoe-gpu-node.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
t_start=$(date +%s)
mlflow_pid="" started_head=0
cleanup() {
    [ -n "$mlflow_pid" ] && kill "$mlflow_pid" 2>/dev/null
    if [ "$started_head" = 1 ]; then
        # only the processes of the head started here (`ray stop` would stop every Ray instance
        # on the node); they all carry the private temp dir on their command lines
        pkill -TERM -f "$work/ray" 2>/dev/null; sleep 3; pkill -KILL -f "$work/ray" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$address" ]; then
    dash=$(free_port); gcs=$(free_port)
    echo "[gpu-node] ray start --head --num-gpus $gpus (dashboard 127.0.0.1:$dash)"
    t0=$(date +%s.%N)
    ray start --head --num-gpus "$gpus" --port "$gcs" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
        --temp-dir "$work/ray" --disable-usage-stats >"$work/ray_start.log" 2>&1 \
        || { cat "$work/ray_start.log"; exit 1; }
    address="http://127.0.0.1:$dash" started_head=1
    ray_start_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
else
    ray_start_s=0
fi
for _ in $(seq 60); do curl -sf "$address/api/version" >/dev/null 2>&1 && break; sleep 1; done

# MLflow: a tracking server on loopback when its packages are here, else a sqlite store in the
# results folder; the pipeline's registry code is the same for both.
store="$results/mlflow"
mkdir -p "$store"
if python3 -c "import mlflow.server, flask" >/dev/null 2>&1 || python3 -c "import mlflow.server, fastapi, uvicorn" >/dev/null 2>&1; then
    mport=$(free_port)
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false python3 -m mlflow server --backend-store-uri "sqlite:///$store/mlflow.db" \
        --artifacts-destination "$store/artifacts" --host 127.0.0.1 --port "$mport" >"$work/mlflow.log" 2>&1 &
    mlflow_pid=$!
    for _ in $(seq 60); do curl -sf "http://127.0.0.1:$mport/health" >/dev/null 2>&1 && break; sleep 1; done
    tracking="http://127.0.0.1:$mport"; tracking_kind="mlflow server (sqlite backend) on 127.0.0.1"
else
    tracking="sqlite:///$store/mlflow.db"; tracking_kind="sqlite store (no MLflow server packages on this node)"
fi
echo "[gpu-node] tracking: $tracking ($tracking_kind)"

args=(--config "$config" --output-dir "$results/outputs")
[ -n "$input" ] && args+=(--input "$(abspath "$input")")
[ -n "$bench" ] && args+=(--benchmarks "$(abspath "$bench")")
env_json=$(python3 -c 'import json, os, sys; print(json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": sys.argv[1],
    **{k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                                  "RAY_USAGE_STATS_ENABLED") if k in os.environ}}}))' "$tracking")
echo "[gpu-node] ray job submit --address $address --working-dir . -- python3 -m jobs.pipeline ${args[*]} ${extra[*]}"
t0=$(date +%s.%N)
ray job submit --address "$address" --working-dir . --runtime-env-json "$env_json" \
    -- python3 -m jobs.pipeline "${args[@]}" "${extra[@]}" 2>&1 | tee "$results/job.log"
rc=${PIPESTATUS[0]}
job_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
if [ "$started_head" = 1 ]; then ray status --address "127.0.0.1:$gcs" >"$results/ray_status.txt" 2>&1; fi
nvidia-smi >"$results/nvidia_smi.txt" 2>&1
tail -n 80 "$results/job.log" >"$results/job_tail.log"

run=$(ls -d "$results"/outputs/run-* 2>/dev/null | tail -n 1)
python3 - "$run" "$results" "$rc" "$ray_start_s" "$job_s" "$t_start" "$tracking_kind" "$gpus" <<'PY'
import json, sys, time
from pathlib import Path
run, results, rc, ray_s, job_s, t_start, tracking_kind, gpus = sys.argv[1:]
out = {"job_exit_code": int(rc), "ray_start_s": float(ray_s), "job_submit_to_end_s": float(job_s),
       "total_s": round(time.time() - float(t_start), 1), "tracking": tracking_kind, "gpus": int(gpus or 0)}
if run and (Path(run) / "summary.json").exists():
    out["pipeline"] = json.loads((Path(run) / "summary.json").read_text())
    ev = Path(run) / "eval" / "summary.json"
    if ev.exists():
        (Path(results) / "eval_summary.json").write_text(ev.read_text())
(Path(results) / "summary.json").write_text(json.dumps(out, indent=2))
print(json.dumps({k: v for k, v in out.items() if k != "pipeline"}, indent=2))
PY
echo "[gpu-node] job exit code $rc; results in $results"
exit "$rc"
