#!/usr/bin/env bash
# Trials of the sparse-vs-dense families study (configs/sweep-families-1gpu.yaml) on one GPU host with
# no package index, from the repo root, inside one call of at most BUDGET_S seconds:
#   [LANES=2] bash benchmarks/gpu_families_shards.sh OUT "0 8 16" [BUDGET_S]
# installs the offline bundle (.bundle/), writes the study's data (benchmarks/prepare_families_data.sh,
# the same 1.2e8-point mixture every call, SHARED=.data), then trains the listed shards K of the plan's
# 24 (python -m jobs.sweep --plan lists them: 0-7 dense, 8-15 sparse, 16-23 sparse_per_layer; within a
# family s3 before s4, 3.6e7 before 1e8, seed 0 before seed 1) in the order given while the budget
# lasts: LANES=N processes share the GPU and each takes the next shard nobody has taken in this call.
# Each finished trial appends its record to OUT/records-K.jsonl, and a shard with a record is not
# run again; a trial cut short writes nothing, and a later call on the same (warm) machine with the
# same OUT resumes it from its newest checkpoint (every CHECKPOINT_EVERY=500 steps, and the step it was
# in when the budget's SIGTERM came, if that was during training), a fresh machine trains it again.
# Copy the records to benchmarks/results/sweep-families-1gpu/ afterwards.
set -u
out=$1 shards=$2 budget=${3:-585}
t0=$(date +%s)
mkdir -p "$out"
# the host's cores and threads, beside the KernelSynth timing it explains
{ nproc; lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket)"; } > "$out/host_cpu.txt"
left() { echo $(( budget - ($(date +%s) - t0) )); }
# how busy and how full the card is while the lanes share it (memory decides how many lanes fit)
monitor=""
if command -v nvidia-smi > /dev/null; then
    (while sleep 30; do  # all of it into the file: nothing holds the caller's pipe open
        echo "$(( $(date +%s) - t0 )) s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total \
            --format=csv,noheader 2>&1 | head -n 1)"
    done) >> "$out/gpu_use.txt" 2>&1 &
    monitor=$!
    trap 'kill $monitor 2> /dev/null' EXIT
fi
# KernelSynth needs only numpy and pyarrow (in a torch image): it runs while the bundle installs;
# if it fails there, prepare_families_data.sh makes it again after the install
(KERNELSYNTH_ONLY=1 SHARED=.data PY=python3 WORKERS=$(nproc) bash benchmarks/prepare_families_data.sh \
    > "$out/kernelsynth.log" 2>&1) &
synth=$!
bash deploy/install_offline_bundle.sh /tmp/timemoe-env .bundle > "$out/bundle.log" 2>&1 || { tail "$out/bundle.log"; exit 1; }
. /tmp/timemoe-env/env.sh
ready=""
wait $synth && ready=1
KERNELSYNTH_READY=$ready SHARED=.data PY=python3 WORKERS=$(nproc) \
    bash benchmarks/prepare_families_data.sh > "$out/data.log" 2>&1 || { tail -n 20 "$out/data.log"; exit 1; }
echo "[families] data ready after $(( $(date +%s) - t0 )) s: $(grep -m1 'points in' "$out/data.log")"
claims="$out/claims-$t0"  # this call's: a cut-short shard is taken again by the next call
mkdir -p "$claims"
run_lane() {  # the next shard of the list that has no record and no taker yet, until none is left
    for k in "$@"; do
        [ -s "$out/records-$k.jsonl" ] && continue
        mkdir "$claims/$k" 2>/dev/null || continue  # atomic: one lane per shard
        l=$(left)
        [ "$l" -gt 90 ] || { echo "[families] shard $k not started (${l}s left)"; continue; }
        echo "[families] shard $k/24 (${l}s left)"
        timeout -k 30 $(( l - 10 )) python3 -m jobs.sweep --config configs/sweep-families-1gpu.yaml \
            --offline-records "$out/records-$k.jsonl" --shard "$k/24" --trials-per-gpu "$lanes" \
            --checkpoint-every "${CHECKPOINT_EVERY:-500}" \
            > "$out/shard-$k.log" 2>&1
        echo "[families] shard $k exit code $? after $(( $(date +%s) - t0 )) s"
        grep -v -i -E "warn|^\[20" "$out/shard-$k.log" | grep -E "^\[|FAILED|Error" | tail -n 6
    done
}
# LANES=N trains N trials at once on the one GPU: the small trials leave most of the GPU idle
# between kernels, so lanes raise the trials per call; a record's throughput is then the shared
# GPU's, its losses are unaffected
read -r -a list <<< "$shards"
pending=0
for k in "${list[@]}"; do [ -s "$out/records-$k.jsonl" ] || pending=$(( pending + 1 )); done
lanes=${LANES:-1}
[ "$lanes" -le "$pending" ] || lanes=$pending  # the records state how many trials shared the GPU
lane_pids=()
for (( lane = 0; lane < lanes; lane++ )); do
    run_lane "${list[@]}" &
    lane_pids+=($!)
done
[ "${#lane_pids[@]}" -eq 0 ] || wait "${lane_pids[@]}"  # the lanes, not the monitor
