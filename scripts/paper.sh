#!/usr/bin/env bash
# Reproduce Table 1 and the figures of Stutz, Hein & Schiele, "Relating Adversarially Robust
# Generalization to Flat Minima" (ICCV 2021): every Table 1 row with the paper's best flags, the
# extra models of Fig. 4, optionally the Fig. 7 sweeps; then evaluation, flatness and plots.py.
#
# Usage:   bash scripts/paper.sh                            # everything, one row after the other
#          JOBS=8 bash scripts/paper.sh                     # 8 rows at once, one GPU each (round robin)
#          ROWS="at trades awp" bash scripts/paper.sh       # a subset of rows
#          SWEEPS=1 bash scripts/paper.sh                   # also the hyper-parameter sweeps of Fig. 7
#          ROBUSTBENCH="Carmon2019Unlabeled Zhang2019Theoretically" bash scripts/paper.sh
#                                                           # also public models for Fig. 1's ▲ (files in MODEL_DIR)
#          DRY_RUN=1 bash scripts/paper.sh                  # print every command; runs and writes nothing
#          LIST_ROWS=1 bash scripts/paper.sh                # the rows, one name per line
#          LAUNCHER="srun --gres=gpu:1 --time=12:00:00" JOBS=40 bash scripts/paper.sh
#                                                           # every command of a row through a scheduler
#          sbatch --array=0-$(($(LIST_ROWS=1 bash scripts/paper.sh | wc -l) - 1)) scripts/slurm_array.sh
#                                                           # one SLURM array task per row (README)
# Environment: DATA_DIR (CIFAR-10 root or ImageFolder tree; default data, downloaded), RUNS (runs),
#   FIGURES (figures), UNLABELED (ti_500K_pseudo_labeled.pickle of Carmon et al.; the "+Unlabeled"
#   row is skipped without it), TRAIN_FLAGS (added to every training command, e.g. "--amp
#   --channels-last" for speed or "--nesterov" to match the released code), EVAL_FLAGS (added to
#   every evaluate.py command, e.g. "--aa-version paper"), FLAT_FLAGS (added to every flatness.py
#   command, e.g. "--batch-size 500"), LAUNCHER (prefix of every training, evaluate.py and
#   flatness.py command, e.g. "srun --gres=gpu:1"; with it, JOBS rows are in flight at once and the
#   scheduler, not this script, picks the GPUs), PLOTS (1: plots.py at the end; 0: not, for a
#   scheduler task that runs one row; only: plots.py alone), PYTHON (python), ROBUSTBENCH (RobustBench
#   CIFAR-10 Linf models, e.g. "Carmon2019Unlabeled Rice2020Overfitting": each one a row
#   robustbench:<name> added to the default rows, evaluated and measured (average + worst case) for Fig. 1's
#   ▲; with ROWS given, name such rows there), MODEL_DIR (models: RobustBench's folder, files in
#   MODEL_DIR/cifar10/Linf/<name>.pt; the results land there and plots.py reads them with --robustbench-dir).
#
# Per row: train (the final snapshot ckpt_epochNNN.pt marks a finished run; an interrupted one is
# resumed with --resume) → evaluate.py --train on the last and the early-stopped checkpoint (clean,
# PGD-20×10, AutoAttack; test and train images) → flatness.py average + worst case on both →
# average-case flatness on train examples (Fig. 9) → every other measure, RLoss and clean, on both checkpoints
# (flatness.py --mode all; plots.py's measures table). evaluate.py and flatness.py are always called:
# each skips a measurement whose result (same checkpoint, same settings) exists, so a re-run only
# does what is missing. The figure inputs beyond Table 1:
#   Fig. 4 (1-D landscapes, flatness.py --mode landscape): top AT, AT rescaled ×2 and ×0.5 (§3.2),
#     Adam, a small batch; bottom AT-AWP, Entropy-SGD, TRADES.
#   Fig. 6 (over training, flatness.py --epochs RUN): AT average + worst case and the largest
#     Hessian eigenvalue; rotation (self-supervision), AT-AWP and +Unlabeled average + worst case.
#   §3.2 Hessian table: AT and AT rescaled ×2 / ×0.5 (largest eigenvalue 1990 / 505 / 7936 in the
#     paper).
#   Fig. 7 (SWEEPS=1): label noise, self-supervision, TRADES, weight decay, AT-AWP sweeps.
#
# Parallelism: rows are independent; the steps inside a row are sequential. With JOBS > 1 rows run
# in the background, each logging to $RUNS/logs/<row>.log, CUDA_VISIBLE_DEVICES round robin over the
# GPUs (unless LAUNCHER is set). plots.py runs once all rows are done. Exit status 1 if a row failed.
# Cost (estimate, not measured): a 150-epoch PGD-7 ResNet-18 run is ~2-4 GPU hours on an H100 with
# --amp --channels-last; AutoAttack on 2×1000 images and the flatness measures add ~1 hour per row.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
DATA=${DATA_DIR:-data}
RUNS=${RUNS:-runs}
FIGURES=${FIGURES:-figures}
JOBS=${JOBS:-1}
UNLABELED=${UNLABELED:-ti_500K_pseudo_labeled.pickle}
SWEEPS=${SWEEPS:-0}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
EVAL_FLAGS=${EVAL_FLAGS:-}
FLAT_FLAGS=${FLAT_FLAGS:-}
LAUNCHER=${LAUNCHER:-}
PLOTS=${PLOTS:-1}
ROBUSTBENCH=${ROBUSTBENCH:-}
MODEL_DIR=${MODEL_DIR:-models}

