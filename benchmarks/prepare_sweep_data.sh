#!/usr/bin/env bash
# The data configs/sweep-8gpu-offline.yaml reads, written under .gpudata/ (ignored by git; copy it
# to the GPU host together with the repository; kept under 64 MiB so that it travels with it):
#   .gpudata/sweep-1024   packed 1024-point windows (train/ + val/ + manifest + report) from the
#                         REAL preprocessing job (python -m jobs.preprocess, Ray Data) over the
#                         embedded synthetic corpus (preprocessing.synthetic, scale $SCALE) PLUS
#                         the shared corpus; 6% of the series held out to val/ (held-out loss);
#                         the contamination guard drops training series overlapping the ETTh1/ETTh2
#                         test splits
#   .gpudata/benchmarks   ETTh1 / ETTh2 CSVs for the zero-shot subset
# Usage, from anywhere:  bash benchmarks/prepare_sweep_data.sh   (SCALE=8 SHARED=/work/shared/data)
# Fails if .gpudata ends up at 45 MiB or more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SCALE=${SCALE:-8}
SHARED=$(cd "${SHARED:-../shared/data}" && pwd)
OUT=.gpudata
LIMIT_MIB=45

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$OUT/sweep-1024" "$OUT/benchmarks"

echo "== embedded synthetic corpus, scale $SCALE -> $tmp/synthetic"
"$PY" -m preprocessing.synthetic "$tmp/synthetic" "$SCALE" | grep -E '^ "(series|points|seconds)"'

. benchmarks/pack_sweep_corpus.sh
pack_sweep_corpus "$PY" "$SHARED" "$OUT" sweep-1024 "" "$tmp/synthetic" "$SHARED/corpus"

"$PY" - "$OUT/sweep-1024" <<'PYEOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
r = json.loads((root / "report.json").read_text())
m = json.loads((root / "manifest.json").read_text())
rows = m["rows"]
print(f"points in {r['points_in']:,}, kept {r['points_kept']:,} (val {r['points_val']:,}); "
      f"rows {rows} of 1025 points; packing efficiency {r['packing_efficiency']}")
PYEOF
du -sh "$OUT"/*; du -sh "$OUT"
size_kib=$(du -sk "$OUT" | cut -f1)
if [ "$size_kib" -ge $((LIMIT_MIB * 1024)) ]; then
    echo "ERROR: $OUT is $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB limit: lower SCALE" >&2
    exit 1
fi
