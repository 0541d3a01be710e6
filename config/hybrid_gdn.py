# Hybrid Gated DeltaNet, the paper's baseline, at the size of config/hybrid.py, on OpenWebText, 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/hybrid_gdn.py
# one GPU: python train.py config/hybrid_gdn.py (the same global batch, 40 micro-batches per step on one GPU)
# On CUDA the GDN layers run flash-linear-attention's kernels (pip install flash-linear-attention; on Hopper with
# Triton < 3.7.1 its backward also needs tilelang); the model's gdn_impl="torch" is a slow fallback (a PyTorch loop).
#
# Layers: 12 blocks, attention at layers 2 and 10 (0-based) as in config/hybrid.py, Gated DeltaNet everywhere
# else; no position encoding. GDN (Yang et al., arXiv 2412.06464, as flash-linear-attention's layer): Hg = 2 heads
# of Kg = 192 x Vg = 384, the paper's 400M layer shape (2 heads of 256 x 512 at d = 1024) scaled to d = 768;
# state per layer Hg·Kg·Vg = 147,456 numbers (config/hybrid.py's M²RNN layers: 65,536).
# Parameters: 123.68M without the token embedding, config/hybrid.py 125.28M (-1.3%): a GDN layer has
# 2.37M weights, an M²RNN layer 2.53M.
#
# Batch and optimizer: as config/hybrid.py (491,520 tokens per step; AdamW lr 3e-4, betas (0.9, 0.95),
# eps 1e-10, weight decay 0.1 (none on A_log, dt_bias), 10% warmup, cosine decay).

out_dir = "out-hybrid-gdn"
dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_embd = 768
n_head = 12
layer_pattern = "GGAGGGGGGGAG"
pos_encoding = "none"
gdn_heads = 2
gdn_k_dim = 192  # n_embd / 4, as the paper's 256 at d = 1024
gdn_v_dim = 384  # 2·Kg
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