# run CMD...: CMD under $LAUNCHER; with DRY_RUN=1 only printed (shell-quoted, so it can be pasted)
run() {
    local line
    line=$(printf '%q ' "$@"); line="$LAUNCHER${LAUNCHER:+ }${line% }"
    if [ "$DRY_RUN" = 1 ]; then echo "$line"; return 0; fi
    echo "+ $line"
    # shellcheck disable=SC2086
    $LAUNCHER "$@"
}

# train NAME EPOCHS SCRIPT FLAGS...: a run is finished when its final snapshot exists; an
# interrupted one is resumed with the same flags
train() {
    local name=$1 epochs=$2 script=$3; shift 3
    local dir=$RUNS/$name resume=() final
    final=$(printf '%s/ckpt_epoch%03d.pt' "$dir" "$epochs")
    if [ -f "$final" ]; then echo "done: $final"; return 0; fi
    [ -f "$dir/ckpt_last.pt" ] && resume=(--resume)
    # shellcheck disable=SC2086
    run $PY "$script" "$@" --epochs "$epochs" --data-dir "$DATA" --out "$dir" "${resume[@]}" $TRAIN_FLAGS
}

# evaluate ARGS... / flatness ARGS...: the tools skip what they have measured with these settings
# shellcheck disable=SC2086
evaluate() { run $PY evaluate.py "$@" --data-dir "$DATA" $EVAL_FLAGS; }
# shellcheck disable=SC2086
flatness() { run $PY flatness.py "$@" --data-dir "$DATA" $FLAT_FLAGS; }

# measure NAME KIND: evaluation and flatness of a trained run. KIND: full (Table 1 row: last and
# early-stopped checkpoints, train-example flatness), ema (the same on the EMA weights: weight
# averaging is evaluated as the averaged model), point (a Fig. 1 / Fig. 7 point: last checkpoint)
measure() {
    local dir=$RUNS/$1 kind=$2 ema=()
    [ "$kind" = ema ] && ema=(--use-ema)
    evaluate "$dir/ckpt_last.pt" --train "${ema[@]}" &&
    flatness "$dir/ckpt_last.pt" --mode both "${ema[@]}" || return 1
    [ "$kind" = point ] && return 0
    evaluate "$dir/ckpt_best.pt" --train "${ema[@]}" &&
    flatness "$dir/ckpt_best.pt" --mode both "${ema[@]}" &&
    flatness "$dir/ckpt_last.pt" --mode average --subset train-eval "${ema[@]}" &&
    others "$dir/ckpt_last.pt" "${ema[@]}" && others "$dir/ckpt_best.pt" "${ema[@]}"
}
# the measures table (README "Other flatness measures"): every measure of flatness.py on RLoss and on the clean
# loss (--mode all: adaptive worst and average case, PAC-Bayes and magnitude-aware, Hessian trace and λ_max)
others() { flatness "$1" --mode all "${@:2}" && flatness "$1" --mode all --loss clean "${@:2}"; }

# Fig. 4: 1-D landscape of the last checkpoint along random and adversarial directions
landscape() { local name=$1; shift; flatness "$RUNS/$name/ckpt_last.pt" --mode landscape "$@"; }
# Fig. 6: a measure on every snapshot ckpt_epochNNN.pt of a run (flatness.py skips those done)
over_training() { flatness --epochs "$RUNS/$1" --mode "$2"; }

