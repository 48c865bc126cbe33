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
# the AR twin adapted to diffusion (measured: forward 42%, reverse and infill 0%)
$ILLADA train recipes/reversal-adapted-mdm.yaml --no-progress
# twins on a BPE trained on the facts: every name one token, every fact 8 tokens
[ -f $RUN/train.txt ] || .venv/bin/python -c "import json, sys; [print(json.loads(l)['text']) for l in open(sys.argv[1])]" \
  $RUN/train.jsonl > $RUN/train.txt
[ -f $RUN/tokenizer-bpe/tokenizer.json ] || $ILLADA tokenizer train $RUN/train.txt --vocab-size 768 \
  --out $RUN/tokenizer-bpe --quiet
[ -f $RUN/data-bpe/manifest.json ] || $ILLADA prepare $RUN/train.jsonl --tokenizer $RUN/tokenizer-bpe \
  --out $RUN/data-bpe --quiet
$ILLADA train recipes/reversal-bpe-mdm.yaml --no-progress
$ILLADA train recipes/reversal-bpe-ar.yaml --no-progress
$ILLADA train recipes/reversal-bpe-mdm-long.yaml --no-progress
