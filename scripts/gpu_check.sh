#!/usr/bin/env bash
# The GPU check (docs/gpu_check.md): bench.py's three runs, seconds per CIFAR-10 epoch of PGD-7 AT for ResNet-18 and
# WRN-34-10, every training script with --amp and with --compile, evaluate.py's AutoAttack and flatness.py --mode both
# on 500 images, DDP with NCCL where there are two GPUs; one markdown report. No internet and no data set needed: it
# generates a CIFAR-shaped ImageFolder. Each step has its own timeout; a failure stops nothing else.
#
# Usage: bash scripts/gpu_check.sh [REPORT_DIR]              # GPU: about 7.5 min on an H100 (--budget 450)
#        bash scripts/gpu_check.sh --dry-run [REPORT_DIR]    # every step at tiny sizes on the CPU (tests)
# Options: --budget S, --jobs N, --only GROUPS, --exec, --export DIR (python3 scripts/gpu_check.py --help).
# REPORT_DIR (default runs/gpu_check) receives gpu_check_report.md (also printed) and everything else the check
# writes: no step writes outside it. A device call, with the pyautoattack wheel carried in .whl/:
#   bash scripts/gpu_check.sh /tmp/gpu_check --export "$OUT"
# Exit code 0 when every step that ran succeeded.
set -u
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repository
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
