#!/usr/bin/env bash
# Block-causal arithmetic MDMs (Fast-dLLM v2 / SDAR style: causal attention except inside the block being
# denoised, so committed tokens keep AR representations and every KV cache is exact), trained with sft-blocks:
#   blocks-mdm: the bundled illada-arithmetic (semi-AR, bidirectional) made block-causal, 600 steps, lr 1e-4;
#   blocks-ar:  the aligned AR twin adapted directly, 300 steps, lr 3e-4.
# Evaluated on the fixed canvas of 96 in blocks of 8 with the committed cache (exact here). Resumable: rerun after
# a stop.   bash recipes/arithmetic-blocks.sh   (two runs at a time, one thread each; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
[ -d $RUN/aligned-ar/checkpoints ] || bash recipes/arithmetic-aligned.sh
$ILLADA train recipes/arithmetic-blocks-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-blocks-ar.yaml --no-progress &
wait
for model in blocks-mdm blocks-ar; do
  $ILLADA eval --model $RUN/$model --task gsm8k --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 96 \
    --fixed-length --block-length 8 --steps 96 --cache committed --limit 200 --batch-size 16 --no-progress \
    --out $RUN/$model/eval
done
