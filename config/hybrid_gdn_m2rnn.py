# Hybrid Gated DeltaNet with one M²RNN layer (spec §2: the cheap way to add state tracking to a GDN hybrid), at the
# size of config/hybrid.py, on OpenWebText, 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/hybrid_gdn_m2rnn.py
# one GPU: python train.py config/hybrid_gdn_m2rnn.py (the same global batch, 40 micro-batches per step on one GPU)
# On CUDA the GDN layers need flash-linear-attention (see config/hybrid_gdn.py), the M²RNN layer runs our kernel.
#
# Layers: config/hybrid_gdn.py with M²RNN at layer 0: M²RNN at 0, attention at 2 and 10 (0-based), Gated DeltaNet
# at the other 9; no position encoding. GDN: Hg = 2 heads of Kg = 192 x Vg = 384, state per layer 147,456 numbers.
# M²RNN: H = 64 heads of K = 64 x V = 16 (Hq = Hk = 1), state per layer H·K·V = 65,536 numbers, as config/hybrid.py.
# Parameters: 123.84M without the token embedding, config/hybrid.py 125.28M (-1.1%).
#
# Batch and optimizer: as config/hybrid.py (491,520 tokens per step; AdamW lr 3e-4, betas (0.9, 0.95),
# eps 1e-10, weight decay 0.1 (none on A_log, dt_bias, D), 10% warmup, cosine decay).

out_dir = "out-hybrid-gdn-m2rnn"
dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_embd = 768
n_head = 12
layer_pattern = "MGAGGGGGGGAG"
pos_encoding = "none"
gdn_heads = 2
gdn_k_dim = 192  # n_embd / 4, as the paper's 256 at d = 1024
gdn_v_dim = 384  # 2·Kg
m2rnn_heads = 64
m2rnn_k_dim = 64
m2rnn_v_dim = 16
m2rnn_q_heads = 1
m2rnn_k_heads = 1
mlp_hidden = 2048  # SwiGLU: 3 matrices of 768 x 2048, as many weights as GPT-2's 4x MLP

learning_rate = 3e-4
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 60000  # 10%
min_lr = 3e-5
betas = (0.9, 0.95)
eps = 1e-10
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10
