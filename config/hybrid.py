# Hybrid M²RNN at GPT-2-small scale on OpenWebText (python prepare_data.py --dataset=openwebtext), 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/hybrid.py
# one GPU: python train.py config/hybrid.py (the same global batch, 40 micro-batches per step on one GPU)
#
# Layers: 12 blocks, attention at layers 2 and 10 (0-based), M²RNN everywhere else. This is the paper's
# 24-layer hybrid (attention at 4, 12, 20: 1 attention layer per 7 M²RNN layers) scaled down to 12 layers;
# no position encoding in the attention layers, as in the paper's hybrids (the recurrent layers carry position).
# M²RNN: H = 64 heads of K = 64 rows x V = 16 columns, one q and one k head shared by all heads (Hq = Hk = 1);
# state width H·V = 1024, state per layer H·K·V = 65,536 numbers.
#
# Batch: 12 sequences x 1024 tokens x 40 micro-batches (5 per GPU x 8 GPUs) = 491,520 tokens per step,
# as nanoGPT's GPT-2 (124M) run; 600,000 steps = 295B tokens. Optimizer: the paper's recipe (AdamW lr 3e-4,
# betas (0.9, 0.95), eps 1e-10, weight decay 0.1, 10% warmup, cosine decay).

out_dir = "out-hybrid"
dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_embd = 768
n_head = 12
layer_pattern = "MMAMMMMMMMAM"
pos_encoding = "none"
m2rnn_heads = 64
m2rnn_k_dim = 64
m2rnn_v_dim = 16
m2rnn_q_heads = 1
m2rnn_k_heads = 1
# the backward reads every state the forward kept, not recomputing them: 5-12% faster a layer, for 1.5 GiB a layer
# (peak memory at batch 12 ~28-31 GiB a GPU instead of ~13; set False on a smaller GPU)
m2rnn_store_states = True
mlp_hidden = 2048  # SwiGLU: 3 matrices of 768 x 2048, as many weights as GPT-2's 4x MLP
# DDP: all gradients in one bucket, all-reduced after the backward instead of beside it. NCCL's kernels beside
# the M²RNN backward take SM room its grid needs, and its last programs then run as a second wave (notes_throughput.md,
# 15th session); on 2 x H200 this setting gave 1.82-1.84x one GPU's tokens/s where PyTorch's 25 MiB gave 1.58-1.81x
ddp_bucket_cap_mb = 1000

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
