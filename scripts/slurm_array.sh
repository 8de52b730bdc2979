#!/usr/bin/env bash
#SBATCH --job-name=robust-flatness
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
# One row of scripts/paper.sh per SLURM array task: task i runs row i of
# `LIST_ROWS=1 bash scripts/paper.sh` (same ROWS / SWEEPS), with plotting left to a last job.
# Submit from the repository root (sbatch passes the environment on: RUNS, DATA_DIR, SWEEPS,
# TRAIN_FLAGS, EVAL_FLAGS, FLAT_FLAGS, UNLABELED, ... reach every task):
#
#   n=$(LIST_ROWS=1 bash scripts/paper.sh | wc -l)
#   jid=$(sbatch --parsable --array=0-$((n - 1)) scripts/slurm_array.sh)
#   sbatch --dependency=afterany:$jid scripts/slurm_array.sh plots     # Table 1 and the figures
#
# Resubmitting the same command does only what is missing: a finished training is skipped, an
# interrupted one resumes from ckpt_last.pt, and evaluate.py / flatness.py skip measurements they
# have made (a task that hit --time just needs resubmitting). A task exits 1 when its row failed.
# The #SBATCH lines are defaults; override them on the sbatch command line (--time, --partition).
set -uo pipefail
# sbatch runs a copy of this file from its spool folder: find the repository from the submit folder
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PAPER=$REPO/scripts/paper.sh
[ -f "$PAPER" ] || { echo "error: no scripts/paper.sh under $REPO: submit from the repository root or set REPO" >&2; exit 1; }

if [ "${1:-}" = plots ]; then
    PLOTS=only LAUNCHER="" exec bash "$PAPER"
fi
task=${SLURM_ARRAY_TASK_ID:-}
[[ $task =~ ^[0-9]+$ ]] || { echo "error: SLURM_ARRAY_TASK_ID is '$task': submit with sbatch --array=0-N (or pass 'plots')" >&2; exit 1; }
rows=$(LIST_ROWS=1 bash "$PAPER") || exit 1
row=$(sed -n "$((task + 1))p" <<< "$rows")
[ -n "$row" ] || { echo "error: array task $task, but there are $(wc -l <<< "$rows") rows (0-$(($(wc -l <<< "$rows") - 1)))" >&2; exit 1; }
echo "array task $task: row $row"
ROWS=$row SWEEPS=0 PLOTS=0 JOBS=1 LAUNCHER="" exec bash "$PAPER"
