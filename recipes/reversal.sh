#!/usr/bin/env bash
# Reversal-facts twins (masked diffusion vs autoregressive, same shape/data/steps). Resumable: rerun after a stop.
#   bash recipes/reversal.sh      (THREADS=1 by default: OMP_NUM_THREADS for each run)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/reversal
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p $RUN
[ -f $RUN/train.jsonl ] || $ILLADA tasks make reversal --n 150000 --out $RUN/train.jsonl
for probe in reverse forward infill; do
  [ -f $RUN/test-$probe.jsonl ] || $ILLADA tasks make reversal --split test --variant $probe --n 50 --out $RUN/test-$probe.jsonl
done
[ -f $RUN/data/manifest.json ] || $ILLADA prepare $RUN/train.jsonl --tokenizer bytes --out $RUN/data --quiet
$ILLADA train recipes/reversal-mdm.yaml --no-progress
$ILLADA train recipes/reversal-ar.yaml --no-progress
