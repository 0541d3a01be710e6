# Baseline for config/state_tracking.py: the linear ablation of M²RNN (tanh removed, W fixed at 0: a gated
# linear-attention layer), otherwise identical.
#   python train.py config/state_tracking.py config/state_tracking_linear.py
out_dir = "out-st-linear"
m2rnn_linear = True
