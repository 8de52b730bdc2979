#!/usr/bin/env bash
# The README's CPU pipeline (README "Quick start"): train → evaluate → flatness → plots on an ImageFolder copy of
# CIFAR-10, small enough for a laptop: AT and AT-AWP (ResNet-18 of width 16, 4,000 training images, 2 epochs),
# PGD-20 × 2 and AutoAttack on 200 test images, both flatness measures on 200 images with few draws, then every
# figure and Table 1. Its time on 2 CPU cores is in the README. The numbers mean little at this size (2 epochs);
# the pipeline is the paper's.
#
# Usage: bash scripts/quickstart_cpu.sh DATA_DIR [OUT_DIR]      (OUT_DIR default: runs_quick)
# DATA_DIR: an ImageFolder tree with train/<class>/* and test/<class>/* (e.g. ../shared/data/cifar10-jpeg).
# DRY_RUN=1 prints the commands instead of running them. The sizes below can be set from the environment (the
# test suite runs the pipeline on a tiny tree that way).
set -euo pipefail
DATA=${1:?usage: bash scripts/quickstart_cpu.sh DATA_DIR [OUT_DIR]  (DATA_DIR: ImageFolder tree with train/ and test/)}
OUT=${2:-runs_quick}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WIDTH=${WIDTH:-16} SUBSET=${SUBSET:-4000} EPOCHS=${EPOCHS:-2} N_LOG=${N_LOG:-200} N_ES=${N_ES:-100}
N_EVAL=${N_EVAL:-200} N_CLEAN=${N_CLEAN:-1000} BATCH=${BATCH:-128}
EVAL_FLAGS=${EVAL_FLAGS:-}  # more evaluate.py flags (the test suite: --no-autoattack)
if [ -z "${DRY_RUN:-}" ] && ! { [ -d "$DATA/train" ] && [ -d "$DATA/test" ]; }; then
    echo "error: $DATA has no train/ and test/ folders; pass an ImageFolder tree of CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)" >&2
    exit 1
fi
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$*"; else echo "+ $*" >&2; "$@"; fi; }
start=$SECONDS

for method in at awp; do
    run python "$HERE/train_$method.py" --data-dir "$DATA" --width "$WIDTH" --train-subset "$SUBSET" --epochs "$EPOCHS" \
        --batch-size "$BATCH" --n-log "$N_LOG" --n-early-stop "$N_ES" --out "$OUT/$method"
    run python "$HERE/evaluate.py" "$OUT/$method/ckpt_last.pt" --n-eval "$N_EVAL" --n-clean "$N_CLEAN" --restarts 2 $EVAL_FLAGS
    run python "$HERE/flatness.py" "$OUT/$method/ckpt_last.pt" --mode both --n-eval "$N_EVAL" --samples 3 \
        --restarts 2 --ref-restarts 2
done
run python "$HERE/plots.py" "$OUT" --out "$OUT/figures"
[ -n "${DRY_RUN:-}" ] || echo "quickstart_cpu.sh: done in $((SECONDS - start)) s; figures and Table 1 in $OUT/figures" >&2
