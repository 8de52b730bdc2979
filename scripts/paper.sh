#!/usr/bin/env bash
# Reproduce Table 1 and the figures of Stutz, Hein & Schiele, "Relating Adversarially Robust
# Generalization to Flat Minima" (ICCV 2021): every Table 1 row with the paper's best flags, then
# evaluation, flatness and plots.py.
#
# Usage:   bash scripts/paper.sh                            # everything, one row after the other
#          JOBS=8 bash scripts/paper.sh                     # 8 rows at once, one GPU each (round robin)
#          ROWS="at trades awp" bash scripts/paper.sh       # a subset of rows
#          SWEEPS=1 bash scripts/paper.sh                   # also the hyper-parameter sweeps of Fig. 7
#          DRY_RUN=1 bash scripts/paper.sh                  # print the commands that would run
# Environment: DATA_DIR (CIFAR-10 root or ImageFolder tree; default data, downloaded), RUNS (runs),
#   FIGURES (figures), UNLABELED (ti_500K_pseudo_labeled.pickle of Carmon et al.; the "+Unlabeled"
#   row is skipped without it), TRAIN_FLAGS (added to every training command, e.g. "--amp
#   --channels-last" for speed or "--nesterov" to match the released code), EVAL_FLAGS (added to
#   every evaluate.py / flatness.py command, e.g. "--batch-size 500"), PYTHON (python).
#
# Per row: train (150 epochs; the run folder is resumed if a previous call was interrupted) →
# evaluate.py on the last and the early-stopped checkpoint (clean, PGD-20×10, AutoAttack; test and
# --train) → flatness.py average + worst case on both → average-case flatness on train examples
# (Fig. 9). The AT baseline also gets flatness over training (Fig. 6), 1-D landscapes (Fig. 4) and
# the Hessian (with the ×2 / ×0.5 scale check). Every step is skipped when its output file exists,
# so the script can be re-run after an interruption and only does what is missing.
#
# Parallelism: rows are independent (PARALLEL: every row below); the steps inside a row are
# sequential. With JOBS > 1 rows run in the background, CUDA_VISIBLE_DEVICES round robin over the
# GPUs, each logging to $RUNS/logs/<row>.log. plots.py runs once all rows are done.
# Cost (estimate, not measured): a 150-epoch PGD-7 ResNet-18 run is ~2-4 GPU hours on an H100 with
# --amp --channels-last; AutoAttack on 2×1000 images and the flatness measures add ~1 hour per row.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
[ "${DRY_RUN:-0}" = 1 ] && PY="echo $PY"
DATA=${DATA_DIR:-data}
RUNS=${RUNS:-runs}
FIGURES=${FIGURES:-figures}
JOBS=${JOBS:-1}
UNLABELED=${UNLABELED:-ti_500K_pseudo_labeled.pickle}
SWEEPS=${SWEEPS:-0}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
EVAL_FLAGS=${EVAL_FLAGS:-}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
mkdir -p "$RUNS/logs"

# step OUTPUT CMD...: run CMD unless OUTPUT exists (a finished step is never repeated)
step() {
    local out=$1; shift
    if [ -f "$out" ]; then echo "done: $out"; return 0; fi
    [ "${DRY_RUN:-0}" = 1 ] || echo "+ $*"
    "$@"
}

# train NAME EPOCHS SCRIPT FLAGS...: a run is finished when its final snapshot exists; an
# interrupted one is resumed with the same flags
train() {
    local name=$1 epochs=$2 script=$3; shift 3
    local dir=$RUNS/$name resume=()
    [ -f "$dir/ckpt_last.pt" ] && resume=(--resume)
    # shellcheck disable=SC2086
    step "$(printf '%s/ckpt_epoch%03d.pt' "$dir" "$epochs")" \
        $PY "$script" "$@" --epochs "$epochs" --data-dir "$DATA" --out "$dir" "${resume[@]}" $TRAIN_FLAGS
}

# measure NAME KIND: evaluation and flatness of a trained run. KIND: full (Table 1 row: last and
# early-stopped checkpoints, train-example flatness), ema (the same on the EMA weights:
# weight averaging is evaluated as the averaged model), sweep (Fig. 7 point: last checkpoint only)
measure() {
    local dir=$RUNS/$1 kind=$2 ema=() t=""
    [ "$kind" = ema ] && ema=(--use-ema) && t=_ema
    # shellcheck disable=SC2086
    {
    step "$dir/eval$t.json" $PY evaluate.py "$dir/ckpt_last.pt" --train "${ema[@]}" --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_worst$t.json" $PY flatness.py "$dir/ckpt_last.pt" --mode both "${ema[@]}" --data-dir "$DATA" $EVAL_FLAGS || return 1
    [ "$kind" = sweep ] && return 0
    step "$dir/eval_best$t.json" $PY evaluate.py "$dir/ckpt_best.pt" --train "${ema[@]}" --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_worst_best$t.json" $PY flatness.py "$dir/ckpt_best.pt" --mode both "${ema[@]}" --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_average_train$t.json" $PY flatness.py "$dir/ckpt_last.pt" --mode average --subset train-eval "${ema[@]}" --data-dir "$DATA" $EVAL_FLAGS
    }
}

# ---- Table 1 rows, the paper's best flags. PARALLEL: every row is independent.
row_at()              { train at 150 train_at.py && measure at full && baseline_extras at; }
row_unlabeled()       {
    if [ ! -f "$UNLABELED" ]; then echo "skip row unlabeled: $UNLABELED not found (set UNLABELED=path/to/ti_500K_pseudo_labeled.pickle)"; return 0; fi
    train unlabeled 150 train_misc.py --method unlabeled --unlabeled-data "$UNLABELED" --unlabeled-fraction 0.7 && measure unlabeled full; }
