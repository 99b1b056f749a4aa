#!/usr/bin/env bash
# Earlier commits' model code beside this tree, so that one GPU call can time them all:
#   [BASELINE_DIR=.baseline] bash benchmarks/baseline_revisions.sh REV [REV ...]
# replaces BASELINE_DIR (ignored; carry it to the GPU host) with one folder NN-REV per commit, in
# the order given, holding what benchmarks/train_step.py imports.
# benchmarks/gpu_training_speed.sh OUT revisions then times them and this tree in one call.
set -eu
base=${BASELINE_DIR:-.baseline}
rm -rf "$base"
i=0
for rev in "$@"; do
    i=$(( i + 1 ))
    dir=$base/$(printf %02d "$i")-$(git rev-parse --short "$rev")
    mkdir -p "$dir"
    git archive "$rev" model benchmarks/train_step.py benchmarks/released_code.py | tar -x -C "$dir"
    echo "$dir"
done
