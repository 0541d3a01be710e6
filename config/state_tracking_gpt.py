# Baseline for config/state_tracking.py: the same harness and size with attention (RoPE) instead of M²RNN.
#   python train.py config/state_tracking.py config/state_tracking_gpt.py
out_dir = "out-st-gpt"
layer_pattern = "AA"
pos_encoding = "rope"
