#!/usr/bin/env bash
# Reproduces the bundled demo model `illada-shakespeare-tiny` from the plays in data/shakespeare.
#   bash recipes/shakespeare-tiny.sh            (STEPS=... to change the length; resumable: rerun after a stop)
# Writes runs/shakespeare/{tokenizer,data,pretrain}; exports bf16 weights to src/illada/assets/models/.
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
RUN=runs/shakespeare
EXPORT=src/illada/assets/models/illada-shakespeare-tiny

[ -f $RUN/tokenizer/tokenizer.json ] || $ILLADA tokenizer train data/shakespeare/*.txt --vocab-size 8192 --out $RUN/tokenizer
[ -f $RUN/data/manifest.json ] || $ILLADA prepare data/shakespeare/*.txt --tokenizer $RUN/tokenizer --out $RUN/data
$ILLADA train recipes/shakespeare-tiny.yaml ${STEPS:+--steps $STEPS}
$ILLADA convert "$RUN/pretrain/checkpoints/$(cat $RUN/pretrain/checkpoints/latest)" $EXPORT --dtype bf16 --force
cp $RUN/pretrain/{metrics.jsonl,train_config.json,loss.png} $EXPORT/
${PYTHON:-.venv/bin/python} recipes/model_card.py --run $RUN/pretrain --model $EXPORT
