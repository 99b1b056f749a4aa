#!/usr/bin/env bash
# The training-speed benchmark plans on one multi-GPU host with no package index (an air-gapped
# node whose image has torch), from the repo root, results under $OUT:
#   bash benchmarks/gpu_host_runs.sh BUDGET_S PLAN [PLAN ...]
# EP_LAYER="timemoe-200m:16 timemoe-ultra:4" first runs benchmarks/ep_layer.py on every GPU
# (one MoE layer, ep = 1 vs 2/4/8, balanced vs collapsed routing) into $OUT/ep_layer.json;
# EP_LAYER_ARGS passes more options to it (e.g. "--regimes balanced --iters 30 --gpu-work").
# Installs the wheels carried in .whl/ (deepspeed and what the image lacks; benchmarks/gpu_wheels.sh makes them),
# writes synthetic packed 4096-point shards, runs benchmarks/train_distributed.py plans, and leaves
# the JSON and the tails of every run's log in $OUT.
set -u
budget=$1; shift
OUT=${OUT:-/tmp/gpu_host_runs}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())" || exit 1
if [ -n "${EP_LAYER:-}" ]; then
    # shellcheck disable=SC2086
    timeout 300 python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" benchmarks/ep_layer.py \
        --presets $EP_LAYER ${EP_LAYER_ARGS:-} --out "$OUT/ep_layer.json" 2>&1 | grep -v -i warn | tee "$OUT/ep_layer.txt"
fi
[ "$#" -gt 0 ] || exit 0
python3 benchmarks/train_distributed.py data --out /tmp/packed4k --rows 512 || exit 1
python3 benchmarks/train_distributed.py run --data /tmp/packed4k --plan "$@" --out /tmp/td \
    --json "$OUT/train_distributed.json" --budget "$budget"
for f in /tmp/td/runs/*/log.txt; do
    echo "===== $f"; grep -v -i -E "warning|warn\(" "$f" | grep -m 1 -A 30 "Traceback"; grep "\[train\]" "$f" | tail -3
done > "$OUT/run_logs.txt" 2>&1
tar czf "$OUT/run_logs.tar.gz" /tmp/td/runs/*/log.txt 2>/dev/null
