#!/usr/bin/env bash
# Arithmetic twins on the aligned working (masked diffusion as SFT pairs vs autoregressive: same shape, rows, steps,
# tokens), evaluated on the held-out test split of recipes/arithmetic.sh (same questions; the metric reads #### N).
# Resumable: rerun after a stop.  bash recipes/arithmetic-aligned.sh   (one thread per run; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p $RUN
[ -f $RUN/aligned-train.jsonl ] || $ILLADA tasks make arithmetic --variant aligned --format completion --n 300000 \
  --seed 7 --out $RUN/aligned-train.jsonl
[ -f $RUN/test.jsonl ] || $ILLADA tasks make arithmetic --split test --n 1000 --out $RUN/test.jsonl
[ -f $RUN/aligned-pairs/manifest.json ] || $ILLADA prepare $RUN/aligned-train.jsonl --kind sft --sft-format pairs \
  --tokenizer bytes --out $RUN/aligned-pairs --quiet
$ILLADA train recipes/arithmetic-aligned-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-aligned-ar.yaml --no-progress &
wait
for model in aligned-mdm aligned-ar; do
  $ILLADA eval --model $RUN/$model --task gsm8k --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 160 \
    --limit 200 --batch-size 16 --no-progress --out $RUN/$model/eval
done
