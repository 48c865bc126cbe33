#!/usr/bin/env bash
# RL on sudoku from the MDM at step 2,750 of recipes/sudoku-mdm.yaml (67% held-out): coupled with and without the KL
# term, then coupled at lr 2e-5 and 5e-6 on 16 prompts a step, two at a time (one thread each); then the report
# (docs/rl/sudoku-mid.md). Resumable.
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
# smaller steps on twice the prompts: lr 1e-4 lost 10 points, the noise of Adam's steps on a model mid-decay
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-coupled-lr2e-5 --lr 2e-5 --prompts-per-step 16 --steps 160 --no-progress &
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-coupled-lr5e-6 --lr 5e-6 --prompts-per-step 16 --no-progress &
wait
$ILLADA rl recipes/sudoku-rl-mid.yaml --out-dir $RUN/mid-coupled-lr2e-5-seed1 --lr 2e-5 --prompts-per-step 16 --steps 160 \
  --seed 1 --eval-every 40 --save-every 40 --threads 2 --no-progress
wait
.venv/bin/python benchmarks/rl_report.py --suite sudoku-mid --out docs/rl
