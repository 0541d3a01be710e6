# Baseline for config/state_tracking.py: the same harness and width with attention (RoPE) instead of M²RNN; two
# layers, since one attention layer cannot compose anything.
#   python train.py config/state_tracking.py config/state_tracking_gpt.py
out_dir = "out-st-gpt"
n_layer = 2
layer_pattern = "AA"
pos_encoding = "rope"
