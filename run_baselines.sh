#!/usr/bin/env bash
# Issue 7's small-scale comparison: GPT, Hybrid M²RNN, Hybrid Gated DeltaNet and Hybrid GDN + one M²RNN layer
# (config/gpt.py, hybrid.py, hybrid_gdn.py, hybrid_gdn_m2rnn.py) trained on the same tokens with the same budget,
# one model per GPU, all at once; then the table and the plot (compare_runs.py).
#
#   bash run_baselines.sh                               # all four, on a 4-GPU machine: ~7.5 minutes
#   bash run_baselines.sh gpt hybrid                    # some of them (names of config/*.py)
#   ITERS=1000 RUN_LIMIT=480 bash run_baselines.sh      # another budget; stop any run still going after 480 s
#
# Data: pystdlib (python prepare_data.py: the Python standard library's source, byte tokens, vocab 257, ~7.2M
# training tokens, offline: GPU machines without network cannot fetch OpenWebText). With 257 tokens instead of
# GPT-2's 50,304 the output layer is 0.2M instead of 38.6M weights, so the models have 85-87M parameters
# without the embedding (gpt 85.15M, hybrid 86.85M, hybrid_gdn 85.25M, hybrid_gdn_m2rnn 85.41M), not ~124M.
# Budget: ITERS steps (default 3000) of 12 x 1024 tokens (no accumulation): 36.9M tokens, ~5 passes over the data;
# lr 6e-4 peak, 10% warmup, cosine to 6e-5; evaluation every ITERS/10 steps on 20 batches (the same batches for
# every model and every evaluation). Seed 1337 (train.py's default; SEED=... for another): every model draws the
# same batches in the same order.
#
# Timing (4 x H200, 2026-11-28): per step GPT 23 ms, the hybrid 76 ms, the GDN hybrids ~75 ms; the GDN runs first
# spend ~3 minutes in fla's autotuning and tilelang's compilation (~1 minute for the others): ~5 minutes for the
# hybrid, ~7.5 for the GDN hybrids, all four in parallel.
# Fewer GPUs than models: the runs share them (GPU = position mod number of GPUs) and take longer; lower ITERS.
# GDN on CUDA needs flash-linear-attention, and on Hopper with Triton < 3.7.1 also tilelang (README, GDN section).
set -euo pipefail
cd "$(dirname "$0")"

MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(gpt hybrid hybrid_gdn hybrid_gdn_m2rnn)
ITERS=${ITERS:-3000}
SEED=${SEED:-1337}
RUN_LIMIT=${RUN_LIMIT:-0}  # seconds after which a run still going is stopped (its log so far is kept); 0 = never
EXTRA=${EXTRA:-}  # more train.py settings, after the ones below (e.g. a CPU smoke test: see test notes in notes_gdn.md)
N_GPUS=${N_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "$N_GPUS" -gt 0 ] || { echo "error: no GPU found (nvidia-smi -L); N_GPUS=1 to run anyway"; exit 1; }
TAG=$([ "$SEED" = 1337 ] && echo "" || echo "-s$SEED")  # out dirs and assets of other seeds get a suffix
declare -A LABEL=([gpt]="GPT" [hybrid]="Hybrid M²RNN" [hybrid_gdn]="Hybrid GDN"
                 [hybrid_gdn_m2rnn]="Hybrid GDN + M²RNN")
export PYTHONUNBUFFERED=1

# versions; and the GDN configs need flash-linear-attention on CUDA: fail now, not after the other runs started
python - "${MODELS[@]}" <<'EOF'
import importlib.metadata, sys
import torch
import train
def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"
print(", ".join(f"{p} {version(p)}" for p in ("torch", "triton", "flash-linear-attention", "tilelang")))
try:
    gdn = [name for name in sys.argv[1:] if "G" in train.parse_config([f"config/{name}.py"])["layer_pattern"]]
except train.SetupError as e:
    sys.exit(f"error: {e} (models are names of config/*.py)")
if gdn and torch.cuda.is_available():
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: {', '.join(gdn)} need flash-linear-attention on CUDA (and tilelang on Hopper with "
                 f"Triton < 3.7.1): {e}")
EOF

python prepare_data.py  # data/pystdlib, a few seconds

COMMON=(--dataset=pystdlib --batch_size=12 --block_size=1024 --gradient_accumulation_steps=1
        --max_iters=$ITERS --lr_decay_iters=$ITERS --warmup_iters=$((ITERS / 10)) --eval_interval=$((ITERS / 10))
        --eval_iters=20 --learning_rate=6e-4 --min_lr=6e-5 --log_interval=10 --always_save_checkpoint=False
        --seed=$SEED)
limit=$([ "$RUN_LIMIT" -gt 0 ] && echo "timeout $RUN_LIMIT" || true)
PIDS=() DIRS=() LABELS=()
for i in "${!MODELS[@]}"; do
    name=${MODELS[$i]}
    dir=out-bl-${name//_/-}$TAG
    mkdir -p "$dir"
    CUDA_VISIBLE_DEVICES=$((i % N_GPUS)) $limit python train.py "config/$name.py" "${COMMON[@]}" $EXTRA \
        --out_dir="$dir" > "$dir/train.log" 2>&1 &
    PIDS+=($!) DIRS+=("$dir") LABELS+=("${LABEL[$name]:-$name}")
    echo "started $name on GPU $((i % N_GPUS)): $dir/train.log"
done

DONE=()  # runs with a log.jsonl, finished or not
for i in "${!PIDS[@]}"; do
    if wait "${PIDS[$i]}"; then
        echo "${DIRS[$i]}: $(grep -E "^iter [0-9]+: loss" "${DIRS[$i]}/train.log" | tail -n 1 || true)"
    else
        echo "${DIRS[$i]}: FAILED or stopped (exit $?); the end of its log:"
        tail -n 15 "${DIRS[$i]}/train.log"
    fi
    if [ -f "${DIRS[$i]}/log.jsonl" ]; then DONE+=("$i"); fi
done
[ ${#DONE[@]} -gt 0 ] || { echo "error: no run wrote a log.jsonl"; exit 1; }

labels=$(for i in "${DONE[@]}"; do echo "${LABELS[$i]}"; done | paste -sd, -)
python compare_runs.py $(for i in "${DONE[@]}"; do echo "${DIRS[$i]}"; done) --labels="$labels" \
    --png="assets/baselines$TAG.png" --md="assets/baselines$TAG.md"
