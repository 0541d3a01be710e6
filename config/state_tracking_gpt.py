# Baseline for config/state_tracking.py: the same harness, depth and width with attention (RoPE) in both layers
# instead of M²RNN.
#   python train.py config/state_tracking.py config/state_tracking_gpt.py
out_dir = "out-st-gpt"
n_layer = 2
layer_pattern = "AA"
pos_encoding = "rope"
