#!/usr/bin/env bash
# The data configs/sweep-families-1gpu.yaml reads, written ON THE GPU HOST (1.2e8 float32 points are
# ~480 MB: too big to carry, cheap to make there; needs numpy + Ray Data, e.g. the offline bundle):
#   .gpudata/families-1024  packed 1024-point windows (train/ + val/ + manifest + report) from the REAL
#                           preprocessing job over: $SYNTH_POINTS KernelSynth points
#                           (python -m preprocessing.kernelsynth, seed 0, 1024-point series), the
#                           embedded corpus (preprocessing.synthetic, scale $SCALE) and the shared real
#                           corpus; 6% of the series to val/; contamination guard against ETTh1/ETTh2;
#                           report.json's provenance block states the mixture (real vs each generator)
#   .gpudata/benchmarks     ETTh1 / ETTh2 CSVs for the zero-shot subset
# The 1e8-point trials read 97,664 rows of 1,025 points; 1.2e8 KernelSynth points give ~110k training
# rows after the val/ split, so no training row repeats (tests/test_scaling_offline.py checks the sums).
# Usage: bash benchmarks/prepare_families_data.sh   (SYNTH_POINTS=1.2e8 WORKERS=16 SCALE=8 SHARED=../shared/data)
# KERNELSYNTH_ONLY=1 writes $RAW/kernelsynth and stops (it needs only numpy and pyarrow); a later
# run with KERNELSYNTH_READY=1 uses it instead of making it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SYNTH_POINTS=${SYNTH_POINTS:-1.2e8}
WORKERS=${WORKERS:-$(nproc)}
SCALE=${SCALE:-8}
SHARED=$(cd "${SHARED:-../shared/data}" && pwd)
OUT=.gpudata
RAW=${RAW:-$OUT/families-raw}

# the recipe of the data: a machine that still holds data of the same recipe (a warm GPU host
# between calls) keeps it instead of making the same 1.2e8 points again
recipe="synth=$SYNTH_POINTS seed=0 scale=$SCALE shared=$(ls "$SHARED/corpus" | tr '\n' ' ') script=$(cat "$0" benchmarks/pack_sweep_corpus.sh preprocessing/kernelsynth.py | sha256sum | cut -c1-16)"
make_data() {
    rm -rf "$OUT/families-1024" "$RAW/embedded"
    if [ -n "${KERNELSYNTH_READY:-}" ] && [ -f "$RAW/kernelsynth/kernelsynth.json" ]; then
        # a KERNELSYNTH_ONLY=1 run made it (gpu_families_shards.sh, while the bundle installs)
        echo "== KernelSynth: $RAW/kernelsynth made beforehand: $(cat "$RAW/kernelsynth/kernelsynth.json")"
    else
        rm -rf "$RAW"
        mkdir -p "$RAW"
        echo "== KernelSynth, $SYNTH_POINTS points, $WORKERS processes -> $RAW/kernelsynth"
        OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 "$PY" -m preprocessing.kernelsynth "$RAW/kernelsynth" \
            --points "$SYNTH_POINTS" --seed 0 --workers "$WORKERS"
    fi
    [ -z "${KERNELSYNTH_ONLY:-}" ] || exit 0
    mkdir -p "$OUT/benchmarks"

    echo "== embedded corpus, scale $SCALE -> $RAW/embedded"
    "$PY" -m preprocessing.synthetic "$RAW/embedded" "$SCALE" | grep -E '^ "(series|points|seconds)"'

    # provenance: the embedded corpus's datasets (preprocessing/synthetic.py DEFAULT_RECIPES) and the
    # KernelSynth folders are generated; everything else (the shared corpus) is real.
    . benchmarks/pack_sweep_corpus.sh
    pack_sweep_corpus "$PY" "$SHARED" "$OUT" families-1024 'provenance:
  "synthetic/kernelsynth_gp-*": synthetic/kernelsynth
  "synthetic/kernelsynth": synthetic/embedded
  "*/synth_*": synthetic/embedded' "$RAW/kernelsynth/corpus" "$RAW/embedded" "$SHARED/corpus"
    cp "$RAW/kernelsynth/kernelsynth.json" "$OUT/families-1024/"
    rm -rf "$RAW"
    echo "$recipe" > "$OUT/families-1024/RECIPE"
}
if [ -f "$OUT/families-1024/RECIPE" ] && [ "$(cat "$OUT/families-1024/RECIPE")" = "$recipe" ]; then
    echo "== $OUT/families-1024 already holds this recipe: kept"
    [ -z "${KERNELSYNTH_ONLY:-}" ] || exit 0
else
    make_data
fi

"$PY" - "$OUT/families-1024" <<'PYEOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
r = json.loads((root / "report.json").read_text())
rows = json.loads((root / "manifest.json").read_text())["rows"]
print(f"points in {r['points_in']:,}, kept {r['points_kept']:,} (val {r['points_val']:,}); rows {rows}")
for kind, c in r["provenance"].items():
    print(f"  {kind:<24} kept {c['points_kept']:>13,}  train {c['points_kept'] - c['points_val']:>13,}")
need = 97_664  # rows of the 1e8-point trials (3,052 steps x 32)
if rows["train"] < need:
    sys.exit(f"ERROR: {rows['train']:,} training rows < {need:,}: the 1e8-point trials would repeat data")
PYEOF
du -sh "$OUT"/*