# ---- Table 1 rows, the paper's best flags. Every row is independent of the others.
# AT baseline: Table 1, Fig. 2, Fig. 4 top (and the ×2 / ×0.5 rescaled copies, §3.2), Fig. 6 left
# (both measures and the Hessian over training), the §3.2 Hessian table
row_at() {
    train at 150 train_at.py && measure at full &&
    landscape at && landscape at --scale 2 && landscape at --scale 0.5 &&
    over_training at both && over_training at hessian &&
    flatness "$RUNS/at/ckpt_last.pt" --mode hessian &&
    flatness "$RUNS/at/ckpt_last.pt" --mode hessian --scale 2 &&
    flatness "$RUNS/at/ckpt_last.pt" --mode hessian --scale 0.5
}
row_unlabeled() {  # Fig. 6 right: over training
    if [ ! -f "$UNLABELED" ]; then
        echo "skip row unlabeled: $UNLABELED not found (set UNLABELED=path/to/ti_500K_pseudo_labeled.pickle)"; return 0; fi
    train unlabeled 150 train_misc.py --method unlabeled --unlabeled-data "$UNLABELED" --unlabeled-fraction 0.7 &&
    measure unlabeled full && over_training unlabeled both
}
row_cyclic()          { train cyclic 30 train_at.py --lr-schedule cyclic --cyclic-peak 0.2 && measure cyclic full; }
row_autoaugment()     { train autoaugment 150 train_misc.py --method autoaugment && measure autoaugment full; }
# AT-AWP: Fig. 4 bottom, Fig. 6 right
row_awp()             { train awp 150 train_awp.py --xi 0.005 && measure awp full && landscape awp && over_training awp both; }
row_label_noise()     { train label_noise 150 train_at.py --label-noise 0.4 && measure label_noise full; }
row_clip()            { train clip 150 train_at.py --clip 0.005 && measure clip full; }
row_trades()          { train trades 150 train_trades.py --beta 9 && measure trades full && landscape trades; }
# Self-supervision: a step sees B labelled + B rotated images, so --batch-size 64 is the paper's
# 64 + 64 per step and 75 epochs its number of steps (README, train_misc.py rotation). Fig. 6 right.
ROT=(--method rotation --batch-size 64)
row_rotation()        { train rotation 75 train_misc.py "${ROT[@]}" --rot-weight 4 && measure rotation full && over_training rotation both; }
row_wd()              { train wd 150 train_at.py --wd 0.05 && measure wd full; }
# Entropy-SGD: the best L is not recorded; L = 2 with 150/L epochs keeps the paper's compute. Fig. 4 bottom
row_entropy_sgd()     { train entropy_sgd 75 train_misc.py --method entropy-sgd --L 2 && measure entropy_sgd full && landscape entropy_sgd; }
row_mish()            { train mish 150 train_at.py --act mish && measure mish full; }
row_late()            { train late 150 train_at.py --lr-schedule late && measure late full; }
row_silu()            { train silu 150 train_at.py --act silu && measure silu full; }
row_ema()             { train ema 150 train_at.py --ema 0.9975 && measure ema ema; }
row_eps9()            { train eps9 150 train_at.py --epsilon 9/255 && measure eps9 full; }
# MART: the best β is not recorded; 6 is the MART paper's value
row_mart()            { train mart 150 train_mart.py --beta 6 && measure mart full; }
row_gelu()            { train gelu 150 train_at.py --act gelu && measure gelu full; }
row_label_smoothing() { train label_smoothing 150 train_at.py --label-smoothing 0.3 && measure label_smoothing full; }

# ---- Fig. 4 top: models outside Table 1 (also points of Fig. 1)
# Adam: the released code's Adam runs used lr 0.1 (README, train_at.py Adam)
row_adam()            { train adam 150 train_at.py --optimizer adam --lr 0.1 && measure adam point && landscape adam; }
# Small batch: batch 8 is our choice from the released batch-size sweep (4 … 512; the lr stays 0.05
# as there). 16× the steps of batch 128: the slowest row.
row_batch8()          { train batch8 150 train_at.py --batch-size 8 && measure batch8 point && landscape batch8; }

# ---- Fig. 7 sweeps (SWEEPS=1): the other hyper-parameters of label noise, self-supervision,
# TRADES, weight decay and AWP (the best values are the Table 1 rows above). Independent as well.
sweep_rows=()
for v in 0.1 0.2 0.3 0.5;     do eval "row_ln$v() { train ln$v 150 train_at.py --label-noise $v && measure ln$v point; }"; sweep_rows+=("ln$v"); done
for v in 1 2 8;               do eval "row_rot$v() { train rot$v 75 train_misc.py \"\${ROT[@]}\" --rot-weight $v && measure rot$v point; }"; sweep_rows+=("rot$v"); done
for v in 1 3 6;               do eval "row_trades$v() { train trades$v 150 train_trades.py --beta $v && measure trades$v point; }"; sweep_rows+=("trades$v"); done
for v in 0.0001 0.001 0.005 0.01; do eval "row_wd$v() { train wd$v 150 train_at.py --wd $v && measure wd$v point; }"; sweep_rows+=("wd$v"); done
for v in 0.001 0.0025 0.01;   do eval "row_awp$v() { train awp$v 150 train_awp.py --xi $v && measure awp$v point; }"; sweep_rows+=("awp$v"); done

