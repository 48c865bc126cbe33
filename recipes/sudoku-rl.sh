#!/usr/bin/env bash
# RL on sudoku from the early-stopped MDM: the three log-likelihood estimators, and coupled with vs without the KL
# term: three at once (one thread each), then the ELBO estimator; then the report (docs/rl/). Resumable.
#   bash recipes/sudoku-rl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
export OMP_NUM_THREADS=${THREADS:-1}
RUN=runs/sudoku
[ -f $RUN/rl-train.jsonl ] || $ILLADA tasks make sudoku --split train --format eval --n 4000 --seed 11 --out $RUN/rl-train.jsonl
$ILLADA train recipes/sudoku-mdm-early.yaml --no-progress  # resumes it, or returns at once when finished
$ILLADA rl recipes/sudoku-rl.yaml --no-progress &
$ILLADA rl recipes/sudoku-rl.yaml --out-dir $RUN/rl-coupled-kl --kl-coef 0.05 --no-progress &
$ILLADA rl recipes/sudoku-rl.yaml --out-dir $RUN/rl-mean-field --estimator mean_field --no-progress &
wait
$ILLADA rl recipes/sudoku-rl.yaml --out-dir $RUN/rl-elbo --estimator elbo --no-progress
# measured afterwards, alone, two threads each
$ILLADA rl recipes/sudoku-rl.yaml --out-dir $RUN/rl-coupled-token --ratio token --threads 2 --no-progress
$ILLADA rl recipes/sudoku-rl.yaml --out-dir $RUN/rl-coupled-g16 --lr 5e-5 --group-size 16 --prompts-per-step 4 \
    --steps 120 --eval-every 40 --save-every 40 --threads 2 --no-progress
.venv/bin/python benchmarks/rl_report.py --out docs/rl
