#!/usr/bin/env bash
# The paper pipeline (scripts/paper.sh) shrunk to a 2-core CPU: a handful of methods spanning
# Table 1's range, a narrow ResNet-18 on a class-balanced training subset, long enough for robust
# overfitting to show, reduced evaluation sizes; ends with plots.py. Numbers are not the paper's
# (tiny model, tiny data, PGD instead of AutoAttack); the point is the whole pipeline and the
# qualitative picture: RLoss rising after the lr decay, and RLoss tracking average-case flatness.
#
# Usage:   bash scripts/mini_paper.sh [DATA_DIR]          # default ../shared/data/cifar10-jpeg
#          QUICK=1 bash scripts/mini_paper.sh             # smoke test of the pipeline (a few minutes)
#          AA=1 bash scripts/mini_paper.sh                # also AutoAttack (slow on a CPU)
#          a run of the script before the other measures existed: the same command adds them (and plots.py's
#          measures table), every finished training and measurement is skipped
# Environment: DATA_DIR, RUNS (runs_mini; QUICK: runs_mini_quick), FIGURES (figures_mini[_quick]), JOBS (2 rows at a time, one
#   thread each), PYTHON. Finished steps are skipped when the script is run again: a finished training by its
#   final snapshot; evaluate.py and flatness.py are always called and skip what they measured with the same
#   settings themselves (README "Result files").
# Cost: a full run measured 4248 s (71 min) on the otherwise idle 2-core development machine before the other
#   measures; they add 29 process-minutes (all rows but AT's extras: 5171 s, a test run sharing the machine);
#   QUICK=1 measured 9.5 min on a loaded machine.
#
# Rows: AT (baseline), AT label noise 0.2 and 0.4 (a sweep for Fig. 7), AT weight decay 0.05,
# TRADES β=6, AWP ξ=0.005, AT + weight averaging (EMA; τ = 0.99 instead of the paper's 0.9975,
# whose ~400-step horizon is longer than these short runs).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DATA=${1:-${DATA_DIR:-../shared/data/cifar10-jpeg}}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one core per job: JOBS jobs fill the machine

if [ "${QUICK:-0}" = 1 ]; then  # everything shrunk further: checks the pipeline, not the science
    TRAIN=(--width 8 --train-subset 200 --batch-size 50 --epochs 4 --es-every 2 --n-log 50 --n-early-stop 50 --es-restarts 1)
    EPOCHS=4
    EVAL=(--n-eval 50 --n-clean 200 --restarts 1)
    FLAT=(--n-eval 50 --samples 2 --restarts 2 --passes 3 --ref-restarts 1)
    LANDSCAPE=(--directions 2 --points 5 --n-landscape 20 --landscape-steps 3 --adversarial-passes 2)
    HESSIAN=(--n-hessian 50 --hessian-iters 5)
    OTHER=(--n-eval 50 --steps 3 --ref-restarts 1 --sharpness-batch 50 --sharpness-steps 5 --sharpness-samples 2
           --search-depth 4 --mc-samples 1 --probes 3 --n-hessian 50 --hessian-iters 5)
    RUNS=${RUNS:-runs_mini_quick} FIGURES=${FIGURES:-figures_mini_quick}
else
    # width 16 and 250 training images (25 per class), batch 25: 10 steps per epoch, 800 in all,
    # enough for the model to start fitting its training set, so the test RLoss rises after the
    # lr decay at 2/5 of training (Fig. 2; a 60-epoch calibration run of this setting: test RLoss
    # 2.23 at the decay → 2.40 at the end while the training loss fell 2.00 → 1.73).
    # --n-eval 250 for evaluate.py --train is exactly the training subset (train-eval = train
    # images 0…249 in the class-interleaved order = the first 25 of every class).
    TRAIN=(--width 16 --train-subset 250 --batch-size 25 --epochs 80 --eval-every 2 --es-every 8 --n-log 250 --n-early-stop 200 --es-restarts 1)
    EPOCHS=80
    EVAL=(--n-eval 250 --n-clean 2000 --restarts 2)
    FLAT=(--n-eval 200 --samples 3 --restarts 2 --passes 20 --ref-restarts 2)
    LANDSCAPE=(--directions 2 --points 11 --n-landscape 50 --landscape-steps 10 --adversarial-passes 7)
    HESSIAN=(--n-hessian 200 --hessian-iters 30)
    # the other measures (README "Other flatness measures") on every checkpoint of the measures table: 100 test
    # images (one batch for the adaptive ones) and PGD-10 × 1 (PAC-Bayes's bisection attacks every one of its
    # depth × draws noisy models); the Hessian trace and λ_max on the last 100 test images
    OTHER=(--n-eval 100 --steps 10 --ref-restarts 1 --sharpness-batch 100 --sharpness-samples 3
           --search-depth 8 --mc-samples 2 --probes 10 --n-hessian 100 --hessian-iters 20)
