#!/usr/bin/env bash
# Block-causal arithmetic MDMs (Fast-dLLM v2 / SDAR style: causal attention except inside the block being
# denoised, so committed tokens keep AR representations and every KV cache is exact), trained with sft-blocks:
#   blocks-mdm:      the semi-AR MDM adapted-mdm-cont (recipes/arithmetic-adapted.sh) made block-causal, 600
#                    steps, lr 1e-4 (89.5%);
#   blocks-mdm-cont: blocks-mdm continued 400 steps at half the learning rate (88.0% vs 89.5%: not bundled);
#   blocks-mdm-long: blocks-mdm continued 1,200 steps at its learning rate on a new data order (94.0%): the
#                    bundled illada-arithmetic;
#   blocks-ar:       the aligned AR twin adapted directly, 300 steps, lr 3e-4 (87.0%);
#   blocks-ar-long:  the same for 1,000 steps (91.0%).
# Evaluated on the fixed canvas of 96 in blocks of 8 with the committed cache (exact here). Resumable: rerun after
# a stop.   bash recipes/arithmetic-blocks.sh   (two runs at a time, one thread each; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
EXPORT=src/illada/assets/models/illada-arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
[ -d $RUN/adapted-mdm-cont/checkpoints ] || bash recipes/arithmetic-adapted.sh
$ILLADA train recipes/arithmetic-blocks-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-blocks-ar.yaml --no-progress &
wait
$ILLADA train recipes/arithmetic-blocks-mdm-cont.yaml --no-progress &
$ILLADA train recipes/arithmetic-blocks-mdm-long.yaml --no-progress &
wait
$ILLADA train recipes/arithmetic-blocks-ar-long.yaml --no-progress
for model in blocks-mdm blocks-mdm-cont blocks-mdm-long blocks-ar blocks-ar-long; do
  $ILLADA eval --model $RUN/$model --task gsm8k --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 96 \
    --fixed-length --block-length 8 --steps 96 --cache committed --limit 200 --batch-size 16 --no-progress \
    --out $RUN/$model/eval
done
MDM=$RUN/blocks-mdm-long
$ILLADA convert "$MDM/checkpoints/$(cat $MDM/checkpoints/latest)" $EXPORT --dtype bf16 --force
cp $MDM/{metrics.jsonl,train_config.json,loss.png} $EXPORT/
# the card quotes the proof table: run `python benchmarks/proof.py --out docs/proof --grid-task arithmetic-blocks` first
.venv/bin/python recipes/arithmetic_card.py --stages $RUN/aligned-ar $RUN/adapted-mdm $RUN/adapted-mdm-cont \
  $RUN/blocks-mdm $MDM --model $EXPORT --results docs/proof/results.json
