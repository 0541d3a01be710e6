# Baseline: an all-attention GPT at the size of config/hybrid.py, with RoPE, on OpenWebText, 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt.py
# one GPU: python train.py config/gpt.py (the same global batch, 40 micro-batches per step on one GPU)
#
# Layers: 12 attention blocks (12 heads of 64), rotary position encoding, pre-norm RMSNorm, SwiGLU MLP, no
# bias, untied embeddings: the blocks of config/hybrid.py with every M²RNN layer replaced by attention.
#
# Batch: 12 sequences x 1024 tokens x 40 micro-batches (5 per GPU x 8 GPUs) = 491,520 tokens per step,
# as nanoGPT's GPT-2 (124M) run; 600,000 steps = 295B tokens. Optimizer: the recipe of config/hybrid.py.

out_dir = "out-gpt"
dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_embd = 768
n_head = 12
layer_pattern = "AAAAAAAAAAAA"
pos_encoding = "rope"
mlp_hidden = 2048

learning_rate = 3e-4
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 60000  # 10%
min_lr = 3e-5
betas = (0.9, 0.95)
eps = 1e-10
weight_decay = 0.1
grad_clip = 1.0
ddp_bucket_cap_mb = 25  # PyTorch's default: the all-reduce overlaps the backward (the M²RNN configs take one bucket)

eval_interval = 1000
eval_iters = 200
log_interval = 10
