#!/usr/bin/env bash
# The state-tracking experiment end to end on one GPU (~5 minutes on an H200): S₅ data, M²RNN and its two
# baselines trained side by side on the one GPU through the same harness, evaluation at 1, 2, 4, 8, 16 times the
# training length, then the table (state_tracking.md) and the plot (state_tracking.png, needs matplotlib).
#   bash run_state_tracking.sh
# Each run takes config/state_tracking.py's 15,000 steps; alone on an H200 the M²RNN run takes ~11 ms per step.
set -euo pipefail
cd "$(dirname "$0")"

# S5 from its two generators (a transposition and a 5-cycle), every training row 64 long: data/s5_gen/
python prepare_data.py --dataset=s5 --generators=gen --train_min_len=64 --train_max_len=64 --n_train=200000

python train.py config/state_tracking.py > out-st-m2rnn.log 2>&1 &
python train.py config/state_tracking.py config/state_tracking_gpt.py > out-st-gpt.log 2>&1 &
python train.py config/state_tracking.py config/state_tracking_linear.py > out-st-linear.log 2>&1 &
wait

for run in out-st-m2rnn out-st-gpt out-st-linear; do
    grep -E "^iter [0-9]+: train" $run.log | tail -n 1
    python eval_state_tracking.py --out_dir=$run
done
python eval_state_tracking.py --plot out-st-m2rnn out-st-gpt out-st-linear --png=state_tracking.png \
    --md=state_tracking.md || echo "(no plot: see the message above; the table is in state_tracking.md)"
