#!/usr/bin/env bash
# 6x6 sudoku twins (masked diffusion vs autoregressive, same shape/data/steps). Resumable: rerun after a stop.
#   bash recipes/sudoku.sh      (THREADS=1 by default: OMP_NUM_THREADS for each run)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/sudoku
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p $RUN
[ -f $RUN/train.jsonl ] || $ILLADA tasks make sudoku --n 80000 --out $RUN/train.jsonl
[ -f $RUN/test.jsonl ] || $ILLADA tasks make sudoku --split test --n 200 --out $RUN/test.jsonl
[ -f $RUN/data/manifest.json ] || $ILLADA prepare $RUN/train.jsonl --tokenizer bytes --out $RUN/data --quiet
$ILLADA train recipes/sudoku-mdm.yaml --no-progress
$ILLADA train recipes/sudoku-ar.yaml --no-progress
