# CPU quick start: a small hybrid on the offline default dataset (Python standard library source, byte tokens).
#   python prepare_data.py && python train.py config/tiny.py && python sample.py --out_dir=out-tiny
#
# 4 blocks, attention at layer 2 (0-based), M²RNN elsewhere; d = 128; M²RNN H = 8 heads of K = 16 x V = 16.
# Batch: 16 sequences x 128 bytes = 2,048 tokens per step; 100 steps = 205k tokens (the dataset has 7.2M).
# Measured on 2 busy CPU cores: 1.5-1.8 s per step, 3.3 minutes in all; val loss 5.53 -> 1.76.

out_dir = "out-tiny"
dataset = "pystdlib"
batch_size = 16
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_embd = 128
n_head = 4
layer_pattern = "MMAM"
pos_encoding = "none"
m2rnn_heads = 8
m2rnn_k_dim = 16
m2rnn_v_dim = 16
mlp_hidden = 512

learning_rate = 2e-3  # a small model takes a larger step
max_iters = 100
warmup_iters = 10  # 10%
min_lr = 2e-4
eval_interval = 50
eval_iters = 10
log_interval = 10

device = "cpu"
compile = False
threads = 1  # about as fast as 2 threads for a model this small, and steady when another program shares the
             # cores (2 threads then ran 4-30x slower: each waits for the other)