row_cyclic()          { train cyclic 30 train_at.py --lr-schedule cyclic --cyclic-peak 0.2 && measure cyclic full; }
row_autoaugment()     { train autoaugment 150 train_misc.py --method autoaugment && measure autoaugment full; }
row_awp()             { train awp 150 train_awp.py --xi 0.005 && measure awp full; }
row_label_noise()     { train label_noise 150 train_at.py --label-noise 0.4 && measure label_noise full; }
row_clip()            { train clip 150 train_at.py --clip 0.005 && measure clip full; }
row_trades()          { train trades 150 train_trades.py --beta 9 && measure trades full; }
row_rotation()        { train rotation 150 train_misc.py --method rotation --rot-weight 4 && measure rotation full; }
row_wd()              { train wd 150 train_at.py --wd 0.05 && measure wd full; }
# Entropy-SGD: the best L is not recorded; L = 2 with 150/L epochs keeps the paper's compute
row_entropy_sgd()     { train entropy_sgd 75 train_misc.py --method entropy-sgd --L 2 && measure entropy_sgd full; }
row_mish()            { train mish 150 train_at.py --act mish && measure mish full; }
row_late()            { train late 150 train_at.py --lr-schedule late && measure late full; }
row_silu()            { train silu 150 train_at.py --act silu && measure silu full; }
row_ema()             { train ema 150 train_at.py --ema 0.9975 && measure ema ema; }
row_eps9()            { train eps9 150 train_at.py --epsilon 9/255 && measure eps9 full; }
# MART: the best β is not recorded; 6 is the MART paper's value
row_mart()            { train mart 150 train_mart.py --beta 6 && measure mart full; }
row_gelu()            { train gelu 150 train_at.py --act gelu && measure gelu full; }
row_label_smoothing() { train label_smoothing 150 train_at.py --label-smoothing 0.3 && measure label_smoothing full; }

# The AT baseline's extra measurements: flatness of every snapshot (Fig. 6), 1-D landscapes
# (Fig. 4), the largest Hessian eigenvalue and its ×2 / ×0.5 scale check (§3.2).
baseline_extras() {
    local dir=$RUNS/$1
    # shellcheck disable=SC2086
    {
    [ "${DRY_RUN:-0}" = 1 ] || echo "+ flatness.py --epochs $dir --mode both"
    $PY flatness.py --epochs "$dir" --mode both --data-dir "$DATA" $EVAL_FLAGS || return 1   # resumable itself
    step "$dir/flatness_landscape.json" $PY flatness.py "$dir/ckpt_last.pt" --mode landscape --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_hessian.json" $PY flatness.py "$dir/ckpt_last.pt" --mode hessian --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_hessian_scale2.json" $PY flatness.py "$dir/ckpt_last.pt" --mode hessian --scale 2 --data-dir "$DATA" $EVAL_FLAGS || return 1
    step "$dir/flatness_hessian_scale0.5.json" $PY flatness.py "$dir/ckpt_last.pt" --mode hessian --scale 0.5 --data-dir "$DATA" $EVAL_FLAGS
    }
}

# ---- Fig. 7 sweeps (SWEEPS=1): the other hyper-parameters of label noise, self-supervision,
# TRADES, weight decay and AWP (the best values are the Table 1 rows above). PARALLEL as well.
sweep_rows=()
for v in 0.1 0.2 0.3 0.5;     do eval "row_ln$v() { train ln$v 150 train_at.py --label-noise $v && measure ln$v sweep; }"; sweep_rows+=("ln$v"); done
for v in 1 2 8;               do eval "row_rot$v() { train rot$v 150 train_misc.py --method rotation --rot-weight $v && measure rot$v sweep; }"; sweep_rows+=("rot$v"); done
for v in 1 3 6;               do eval "row_trades$v() { train trades$v 150 train_trades.py --beta $v && measure trades$v sweep; }"; sweep_rows+=("trades$v"); done
for v in 0.0001 0.001 0.005 0.01; do eval "row_wd$v() { train wd$v 150 train_at.py --wd $v && measure wd$v sweep; }"; sweep_rows+=("wd$v"); done
for v in 0.001 0.0025 0.01;   do eval "row_awp$v() { train awp$v 150 train_awp.py --xi $v && measure awp$v sweep; }"; sweep_rows+=("awp$v"); done

# ---- run the rows: JOBS at a time, each on its own GPU
ALL="at unlabeled cyclic autoaugment awp label_noise clip trades rotation wd entropy_sgd mish late silu ema eps9 mart gelu label_smoothing"
ROWS=${ROWS:-$ALL}
[ "$SWEEPS" = 1 ] && ROWS="$ROWS ${sweep_rows[*]}"
failed=()
slot=0
for r in $ROWS; do
    declare -F "row_$r" > /dev/null || { echo "unknown row '$r' (rows: $ALL ${sweep_rows[*]})" >&2; exit 1; }
    if [ "$JOBS" -le 1 ]; then
        echo "=== row $r"
        "row_$r" || failed+=("$r")
    else
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        gpu=$(( NGPU > 0 ? slot % NGPU : 0 )); slot=$((slot + 1))
        echo "=== row $r (background, GPU $gpu, log $RUNS/logs/$r.log)"
        ( [ "$NGPU" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$gpu; "row_$r" > "$RUNS/logs/$r.log" 2>&1 \
            || { echo "row $r failed: see $RUNS/logs/$r.log" >&2; exit 1; } ) &
    fi
done
wait  # every background row
[ ${#failed[@]} -gt 0 ] && echo "failed rows: ${failed[*]}" >&2

# ---- figures, Table 1, correlations from every run folder
$PY plots.py "$RUNS" --out "$FIGURES"
