# Sourced by benchmarks/prepare_sweep_data.sh and prepare_families_data.sh: the sweeps' one packing
# recipe, so that every sweep's records come from data packed the same way (1024-point windows,
# 6% of the series to val/, the contamination guard against the ETTh1/ETTh2 test splits):
#   pack_sweep_corpus PY SHARED OUT_ROOT NAME EXTRA_YAML INPUT...
# writes OUT_ROOT/NAME (packed) and OUT_ROOT/benchmarks (ETTh1/ETTh2 CSVs); EXTRA_YAML is appended
# to the preprocessing config (e.g. a provenance block), or "".
pack_sweep_corpus() {
    local py=$1 shared=$2 root=$3 name=$4 extra=$5
    shift 5
    local cfg
    cfg=$(mktemp --suffix .yaml)
    cat > "$cfg" <<YAML
seed: 0
pack: {window_length: 1024, val_fraction: 0.06}
contamination:
  benchmarks: [$shared/benchmarks/ETTh1.csv.gz, $shared/benchmarks/ETTh2.csv.gz]
$extra
YAML
    local inputs=()
    for i in "$@"; do inputs+=(--input "$i"); done
    echo "== python -m jobs.preprocess ($*) -> $root/$name"
    RAY_USAGE_STATS_ENABLED=0 "$py" -m jobs.preprocess --config "$cfg" "${inputs[@]}" --output "$root/$name" 2>&1 \
        | grep -v -E "INFO|WARNING|^\s*$" | tail -3
    rm -f "$cfg"
    mkdir -p "$root/benchmarks"
    for b in ETTh1 ETTh2; do cp "$shared/benchmarks/$b.csv.gz" "$root/benchmarks/"; done
}
