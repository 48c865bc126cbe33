#!/usr/bin/env bash
# Arithmetic twins (masked diffusion vs autoregressive: same shape, data, steps, tokens; at the matched 4500 steps
# the MDM scores 0% while the AR twin scores 94.5%). The bundled `illada-arithmetic` comes from
# recipes/arithmetic-adapted.sh instead. Resumable: rerun after a stop.
#   bash recipes/arithmetic.sh       (the two runs go in parallel, one thread each; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p $RUN
[ -f $RUN/train.jsonl ] || $ILLADA tasks make arithmetic --n 400000 --out $RUN/train.jsonl
[ -f $RUN/test.jsonl ] || $ILLADA tasks make arithmetic --split test --n 1000 --out $RUN/test.jsonl
[ -f $RUN/data/manifest.json ] || $ILLADA prepare $RUN/train.jsonl --tokenizer bytes --out $RUN/data --quiet
$ILLADA train recipes/arithmetic-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-ar.yaml --no-progress &
wait
