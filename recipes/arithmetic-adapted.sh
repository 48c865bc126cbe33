#!/usr/bin/env bash
# Semi-autoregressive arithmetic MDMs on the aligned working, from models of recipes/arithmetic-aligned.sh (the
# bundled `illada-arithmetic` is made block-causal from adapted-mdm-cont by recipes/arithmetic-blocks.sh):
#   adapted-mdm:         the AR twin's weights, attention opened both ways with Dream's shift (adapt_causal), then
#                        semi-AR SFT pairs (blocks <= 16, lr 3e-4, 1,500 steps);
#   adapted-mdm-cont:    adapted-mdm continued (blocks <= 8, lr 1e-4, 1,200 steps): bundled until block-causal;
#   adapted-mdm-b8(-lr75): the AR twin adapted directly with blocks <= 8 at lr 1.5e-4 (7.5e-5), 1,200 steps;
#   semiar-mdm:          the control, the aligned MDM trained from scratch continued with the same semi-AR rows.
# Evaluated on LLaDA's fixed canvas decoded in blocks of 8 (the canvas they were trained on); the proof table
# (benchmarks/proof.py) holds the same cells. Resumable: rerun after a stop.
#   bash recipes/arithmetic-adapted.sh   (two runs at a time, one thread each; THREADS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/arithmetic
export OMP_NUM_THREADS=${THREADS:-1}
[ -d $RUN/aligned-ar/checkpoints ] && [ -d $RUN/aligned-mdm/checkpoints ] || bash recipes/arithmetic-aligned.sh
$ILLADA train recipes/arithmetic-adapted-mdm.yaml --no-progress &
$ILLADA train recipes/arithmetic-semiar-mdm.yaml --no-progress &
wait
$ILLADA train recipes/arithmetic-adapted-mdm-cont.yaml --no-progress &
$ILLADA train recipes/arithmetic-adapted-mdm-b8.yaml --no-progress &
wait
$ILLADA train recipes/arithmetic-adapted-mdm-b8-lr75.yaml --no-progress
for model in adapted-mdm adapted-mdm-cont adapted-mdm-b8 adapted-mdm-b8-lr75 semiar-mdm; do
  $ILLADA eval --model $RUN/$model --task gsm8k --data $RUN/test.jsonl --num-fewshot 0 --max-new-tokens 96 \
    --fixed-length --block-length 8 --steps 96 --limit 200 --batch-size 16 --no-progress --out $RUN/$model/eval
done
# RL from adapted-mdm-cont (measured: no gain in 60 steps; README, RL section)
[ -f $RUN/rl-train.jsonl ] || $ILLADA tasks make arithmetic --split train --format eval --n 4000 --seed 11 \
  --out $RUN/rl-train.jsonl
$ILLADA rl recipes/arithmetic-rl.yaml --no-progress
