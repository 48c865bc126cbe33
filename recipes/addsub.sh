#!/usr/bin/env bash
# The add/sub MDM (recipes/addsub-mdm.yaml) and its held-out test set. Resumable.  bash recipes/addsub.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/addsub
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p $RUN
[ -f $RUN/train.jsonl ] || $ILLADA tasks make arithmetic --templates add,sub --variant aligned --format completion \
  --n 100000 --seed 3 --out $RUN/train.jsonl
[ -f $RUN/test.jsonl ] || $ILLADA tasks make arithmetic --templates add,sub --split test --n 400 --out $RUN/test.jsonl
[ -f $RUN/pairs/manifest.json ] || $ILLADA prepare $RUN/train.jsonl --kind sft --sft-format pairs --tokenizer bytes \
  --out $RUN/pairs --quiet
$ILLADA train recipes/addsub-mdm.yaml --no-progress
for step in 00000500 00001000 00002000; do
  [ -f $RUN/mdm/eval-$step/gsm8k.json ] || $ILLADA eval --model $RUN/mdm/checkpoints/step-$step --task gsm8k \
    --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 32 --limit 200 --batch-size 50 --no-progress \
    --out $RUN/mdm/eval-$step
done
