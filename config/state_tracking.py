# S5 word problem with M²RNN, the length-generalisation experiment (run_state_tracking.sh runs all of it):
#   python prepare_data.py --dataset=s5 --train_min_len=64 --train_max_len=64 --n_train=500000
#   python train.py config/state_tracking.py
#   python eval_state_tracking.py --out_dir=out-st-m2rnn     # accuracy at 64, 128, 256, 512, 1024
# The baselines use this harness with other model settings only: config/state_tracking_gpt.py (attention with
# RoPE) and config/state_tracking_linear.py (the linear ablation: no tanh, W = 0, a gated linear-attention layer).
#
# Task: x_t is one of the 120 permutations of 5 points, the target at t is (the class of) x_1 o x_2 o ... o x_t.
# Every row has 64 inputs, so every prefix length 1..64 is trained; evaluation goes to 16x that (1024).
# Model: 2 M²RNN blocks (no attention, no position encoding), d = 128; M²RNN H = 8 heads of K = 16 x V = 32,
# one shared q and k head; conv kernel 1, so that the state, not a window of the last inputs, carries the
# product. A row of a head is a V-wide tanh RNN; it needs room for the action of S5 on 5 points (hence V = 32).
# Batch: 256 rows x 64 = 16,384 targets per step. On CUDA the recurrence runs in the Triton kernel.

out_dir = "out-st-m2rnn"
dataset = "s5"
batch_size = 256
block_size = 64
gradient_accumulation_steps = 1

n_layer = 2
n_embd = 128
n_head = 4
layer_pattern = "MM"
pos_encoding = "none"
m2rnn_heads = 8
m2rnn_k_dim = 16
m2rnn_v_dim = 32
m2rnn_q_heads = 1
m2rnn_k_heads = 1
m2rnn_conv_size = 1
mlp_hidden = 512

learning_rate = 3e-3
max_iters = 20000
warmup_iters = 500
min_lr = 3e-4
weight_decay = 0.0
eval_interval = 2000
eval_iters = 2  # 2 x 256 rows per evaluation length during training; eval_state_tracking.py uses all 1000
log_interval = 200

compile = False  # small kernels, and 5 evaluation lengths: compiling costs more than it saves here
