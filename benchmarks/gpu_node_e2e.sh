#!/usr/bin/env bash
# The users' whole path on one air-gapped GPU node, as the project runs it to produce the results
# it commits (benchmarks/results/gpu_node_e2e_*): install the offline bundle
# (deploy/build_offline_bundle.sh made it; no network needed), run the quickstart through
# `ray job submit` (deploy/gpu_node_quickstart.sh: Ray head, MLflow server, preprocess -> pretrain
# -> evaluate -> register, everything stopped at the end), then measure bf16 against fp32 on the
# trained checkpoint (benchmarks/precision_accuracy.py), and pack what came out into OUT.
#
#   bash benchmarks/gpu_node_e2e.sh --out DIR --data DIR [--bundle .bundle] [--stride 256]
#       [--budget-s 560] [--config configs/quickstart-gpu.yaml]
#       [--finetune "ETTh1 ETTm1" --finetune-eval-stride 16]
#
# --finetune: after the quickstart, `python -m jobs.finetune` fine-tunes its final model for one
# epoch on each named benchmark's train split (configs/finetune-gpu.yaml) and scores the parent
# and the fine-tuned model on the test split (every Nth window); one dataset after the other,
# each while the budget allows, the results merged into finetune.json and finetune.md. The
# precision check then runs only if time is left.
#
# --data DIR holds corpus/ (raw files for preprocessing) and benchmarks/ (ETTh1 ... weather).
# OUT receives at most 8 files: summary.json, eval_summary.json, precision.json, precision.txt,
# job_tail.log, e2e.log and results.tar.gz (job log, curation report, forecast plot, run summary,
# resolved config, ray status, nvidia-smi). The quickstart is stopped 90 s before --budget-s, so
# that whatever it produced is still packed; the precision check runs only while the remaining
# budget allows it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="" data="" bundle=".bundle" stride=256 budget=560 config="configs/quickstart-gpu.yaml" finetune="" ft_stride=16
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --data) data=$2; shift 2 ;;
        --bundle) bundle=$2; shift 2 ;;
        --stride) stride=$2; shift 2 ;;
        --budget-s) budget=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --finetune) finetune=$2; shift 2 ;;
        --finetune-eval-stride) ft_stride=$2; shift 2 ;;
        *) echo "gpu_node_e2e.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] && [ -n "$data" ] || { echo "usage: $0 --out DIR --data DIR [...]" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd) data=$(cd "$data" && pwd)
t0=$(date +%s)
log="$out/e2e.log"
say() { echo "[e2e $(( $(date +%s) - t0 ))s] $*" | tee -a "$log"; }

prefix=/tmp/timemoe-env
say "install offline bundle from $bundle into $prefix"
bash deploy/install_offline_bundle.sh "$prefix" "$bundle" >>"$log" 2>&1 || { say "bundle install failed"; tail -20 "$log"; exit 1; }
. "$prefix/env.sh"
python3 -c "import torch, ray, deepspeed, mlflow; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed',
    deepspeed.__version__, 'mlflow', mlflow.__version__, 'gpus', torch.cuda.device_count(),
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1 | tail -1 | tee -a "$log"

results=/tmp/gpu_node_results
rm -rf "$results"
say "quickstart through ray job submit ($config)"
timeout $(( budget - 90 )) bash deploy/gpu_node_quickstart.sh --results "$results" --config "$config" --input "$data/corpus" \
    --benchmarks "$data/benchmarks" --bundle "$prefix" 2>&1 | tail -n 60 >>"$log"
say "quickstart exit code ${PIPESTATUS[0]}"

model=$(ls -d "$results"/outputs/run-*/train/final_model 2>/dev/null | tail -n 1)
if [ -n "$finetune" ] && [ -n "$model" ]; then
    for ds in $finetune; do
        left=$(( budget - ($(date +%s) - t0) ))
        [ "$left" -gt 100 ] || { say "fine-tuning on $ds skipped (${left}s left)"; continue; }
        say "fine-tuning on $ds (eval stride $ft_stride, ${left}s left)"
        timeout $(( left - 20 )) python3 -m jobs.finetune --parent "$model" --benchmarks "$data/benchmarks" \
            --datasets "$ds" --config configs/finetune-gpu.yaml --eval-stride "$ft_stride" \
            --output-dir "$results/finetune/$ds" --register timemoe-quickstart-gpu-finetuned \
            --tracking-uri "sqlite:///$results/finetune/mlflow.db" 2>&1 | tail -n 25 >>"$log"
        say "fine-tuning on $ds exit code ${PIPESTATUS[0]}"
    done
    python3 - "$results/finetune" "$out" <<'PY'
import json, sys
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
summaries = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/run-*/summary.json"))}
tables = [f"## {p.parent.parent.name}\n\n{p.read_text()}" for p in sorted(root.glob("*/run-*/table.md"))]
(out / "finetune.json").write_text(json.dumps(summaries, indent=2))
(out / "finetune.md").write_text("\n\n".join(tables) or "no fine-tuning finished\n")
PY
fi
left=$(( budget - ($(date +%s) - t0) ))
if [ -n "$model" ] && [ "$left" -gt 60 ]; then
    say "precision check (stride $stride, ${left}s left)"
    timeout $(( left - 15 )) python3 benchmarks/precision_accuracy.py --model "$model" --benchmarks "$data/benchmarks" \
        --stride "$stride" --json "$out/precision.json" 2>&1 | grep -v -i "warn" | tee "$out/precision.txt" | tail -n 30
else
    say "precision check skipped (model: ${model:-none}, ${left}s left)"
fi

for f in summary.json eval_summary.json job_tail.log; do cp "$results/$f" "$out/" 2>/dev/null; done
run=$(ls -d "$results"/outputs/run-* 2>/dev/null | tail -n 1)
( cd "$results" && tar czf "$out/results.tar.gz" job.log ray_status.txt nvidia_smi.txt \
    ${run:+$(cd "$results" && ls -d outputs/run-*/summary.json outputs/run-*/resolved_config.yaml \
        outputs/run-*/packed/report.html outputs/run-*/packed/*.png outputs/run-*/eval 2>/dev/null)} 2>/dev/null )
say "done; files in $out: $(ls "$out" | tr '\n' ' ')"
