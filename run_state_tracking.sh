#!/usr/bin/env bash
# The state-tracking experiment end to end on one GPU: S₅ data, M²RNN and its two baselines (trained side by
# side on the one GPU), evaluation by length, plot and table.
#   bash run_state_tracking.sh            # writes state_tracking.png and state_tracking.md
set -euo pipefail
cd "$(dirname "$0")"
python prepare_data.py --dataset=s5
python train.py config/state_tracking.py > out-st-m2rnn.log 2>&1 &
python train.py config/state_tracking.py config/state_tracking_gpt.py > out-st-gpt.log 2>&1 &
python train.py config/state_tracking.py config/state_tracking_linear.py > out-st-linear.log 2>&1 &
wait
for run in out-st-m2rnn out-st-gpt out-st-linear; do
    tail -n 3 $run.log
    python eval_state_tracking.py --out_dir=$run
done
python eval_state_tracking.py --plot out-st-m2rnn out-st-gpt out-st-linear --png=state_tracking.png --md=state_tracking.md
