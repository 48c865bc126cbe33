#!/usr/bin/env bash
# RL on sudoku from the MDM at step 2,750 of recipes/sudoku-mdm.yaml (67% held-out): coupled with and without the KL
# term, then mean-field and ELBO, two at a time (one thread each); then the report (docs/rl/sudoku-mid.md). Resumable.
#   bash recipes/sudoku-rl-mid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
export OMP_NUM_THREADS=${THREADS:-1}
RUN=runs/sudoku
[ -f $RUN/rl-train.jsonl ] || $ILLADA tasks make sudoku --split train --format eval --n 4000 --seed 11 --out $RUN/rl-train.jsonl
[ -e $RUN/rl-mid-start ] || { $ILLADA train recipes/sudoku-mdm.yaml --no-progress; cp -r $RUN/mdm/checkpoints/step-00002750 $RUN/rl-mid-start; }
$ILLADA rl recipes/sudoku-rl-mid.yaml --no-progress &
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-coupled-kl --kl-coef 0.05 --no-progress &
wait
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-mean-field --estimator mean_field --no-progress &
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-elbo --estimator elbo --no-progress &
wait
.venv/bin/python benchmarks/rl_report.py --suite sudoku-mid --out docs/rl