# ---- Fig. 1's ▲: a public RobustBench model (early-stopped models of other papers), read from
# $MODEL_DIR/cifar10/Linf/<name>.pt; its results go to $MODEL_DIR (README "Public robust models")
row_robustbench() {
    evaluate --robustbench "$1" --model-dir "$MODEL_DIR" &&
    flatness --robustbench "$1" --model-dir "$MODEL_DIR" --mode both
}
# run_row NAME: a row function, or robustbench:<model>
run_row() { case $1 in robustbench:*) row_robustbench "${1#robustbench:}" ;; *) "row_$1" ;; esac; }

# ---- the rows: checked before anything runs
TABLE1="at unlabeled cyclic autoaugment awp label_noise clip trades rotation wd entropy_sgd mish late silu ema eps9 mart gelu label_smoothing"
ALL="$TABLE1 adam batch8"
ROWS_GIVEN=${ROWS:+1}
ROWS=${ROWS:-$ALL}
[ "$SWEEPS" = 1 ] && ROWS="$ROWS ${sweep_rows[*]}"
# ROBUSTBENCH adds its rows to the default ones (a scheduler task that runs one given row runs only that)
if [ -z "$ROWS_GIVEN" ]; then for m in $ROBUSTBENCH; do ROWS="$ROWS robustbench:$m"; done; fi
for r in $ROWS; do
    case $r in robustbench:?*) continue ;; esac
    declare -F "row_$r" > /dev/null || {
        echo "error: unknown row '$r' (rows: $ALL ${sweep_rows[*]} robustbench:<RobustBench model>)" >&2; exit 1; }
done
case $PLOTS in 0|1|only) ;; *) echo "error: PLOTS must be 0, 1 or only, got '$PLOTS'" >&2; exit 1 ;; esac
if [ "${LIST_ROWS:-0}" = 1 ]; then printf '%s\n' $ROWS; exit 0; fi
RB_ROWS=$ROBUSTBENCH
case " $ROWS " in *" robustbench:"*) RB_ROWS=1 ;; esac  # plots.py then draws them (--robustbench-dir)
[ "$PLOTS" = only ] && ROWS=""

# ---- run them: JOBS at a time, each on its own GPU (or wherever LAUNCHER puts it)
NGPU=0
[ -z "$LAUNCHER" ] && NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
failed=() pids=() names=()
slot=0
for r in $ROWS; do
    if [ "$JOBS" -le 1 ] || [ "$DRY_RUN" = 1 ]; then
        echo "=== row $r"
        run_row "$r" || failed+=("$r")
    else
        mkdir -p "$RUNS/logs"
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
        gpu=$(( NGPU > 0 ? slot % NGPU : 0 )); slot=$((slot + 1))
        where=$([ "$NGPU" -gt 0 ] && echo ", GPU $gpu")
        echo "=== row $r (background$where, log $RUNS/logs/$r.log)"
        ( [ "$NGPU" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$gpu; run_row "$r" > "$RUNS/logs/$r.log" 2>&1 ) &
        pids+=($!) names+=("$r")
    fi
done
for i in "${!pids[@]}"; do  # every background row
    wait "${pids[$i]}" || { failed+=("${names[$i]}"); echo "row ${names[$i]} failed: see $RUNS/logs/${names[$i]}.log" >&2; }
done
[ ${#failed[@]} -gt 0 ] && echo "failed rows: ${failed[*]}" >&2

# ---- figures, Table 1, correlations from every run folder
if [ "$PLOTS" != 0 ]; then
    plot_args=("$RUNS" --out "$FIGURES")
    [ -n "$RB_ROWS" ] && plot_args+=(--robustbench-dir "$MODEL_DIR")  # Fig. 1's ▲
    line="$PY plots.py $(printf '%q ' "${plot_args[@]}")"
    if [ "$DRY_RUN" = 1 ]; then echo "${line% }"; else echo "+ ${line% }"; $PY plots.py "${plot_args[@]}" || exit 1; fi
fi
[ ${#failed[@]} -eq 0 ]
