#!/usr/bin/env bash
# RL on addition/subtraction from the add/sub MDM stopped early (START, a checkpoint of recipes/addsub-mdm.yaml whose
# held-out accuracy is in the 60-75% band): coupled with and without the KL term, then mean-field and ELBO, two at
# a time (one thread each); then the report (docs/rl/addsub.md). Resumable.   bash recipes/addsub-rl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ILLADA=${ILLADA:-.venv/bin/illada}
export OMP_NUM_THREADS=${THREADS:-1}
RUN=runs/addsub
START=${START:-$RUN/mdm/checkpoints/step-00000750}
bash recipes/addsub.sh  # the data and the MDM (returns at once when done)
[ -e $RUN/rl-start ] || cp -r "$START" $RUN/rl-start
$ILLADA rl recipes/addsub-rl.yaml --init-from $RUN/rl-start --no-progress &
$ILLADA rl recipes/addsub-rl.yaml --init-from $RUN/rl-start --out-dir $RUN/rl-coupled-kl --kl-coef 0.05 --no-progress &
wait
$ILLADA rl recipes/addsub-rl.yaml --init-from $RUN/rl-start --out-dir $RUN/rl-mean-field --estimator mean_field \
  --no-progress &
$ILLADA rl recipes/addsub-rl.yaml --init-from $RUN/rl-start --out-dir $RUN/rl-elbo --estimator elbo --no-progress &
wait
.venv/bin/python benchmarks/rl_report.py --suite addsub --out docs/rl
