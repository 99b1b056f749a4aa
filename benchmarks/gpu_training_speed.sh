#!/usr/bin/env bash
# The training-speed tables on one GPU with no package index, from the repo root, each part well
# inside a 10-minute window, results (tables and JSON) under OUT:
#   bash benchmarks/gpu_training_speed.sh OUT step       # train_step.py: the released code and ours at
#                                                        # 8 / 16 / 32 windows, same call
#   bash benchmarks/gpu_training_speed.sh OUT precision  # the precision table (bf16 + Flex, bf16, fp32;
#                                                        # training and inference) at 16 windows
#   bash benchmarks/gpu_training_speed.sh OUT loop   # train_loop.py: the real loop against the step and
#                                                    # against DeepSpeed's engine, same batch; data waits
#   bash benchmarks/gpu_training_speed.sh OUT tiles      # train_step.py: the compiled step without and with
#                                                    # FlexAttention's tuned tiles, and the released code,
#                                                    # one process, same batch; flex_tiles.py's rows for them
#   bash benchmarks/gpu_training_speed.sh OUT revisions  # train_step.py's compiled step of earlier commits
#                                                    # (.baseline/REV, made by benchmarks/baseline_revisions.sh)
#                                                    # and of this tree, one process each, same call, same batch
# "step" and "precision" need only torch (the released code runs from .reference/, made by benchmarks/released_timemoe.sh);
# "loop" needs DeepSpeed, from the offline bundle in .bundle/ (deploy/build_offline_bundle.sh).
# PRESETS (default "timemoe-50m timemoe-200m") and STEPS (default 6) narrow a run; LOOP_ARGS adds
# train_loop.py options (e.g. "--engine-variants zero1 zero1-check-overlap --profile-engine");
# "revisions" takes REVISIONS (folders, default .baseline/*/), WINDOWS (16), VARIANT (compiled),
# STEP_ARGS (more train_step.py options) and NO_RELEASED=1 to leave the released code's row out.
set -u
out=$1 part=$2
mkdir -p "$out"
presets=${PRESETS:-timemoe-50m timemoe-200m}
steps=${STEPS:-6}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
case "$part" in
step)
    # shellcheck disable=SC2086
    timeout 540 python3 benchmarks/train_step.py --presets $presets --windows 8 16 32 --variants released compiled \
        --reference-dir .reference --steps "$steps" --warmup 3 --out "$out/train_step_windows.json" 2>&1 \
        | grep -v -i warn | tee "$out/train_step_windows.txt" | tail -n 30
    ;;
precision)
    # fp32 last: where it does not fit, its out-of-memory error cannot take the bf16 rows with it
    # shellcheck disable=SC2086
    timeout 540 python3 benchmarks/train_step.py --presets $presets --windows 16 \
        --variants compiled compiled_sdpa compiled_fp32 --inference --steps "$steps" --warmup 3 \
        --out "$out/train_step_precision.json" 2>&1 | grep -v -i warn | tee "$out/train_step_precision.txt" | tail -n 14
    ;;
tiles)
    # shellcheck disable=SC2086
    timeout 420 python3 benchmarks/train_step.py --presets $presets --windows 16 \
        --variants compiled compiled_tiles released --reference-dir .reference --steps "$steps" --warmup 3 \
        --out "$out/train_step_tiles.json" 2>&1 | grep -v -i warn | tee "$out/train_step_tiles.txt" | tail -n 20
    # shellcheck disable=SC2086
    timeout 150 python3 benchmarks/flex_tiles.py --presets $presets --settings default rows-safe tuned \
        --budget-s 100 --json "$out/flex_tiles.json" 2>&1 | grep -v -i warn | tee "$out/flex_tiles.txt" | tail -n 12
    ;;
loop)
    bash deploy/install_offline_bundle.sh /tmp/timemoe-env .bundle > "$out/bundle.log" 2>&1 || { tail "$out/bundle.log"; exit 1; }
    . /tmp/timemoe-env/env.sh
    # shellcheck disable=SC2086
    timeout 540 python3 benchmarks/train_loop.py --presets $presets --windows 16 --steps 60 --skip 20 \
        ${LOOP_ARGS:-} --json "$out/train_loop.json" 2>&1 | grep -v -i -E "warn|^\[20" | tee "$out/train_loop.txt" | tail -n 60
    ;;
revisions)
    # every revision in its own process, in the order given (oldest first), then this tree; the
    # released code once at the end, as the reference row
    windows=${WINDOWS:-16}
    for dir in ${REVISIONS:-$(ls -d .baseline/*/ 2>/dev/null)} .; do
        name=$( [ "$dir" = . ] && echo working-tree || basename "$dir")
        echo "== $name"
        # shellcheck disable=SC2086
        (cd "$dir" && timeout "${REVISION_TIMEOUT:-200}" python3 benchmarks/train_step.py --presets $presets \
            --windows $windows --variants "${VARIANT:-compiled}" --steps "$steps" --warmup 3 ${STEP_ARGS:-} \
            --out "$out/train_step_rev_$name.json") 2>&1 | grep -v -i warn | tail -n 4
    done
    if [ -d .reference ] && [ -z "${NO_RELEASED:-}" ]; then
        # shellcheck disable=SC2086
        timeout 150 python3 benchmarks/train_step.py --presets $presets --windows $windows --variants released \
            --reference-dir .reference --steps "$steps" --warmup 3 --out "$out/train_step_rev_released.json" 2>&1 \
            | grep -v -i warn | tail -n 3
    fi
    python3 benchmarks/compare_revisions.py "$out"/train_step_rev_*.json --json "$out/revisions.json" | tee "$out/revisions.txt"
    ;;
*) echo "usage: $0 OUT step|precision|loop|revisions" >&2; exit 2 ;;
esac
