"""
Sample from a trained model, streaming the text as it is generated.

    python sample.py                                   # out/ckpt.pt, 3 samples from "\\n"
    python sample.py --out_dir=out-tiny --start="def " --num_samples=1 --max_new_tokens=2000
    python sample.py --start=FILE:prompt.txt --temperature=0   # prompt from a file, greedy decoding

Generation uses the cached path (GPT.generate): M²RNN layers carry an O(1) state, attention layers a
KV cache of block_size positions. The tokenizer is the one the training data was prepared with:
the checkpoint's config["dataset"] (and "data_root", default data/) -> data/<dataset>/meta.json ->
prepare_data.get_tokenizer.
"""
import json
import os
import sys
from contextlib import nullcontext

import torch

import prepare_data
import train
from model import GPT

# -----------------------------------------------------------------------------
out_dir = "out"  # directory holding ckpt.pt (written by train.py)
start = "\n"  # the prompt, or "FILE:path" to read it from a file; "" starts from the end-of-text token
num_samples = 3  # samples, one after another
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 unchanged, < 1 sharper, > 1 more random, 0 greedy (argmax)
top_k = 200  # sample among the top_k most likely tokens only; None: all of them
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:1', ...
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or 'float16'
# -----------------------------------------------------------------------------


# --key=value overrides, checked by train.py's configurator against the defaults above
SETTINGS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (int, float, str)}
try:
    globals().update(train.parse_config(sys.argv[1:], defaults=SETTINGS, optional=("top_k",),
                                        choices={"dtype": ("float32", "bfloat16", "float16")}))
    train.checked_device(device)
except train.SetupError as e:
    sys.exit(f"error: {e}")

if top_k is not None and top_k < 1 or temperature < 0:
    sys.exit(f"error: top_k must be at least 1 (or None: all tokens) and temperature at least 0 (0: greedy), "
             f"got top_k={top_k!r}, temperature={temperature!r}")
torch.manual_seed(seed)
torch.cuda.manual_seed_all(seed)
device_type = "cuda" if "cuda" in device else "cpu"
ptdtype = getattr(torch, dtype)
ctx = nullcontext() if device_type == "cpu" or ptdtype == torch.float32 else \
    torch.autocast(device_type=device_type, dtype=ptdtype)

try:
    model, ckpt = GPT.from_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
except (FileNotFoundError, ValueError) as e:
    sys.exit(str(e))

# the tokenizer the data was prepared with
train_config = ckpt.get("config") or {}
dataset = train_config.get("dataset")
data_dir = prepare_data.dataset_dir(train_config.get("data_root", "data"), str(dataset))  # as train.py found it
meta_path = os.path.join(data_dir, "meta.json")
if dataset is None or not os.path.isfile(meta_path):
    sys.exit(f"cannot find the tokenizer: the checkpoint's dataset is {dataset!r} and {meta_path} does not "
             f"exist (run prepare_data.py for that dataset first)")
with open(meta_path) as f:
    meta = json.load(f)
if meta.get("kind") != "text":
    sys.exit(f"{meta_path}: dataset kind {meta.get('kind')!r} is not text; nothing to sample "
             f"(state-tracking models are evaluated by train.py)")
try:
    tok = prepare_data.get_tokenizer(meta["tokenizer"])
except RuntimeError as e:  # prepare_data.PrepareError: no tiktoken, no network, ...
    sys.exit(str(e))

if start.startswith("FILE:"):
    if not os.path.isfile(start[5:]):
        sys.exit(f"error: --start={start}: no such file")
    with open(start[5:], encoding="utf-8") as f:
        start = f.read()
start_ids = tok.encode(start) or [tok.eot]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :]  # (1,S)

with ctx:
    for k in range(num_samples):
        ids, shown = [], ""
        print(start, end="", flush=True)
        for idx_next in model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k):
            ids.append(idx_next.item())
            text = tok.decode(ids).rstrip("\ufffd")  # hold back a multi-byte character cut so far
            print(text[len(shown):], end="", flush=True)
            shown = text
        print(tok.decode(ids)[len(shown):])
        print("---------------")
