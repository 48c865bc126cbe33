#!/usr/bin/env bash
# Semi-autoregressive arithmetic MDMs on the aligned working, both from models of recipes/arithmetic-aligned.sh:
#   adapted-mdm: the AR twin's weights, attention opened both ways (adapt_causal), then semi-AR SFT pairs;
#   semiar-mdm:  the aligned MDM continued with the same semi-AR SFT pairs.
# Both evaluated on LLaDA's fixed canvas decoded block by block (the canvas they were trained on).
# Resumable: rerun after a stop.  bash recipes/arithmetic-adapted.sh   (one thread per run; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
[ -d $RUN/aligned-ar/checkpoints ] && [ -d $RUN/aligned-mdm/checkpoints ] || bash recipes/arithmetic-aligned.sh
$ILLADA train recipes/arithmetic-adapted-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-semiar-mdm.yaml --no-progress &
wait
for model in adapted-mdm semiar-mdm; do
  $ILLADA eval --model $RUN/$model --task gsm8k --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 160 \
    --fixed-length --block-length 16 --steps 160 --limit 200 --batch-size 16 --no-progress --out $RUN/$model/eval
done