fi
RUNS=${RUNS:-runs_mini} FIGURES=${FIGURES:-figures_mini}
[ "${AA:-0}" = 1 ] || EVAL+=(--no-autoattack)
COMMON=(--data-dir "$DATA" --device cpu)
mkdir -p "$RUNS/logs"

ls train_at.py train_trades.py train_awp.py evaluate.py flatness.py plots.py > /dev/null || exit 1
[ -d "$DATA/train" ] || [ -d "$DATA/cifar-10-batches-py" ] || {
    echo "error: no CIFAR-10 under $DATA; pass the ImageFolder tree (e.g. ../shared/data/cifar10-jpeg) as first argument" >&2
    exit 1; }

run() { echo "+ $*"; "$@"; }

train() {  # train NAME SCRIPT FLAGS...: done when the final snapshot exists; an interrupted run is resumed
    local name=$1 script=$2; shift 2
    local dir=$RUNS/$name resume=() final
    final=$(printf '%s/ckpt_epoch%03d.pt' "$dir" "$EPOCHS")
    if [ -f "$final" ]; then echo "done: $final"; return 0; fi
    [ -f "$dir/ckpt_last.pt" ] && resume=(--resume)
    run $PY "$script" "$@" "${TRAIN[@]}" "${COMMON[@]}" --out "$dir" "${resume[@]}"
}

measure() {  # measure NAME [--use-ema]: last and early-stopped checkpoint, as scripts/paper.sh
    local dir=$RUNS/$1 ema=()
    [ "${2:-}" = --use-ema ] && ema=(--use-ema)
    run $PY evaluate.py "$dir/ckpt_last.pt" --train "${ema[@]}" "${EVAL[@]}" "${COMMON[@]}" &&
    run $PY flatness.py "$dir/ckpt_last.pt" --mode both "${ema[@]}" "${FLAT[@]}" "${COMMON[@]}" &&
    run $PY evaluate.py "$dir/ckpt_best.pt" --train "${ema[@]}" "${EVAL[@]}" "${COMMON[@]}" &&
    run $PY flatness.py "$dir/ckpt_best.pt" --mode both "${ema[@]}" "${FLAT[@]}" "${COMMON[@]}" &&
    run $PY flatness.py "$dir/ckpt_last.pt" --mode average --subset train-eval "${ema[@]}" "${FLAT[@]}" "${COMMON[@]}" &&
    others "$@"
}

others() {  # others NAME [--use-ema]: every other measure, RLoss and clean, on the last and the early-stopped checkpoint
    local dir=$RUNS/$1 ema=() ckpt loss mode
    [ "${2:-}" = --use-ema ] && ema=(--use-ema)
    for ckpt in last best; do
        run $PY flatness.py "$dir/ckpt_$ckpt.pt" --mode hessian "${ema[@]}" "${OTHER[@]}" "${COMMON[@]}" || return 1
        for loss in robust clean; do
            for mode in adaptive-worst adaptive-average hessian-trace pac-bayes pac-bayes-mag; do
                run $PY flatness.py "$dir/ckpt_$ckpt.pt" --mode $mode --loss $loss "${ema[@]}" "${OTHER[@]}" "${COMMON[@]}" || return 1
            done
        done
    done
}

baseline_extras() {  # Fig. 6 (every snapshot), Fig. 4 (landscapes of the model and its ×2 / ×0.5 copies), Hessian
    local dir=$RUNS/$1
    run $PY flatness.py --epochs "$dir" --mode both "${FLAT[@]}" "${COMMON[@]}" &&
    for scale in 1 2 0.5; do
        run $PY flatness.py "$dir/ckpt_last.pt" --mode landscape --scale $scale "${LANDSCAPE[@]}" "${COMMON[@]}" || return 1
    done &&
    run $PY flatness.py "$dir/ckpt_last.pt" --mode hessian "${HESSIAN[@]}" "${COMMON[@]}"
}

# ---- the rows; PARALLEL: each row is independent (JOBS at a time)
row_at()     { train at train_at.py && measure at && baseline_extras at; }
row_ln0.2()  { train ln0.2 train_at.py --label-noise 0.2 && measure ln0.2; }
row_ln0.4()  { train ln0.4 train_at.py --label-noise 0.4 && measure ln0.4; }
row_wd()     { train wd train_at.py --wd 0.05 && measure wd; }
row_trades() { train trades train_trades.py --beta 6 && measure trades; }
row_awp()    { train awp train_awp.py --xi 0.005 && measure awp; }
row_ema()    { train ema train_at.py --ema 0.99 && measure ema --use-ema; }

t0=$(date +%s)
for r in at trades awp ln0.4 wd ln0.2 ema; do  # the longest rows first
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    echo "=== row $r (log $RUNS/logs/$r.log)"
    ( "row_$r" > "$RUNS/logs/$r.log" 2>&1 || { echo "row $r failed: see $RUNS/logs/$r.log" >&2; exit 1; } ) &
done
wait
echo "rows done in $(( $(date +%s) - t0 )) s"
$PY plots.py "$RUNS" --out "$FIGURES"
echo "total $(( $(date +%s) - t0 )) s; figures and Table 1 in $FIGURES/"
