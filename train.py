"""
Train a language model of M²RNN and attention layers (model.py), nanoGPT style.

    python train.py config/tiny.py                           # CPU quick start (after `python prepare_data.py`)
    python train.py config/hybrid.py --batch_size=8 --compile=False   # one GPU, settings overridden
    torchrun --standalone --nproc_per_node=8 train.py config/hybrid.py   # 8 GPUs of one node (DDP)
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 \\
        train.py config/hybrid.py                            # 2 nodes: run this on each, --node_rank=0 and 1
    python train.py config/tiny.py --init_from=resume --max_iters=2000   # continue a run from out_dir/ckpt.pt

Settings: the block below holds every setting with its default. Positional arguments are config files
(plain Python assignments, applied in order); then `--key=value` overrides one setting. A value is read as a
Python literal (`--betas=(0.9,0.99)`, `--compile=False`), or as text when it is not one (`--dataset=s5`).
Unknown names and values of the wrong type are errors. `python train.py --help` lists the settings.

Data: data/<dataset>/ as prepare_data.py writes it. meta.json's "kind" picks the batches: 'text' takes
windows of block_size tokens at random offsets of train.bin / val.bin; 'state_tracking' takes whole rows of
train_x.npy / train_y.npy (y = -1 is ignored) and also reports per-position accuracy at every eval length.

Output, in out_dir: ckpt.pt (model, optimizer, settings, iteration, RNG states incl. the data sampler's: a
resumed run continues exactly where it stopped) and log.jsonl (one JSON object per start / train / eval event).
"""
import ast
import builtins
import difflib
import json
import math
import os
import random
import sys
import time
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data

# -----------------------------------------------------------------------------------------------------------
# Settings. Defaults: the GPT-2-small-scale hybrid of config/hybrid.py on OpenWebText, one process.
# I/O
out_dir = "out"  # folder for ckpt.pt and log.jsonl (created if missing)
eval_interval = 2000  # evaluate every this many iterations (and at the end)
eval_iters = 200  # batches per split in an evaluation (state tracking: rows = eval_iters * batch_size at most)
log_interval = 1  # print a training line every this many iterations
eval_only = False  # True: evaluate once and exit
always_save_checkpoint = True  # True: save at every evaluation; False: only when val loss improves (and at the end)
init_from = "scratch"  # 'scratch': a new model; 'resume': continue from out_dir/ckpt.pt
# data
dataset = "openwebtext"  # folder under data_root made by prepare_data.py: 'pystdlib', 'openwebtext', 's5', ...
data_root = "data"  # where datasets live; a relative path is taken from train.py's folder, as prepare_data.py does
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step, summed over all processes
batch_size = 12  # sequences per micro-batch (per process)
block_size = 1024  # tokens per sequence (text); state tracking uses its rows' length, which must fit in it
# model (model.GPTConfig; vocab_size comes from the dataset's meta.json)
n_layer = 12  # number of blocks
n_embd = 768  # model width d
n_head = 12  # attention heads (attention layers only)
layer_pattern = "MMAMMMMMMMAM"  # one letter per layer: 'A' attention, 'M' M²RNN, 'G' Gated DeltaNet
pos_encoding = "none"  # attention position encoding: 'rope', 'none' (paper's hybrids), 'auto' (rope iff all 'A')
m2rnn_heads = 64  # H: M²RNN heads per layer
m2rnn_k_dim = 64  # K: rows of each head's state (key dim)
m2rnn_v_dim = 16  # V: columns of each head's state (value dim)
m2rnn_q_heads = 1  # Hq: query heads, shared by groups of heads (divides m2rnn_heads)
m2rnn_k_heads = 1  # Hk: key heads, shared by groups of heads (divides m2rnn_heads)
m2rnn_conv_size = 4  # kernel of the causal depthwise conv on q, k, v
m2rnn_grad_clip = 1.0  # clamp of the state gradient in the M²RNN backward (c in the spec's section 3); 0 = off
m2rnn_impl = "auto"  # recurrence: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'
m2rnn_linear = False  # ablation: True removes the tanh and fixes W = 0 (a linear RNN)
m2rnn_store_states = False  # True: the kernel keeps every state for its backward (faster; ~B·S·H·K·V numbers/layer)
gdn_heads = 2  # Hg: Gated DeltaNet ('G' layers) heads
gdn_k_dim = 192  # Kg: key dim of each GDN head (n_embd / 4 here, as the paper's 256 at d = 1024)
gdn_v_dim = 384  # Vg: value dim of each GDN head (2·Kg)
gdn_conv_size = 4  # kernel of the GDN layer's causal depthwise conv on q, k, v
gdn_impl = "auto"  # GDN recurrence: 'auto' (flash-linear-attention on CUDA, PyTorch on CPU), 'fla' or 'torch'
mlp_hidden = 2048  # SwiGLU hidden size
rope_theta = 10000.0  # RoPE base (pos_encoding='rope' only)
dropout = 0.0  # dropout rate; 0.0 for pretraining, try 0.1+ when fine-tuning
# optimizer: AdamW with linear warmup and cosine decay (the paper's recipe: lr 3e-4, betas (0.9, 0.95), wd 0.1)
learning_rate = 3e-4  # peak learning rate
max_iters = 600000  # optimizer steps in all
weight_decay = 0.1  # AdamW weight decay (model.configure_optimizers exempts gains, biases, A_log, dt_bias, D)
betas = (0.9, 0.95)  # AdamW betas
eps = 1e-10  # AdamW epsilon
grad_clip = 1.0  # clip the gradient's global norm at this value; 0 = off
decay_lr = True  # False: constant learning_rate
warmup_iters = -1  # linear warmup steps; -1 = 10% of lr_decay_iters
lr_decay_iters = 0  # steps of cosine decay down to min_lr; 0 = max_iters
min_lr = 3e-5  # learning rate at the end of the decay, ~learning_rate / 10
# system
device = "auto"  # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a GPU that has it, else float16; float32 on cpu), 'float32', 'bfloat16', 'float16'
compile = "auto"  # torch.compile the model: True, False, or 'auto' (True on cuda, False elsewhere)
backend = "auto"  # DDP backend under torchrun: 'auto' (nccl on cuda, gloo on cpu), 'nccl', 'gloo'
ddp_bucket_cap_mb = 25  # DDP's gradient buckets in MiB (PyTorch's default): each is all-reduced once its gradients
#   are ready, beside the rest of the backward; larger buckets start later and overlap less (the M²RNN configs: 1000)
threads = 0  # torch CPU threads (torch.set_num_threads); 0 = torch's default (one per core)
seed = 1337  # seeds model init, data sampling and dropout
# -----------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}
MODEL_KEYS = ("block_size", "n_layer", "n_embd", "n_head", "layer_pattern", "pos_encoding", "m2rnn_heads",
              "m2rnn_k_dim", "m2rnn_v_dim", "m2rnn_q_heads", "m2rnn_k_heads", "m2rnn_conv_size", "m2rnn_grad_clip",
              "m2rnn_impl", "m2rnn_linear", "m2rnn_store_states", "gdn_heads", "gdn_k_dim", "gdn_v_dim",
              "gdn_conv_size", "gdn_impl", "mlp_hidden", "rope_theta", "dropout")
# settings a resumed run may change (how to train, not what)
TRAINING_KEYS = ("dropout", "m2rnn_impl", "m2rnn_grad_clip", "m2rnn_store_states", "gdn_impl")
CHOICES = {"init_from": ("scratch", "resume"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "backend": ("auto", "nccl", "gloo"), "compile": ("auto", True, False)}
POSITIVE = (  # counts that must be at least 1
    "batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval",
    "ddp_bucket_cap_mb")
CKPT_KEYS = ("model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "tokens_seen", "rng")


class SetupError(RuntimeError):
    """A problem the user can fix (a typo, missing data, a bad checkpoint): printed without a traceback."""


# -----------------------------------------------------------------------------------------------------------
# Configurator: config files, then --key=value overrides, each checked against the defaults above

def _checked(key, value, source, defaults=None, choices=None, optional=()):
    """value for setting key, of its default's type; optional settings may also be None."""
    defaults, choices = defaults or DEFAULTS, CHOICES if choices is None else choices
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SetupError(f"unknown setting {key!r} ({source}).{hint} Valid settings: {', '.join(defaults)}")
    default = defaults[key]
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, float) and type(value) is int:  # 3 is fine where 3.0 is expected
        value = float(value)
    if type(value) is not type(default) and not (key == "compile" and type(value) is bool) and \
            not (key in optional and value is None):
        raise SetupError(f"{key} must be of type {type(default).__name__} like its default {default!r}"
                         f"{' (or None)' if key in optional else ''}, got {value!r} ({type(value).__name__}) ({source})")
    if key in choices and value not in choices[key]:
        raise SetupError(f"{key} must be one of {choices[key]}, got {value!r} ({source})")
    if key in POSITIVE and value < 1:
        raise SetupError(f"{key} must be at least 1, got {value!r} ({source})")
    return value


def parse_config(argv, defaults=None, choices=None, optional=()):
    """Settings from argv: config files (plain assignments) and --key=value overrides, applied in order.
    defaults, choices: train.py's own (DEFAULTS, CHOICES) unless given, as sample.py gives its own;
    optional: settings that may also be set to None."""
    defaults = defaults or DEFAULTS
    cfg = dict(defaults)
    check = lambda key, value, source: _checked(key, value, source, defaults, choices, optional)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")  # split on the first '=' only: --x=a=b sets x to 'a=b'
            if not sep:
                raise SetupError(f"expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # not a Python literal: a string
            if isinstance(cfg.get(key), str) and not isinstance(value, str) and key != "compile":
                value = text  # a string setting takes the text as is (--dataset=123)
            cfg[key] = check(key, value, f"command line {arg!r}")
        else:
            if not os.path.isfile(arg):
                raise SetupError(f"config file not found: {arg}")
            namespace = {}
            with open(arg) as f:
                exec(builtins.compile(f.read(), arg, "exec"), namespace)  # `compile` is a setting here
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    cfg[key] = check(key, value, f"config file {arg}")
    return cfg


def print_settings():
    """The settings block of this file, as documentation."""
    source = open(__file__).read()
    start = source.index("# Settings.")
    print(__doc__.strip() + "\n\n" + source[start:source.index("# ---", start)])


# -----------------------------------------------------------------------------------------------------------
# Data

def prepare_command(dataset, data_root):
    """The prepare_data.py command that makes data_root/dataset."""
    root = "" if data_root == DEFAULTS["data_root"] else f" --data_root={data_root}"
    base = dataset.removesuffix("_gen")
    if dataset == "pystdlib":
        args = ""
    elif base in ("s3", "s5", "a5", "parity", "openwebtext"):
        args = f" --dataset={base}" + (" --generators=gen" if dataset.endswith("_gen") else "")
    else:
        args = f" --dataset=files --input=PATH --name={dataset}"
    return f"python prepare_data.py{args}{root}"


class Batches:
    """Training and evaluation batches from data_dir, by meta.json's kind:
    'text': windows of T + 1 tokens at random offsets of train.bin / val.bin (np.uint16); y = x shifted by one.
    'state_tracking': whole rows of train_x.npy / train_y.npy (x tokens, y classes, y = -1 ignored);
        evaluation uses val_L<n>_x.npy / val_L<n>_y.npy for each n in meta["eval_lens"].
    sample() draws indices (window offsets or row numbers) from a numpy Generator; get() turns them into tensors."""

    def __init__(self, data_dir, block_size, hint):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise SetupError(f"no dataset at {data_dir} (meta.json not found). Make it with: {hint}")
        with open(meta_path) as f:
            self.meta = meta = json.load(f)
        self.kind, self.vocab_size, self.dir = meta["kind"], meta["vocab_size"], data_dir
        files = {"text": ["train.bin", "val.bin"],
                 "state_tracking": ["train_x.npy", "train_y.npy"] +
                 [f"val_L{n}_{a}.npy" for n in meta.get("eval_lens", []) for a in "xy"]}.get(self.kind)
        if files is None:
            raise SetupError(f"{meta_path}: unknown kind {self.kind!r} (expected 'text' or 'state_tracking')")
        missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
        if missing:
            raise SetupError(f"{data_dir} lacks {', '.join(missing)}: make it again with: {hint}")
        if self.kind == "text":
            self.seq_len = block_size
            self.size = {s: os.path.getsize(os.path.join(data_dir, f"{s}.bin")) // 2 - block_size  # window starts
                         for s in ("train", "val")}
            if min(self.size.values()) < 1:
                raise SetupError(f"{data_dir}: train.bin and val.bin need more than block_size={block_size} tokens")
            self.splits = ("train", "val")
        else:
            self.rows = {"train": [np.load(os.path.join(data_dir, f"train_{a}.npy")) for a in "xy"]}
            for n in meta["eval_lens"]:
                self.rows[f"val_L{n}"] = [np.load(os.path.join(data_dir, f"val_L{n}_{a}.npy")) for a in "xy"]
            self.seq_len = self.rows["train"][0].shape[1]
            if self.seq_len > block_size:
                raise SetupError(f"{data_dir}: training rows are {self.seq_len} long: set block_size >= "
                                 f"{self.seq_len}")
            self.size = {s: len(x) for s, (x, y) in self.rows.items()}
            self.splits = tuple(self.rows)

    def sample(self, rng, split, shape):
        return rng.integers(0, self.size[split], size=shape)

    def get(self, split, idx, device):
        if self.kind == "text":  # a new memmap per batch: keeping one open grows memory (nanoGPT's note)
            data = np.memmap(os.path.join(self.dir, f"{split}.bin"), dtype=np.uint16, mode="r")
            x = np.stack([data[i:i + self.seq_len] for i in idx])
            y = np.stack([data[i + 1:i + 1 + self.seq_len] for i in idx])
        else:
            x, y = self.rows[split][0][idx], self.rows[split][1][idx]
        x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        if device.type == "cuda":  # pinned memory: the copy overlaps with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model, data, cfg, autocast, device, rank, world):
    """Mean loss on eval_iters batches of each split; batches are split over the processes, results all-reduced.
    The batches come from a fixed RNG, so every evaluation sees the same ones (and training's RNG is untouched).
    State tracking: loss and per-position accuracy on the first eval_iters * batch_size rows of each eval length;
    'val' is the loss at the first eval length."""
    model.eval()
    rng, B = np.random.default_rng(cfg["seed"] + 1), cfg["batch_size"]
    out, acc = {}, {}
    for split in data.splits:
        if split.startswith("val_L"):
            n_rows = min(data.size[split], cfg["eval_iters"] * B)
            batches = [np.arange(i, min(i + B, n_rows)) for i in range(0, n_rows, B)]
        else:
            batches = list(data.sample(rng, split, (cfg["eval_iters"], B)))
        n_classes = data.meta.get("n_classes", data.vocab_size)
        length = data.rows[split][0].shape[1] if data.kind == "state_tracking" else data.seq_len
        totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, batches
        hits = torch.zeros(2, length, device=device, dtype=torch.float64)  # correct, counted (per position)
        for idx in batches[rank::world]:
            x, y = data.get(split, idx, device)
            with autocast:
                logits, loss = model(x, y)
            totals += torch.stack([loss.double(), torch.ones((), device=device, dtype=torch.float64)])
            if data.kind == "state_tracking":
                counted = y >= 0
                hits[0] += ((logits[..., :n_classes].argmax(-1) == y) & counted).sum(0)
                hits[1] += counted.sum(0)
        if world > 1:
            dist.all_reduce(totals)
            dist.all_reduce(hits)
        out[split] = (totals[0] / totals[1]).item()
        if split.startswith("val_L"):
            acc[split[5:]] = (hits[0] / hits[1].clamp(min=1)).tolist()
    model.train()
    if data.kind == "state_tracking":
        out["val"] = out[f"val_L{data.meta['eval_lens'][0]}"]
        out["acc"] = acc
    return out


# -----------------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, checkpoint):
    """torch.save to a temporary file beside path, fsync, then rename over path: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise SetupError(f"no checkpoint at {path}: init_from='resume' continues a run saved in out_dir "
                         f"(check --out_dir, or start a new run with --init_from=scratch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(f"could not read checkpoint {path}: the file is corrupt or truncated "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SetupError(f"checkpoint {path} is not one of train.py's: it lacks {', '.join(missing)}")
    return ckpt


def rng_states(data_rng, device):
    """This process's RNG states, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data": data_rng.bit_generator.state}


def set_rng_states(states, data_rng, device):
    torch.set_rng_state(states["torch"])
    states["numpy"]["state"]["key"] = np.array(states["numpy"]["state"]["key"], dtype=np.uint32)
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    data_rng.bit_generator.state = states["data"]


# -----------------------------------------------------------------------------------------------------------
# Training

def schedule(cfg):
    """(warmup steps, decay steps) of the learning rate, with their defaults resolved."""
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    return (cfg["warmup_iters"] if cfg["warmup_iters"] >= 0 else decay_iters // 10), decay_iters


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    warmup, decay_iters = schedule(cfg)
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < warmup:
        return cfg["learning_rate"] * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def checked_device(name):
    """torch.device(name), or a SetupError that says what to use instead."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device={name!r} but torch sees no GPU: use --device=cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise SetupError(f"device={name!r} is not a device torch knows: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e


def processes_and_device(cfg):
    """torchrun's processes (one process without it) and this process's device, from the settings cfg ('auto'
    resolved); selects the GPU and sets the CPU threads. Returns ddp, rank, world, device."""
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
                               if ddp else (0, 0, 1))
    name = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = checked_device(name)
    if ddp and name == "cuda":
        device = torch.device(f"cuda:{local_rank}")  # this process's GPU
    if device.type == "cuda" and device.index is not None:  # torch 2.11 refuses a bare "cuda" here
        torch.cuda.set_device(device)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    return ddp, rank, world, device


def init_process_group(cfg, device):
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend)


def wrap_ddp(model, cfg, device, world):
    """The model under DDP when torchrun started several processes (its gradient buckets of cfg's size), else
    the model itself."""
    if world > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   bucket_cap_mb=cfg["ddp_bucket_cap_mb"])
    return model


def resolve_dtype(dtype, device):
    """dtype 'auto': bfloat16 on a GPU that has it, else float16; float32 on the CPU. Other names as given."""
    if dtype != "auto":
        return dtype
    return "float32" if device.type != "cuda" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")


def precision(cfg, device):
    """(dtype name, autocast context, whether to torch.compile) from the settings cfg, 'auto' resolved; TF32
    matmuls on CUDA."""
    dtype = resolve_dtype(cfg["dtype"], device)
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    use_compile = cfg["compile"] if cfg["compile"] != "auto" else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, autocast, use_compile


def train(cfg):
    """Train with the settings cfg (a dict like DEFAULTS). Under torchrun, one call per process."""
    ddp, rank, world, device = processes_and_device(cfg)
    G = cfg["gradient_accumulation_steps"]
    if G % world:
        raise SetupError(f"gradient_accumulation_steps={G} must be a multiple of the number of processes ({world}): "
                         f"each process runs gradient_accumulation_steps / {world} micro-batches per step")
    if ddp:
        init_process_group(cfg, device)
    try:
        _train(cfg, device, rank, world, rank == 0)
        if ddp:  # all processes done (the master may still be writing the checkpoint) before the group goes:
            dist.barrier()  # a process tearing gloo down alone once aborted at exit in CI
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg, device, rank, world, master):
    log = print if master else (lambda *a, **k: None)
    G = cfg["gradient_accumulation_steps"]
    micro_steps = G // world  # per process
    dtype, autocast, use_compile = precision(cfg, device)

    # data: every process draws the same indices (same seed) and keeps its own slice of the global batch
    data = Batches(prepare_data.dataset_dir(cfg["data_root"], cfg["dataset"]), cfg["block_size"],
                   prepare_command(cfg["dataset"], cfg["data_root"]))
    data_rng = np.random.default_rng(cfg["seed"])
    tokens_per_iter = G * cfg["batch_size"] * data.seq_len

    # model and optimizer, new or from out_dir/ckpt.pt
    from model import GPT, GPTConfig
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    model_args = {k: cfg[k] for k in MODEL_KEYS}
    model_args.update(vocab_size=data.vocab_size, m2rnn_grad_clip=cfg["m2rnn_grad_clip"] or None)
    iter_num, best_val_loss, tokens_seen, saved_iter = 0, float("inf"), 0, -1
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_args"]["vocab_size"] != data.vocab_size:
            raise SetupError(f"{ckpt_path} has a vocabulary of {ckpt['model_args']['vocab_size']}, the dataset "
                             f"{data.dir} one of {data.vocab_size}: resume with the dataset it was trained on")
        # the architecture as saved; dropout, the kernels and m2rnn_grad_clip (how to train it) as set now
        saved = dict(ckpt["model_args"], **{k: model_args[k] for k in TRAINING_KEYS})
        changed = {k: (v, saved.get(k)) for k, v in model_args.items() if v != saved.get(k)}
        if changed:
            log(f"resume: the model is built as saved; ignoring model settings {changed} (now, saved)")
        model_args = saved
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:  # GPTConfig's checks: a layer_pattern of the wrong length, ...
        raise SetupError(str(e)) from e
    if cfg["init_from"] == "resume":
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], cfg["betas"], cfg["eps"],
                                           device.type)
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs between processes
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss, tokens_seen = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["tokens_seen"]
        if rank < len(ckpt["rng"]):
            set_rng_states(ckpt["rng"][rank], data_rng, device)
        else:  # more processes than when saved: the data position is shared, dropout RNGs start anew
            data_rng.bit_generator.state = ckpt["rng"][0]["data"]
        log(f"resuming from {ckpt_path} at iteration {iter_num}")
        then, now = schedule(ckpt["config"]), schedule(cfg)
        if then != now:  # e.g. a larger max_iters with lr_decay_iters = 0 stretches the cosine
            log(f"resume: the learning-rate schedule is not the saved run's: warmup, decay steps {now} now, "
                f"{then} then (set --warmup_iters={then[0]} --lr_decay_iters={then[1]} to continue it as it was)")
        saved_iter = iter_num
        del ckpt
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == "float16"))
    raw_model = model  # uncompiled and unwrapped: its state_dict has clean names for saving and sampling
    if use_compile:
        log("compiling the model (takes a minute)...")
        model = torch.compile(model)
    ddp_model = wrap_ddp(model, cfg, device, world)

    # log.jsonl: appended to on resume, started anew otherwise
    os.makedirs(cfg["out_dir"], exist_ok=True)
    mode = "a" if cfg["init_from"] == "resume" else "w"
    jsonl = open(os.path.join(cfg["out_dir"], "log.jsonl"), mode) if master else None

    def event(kind, **fields):
        if jsonl:
            jsonl.write(json.dumps({"event": kind, "iter": iter_num, "time": time.time(), **fields}) + "\n")
            jsonl.flush()

    def save():
        states = [None] * world  # every process's RNG states, so each resumes its own dropout stream
        if world > 1:
            dist.all_gather_object(states, rng_states(data_rng, device))
        else:
            states = [rng_states(data_rng, device)]
        if master:
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "config": cfg, "iter_num": iter_num, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen,
                "rng": states})
            log(f"saved {ckpt_path} (iteration {iter_num})")
        return iter_num

    n_params = raw_model.get_num_params()
    log(f"{data.kind} data {data.dir}: vocab {data.vocab_size}, sequences of {data.seq_len}")
    log(f"{world} process(es) on {device}, {dtype}, compile={use_compile}: {tokens_per_iter:,} tokens per iteration "
        f"= {G} micro-batches x {cfg['batch_size']} x {data.seq_len}; {n_params / 1e6:.2f}M parameters")
    event("start", config=cfg, model_args=model_args, n_params=n_params, world_size=world, device=str(device),
          dtype=dtype, tokens_per_iter=tokens_per_iter)

    dt_avg, t_last, iters_since_log = None, time.time(), 0
    while True:
        if iter_num % cfg["eval_interval"] == 0 or iter_num >= cfg["max_iters"] or cfg["eval_only"]:
            ev = evaluate(model, data, cfg, autocast, device, rank, world)
            accs = ev.pop("acc", {})
            text = ", ".join(f"{k} loss {v:.4f}" for k, v in ev.items() if not k.startswith("val_L"))
            text += "".join(f", accuracy L{n} {np.mean(a):.3f}" for n, a in accs.items())
            log(f"iter {iter_num}: {text}")
            event("eval", losses=ev, accuracy={n: float(np.mean(a)) for n, a in accs.items()},
                  accuracy_by_position={n: [round(v, 4) for v in a] for n, a in accs.items()}, tokens_seen=tokens_seen)
            if cfg["eval_only"]:
                break
            if ev["val"] < best_val_loss or cfg["always_save_checkpoint"]:
                best_val_loss = min(best_val_loss, ev["val"])
                if iter_num > 0:
                    saved_iter = save()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_last = time.time()  # evaluation time is not training time
        if iter_num >= cfg["max_iters"]:
            break

        # one optimizer step: all micro-batch indices are drawn first, the RNG state is thus the step's boundary
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = data.sample(data_rng, "train", (G, cfg["batch_size"]))[rank * micro_steps:(rank + 1) * micro_steps]
        loss_sum = torch.zeros((), device=device)
        for step in range(micro_steps):
            x, y = data.get("train", idx[step], device)
            # gradients are all-reduced only on the last micro-batch
            with ddp_model.no_sync() if world > 1 and step < micro_steps - 1 else nullcontext():
                with autocast:
                    _, loss = ddp_model(x, y)
                    loss = loss / micro_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter
        iters_since_log += 1

        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_val = loss_sum.item()  # waits for the GPU
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            dt, t_last = (now - t_last) / iters_since_log, now
            iters_since_log = 0
            if iter_num > 1:  # the first step includes compilation
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            mfu = raw_model.estimate_mfu(cfg["batch_size"] * micro_steps, dt)
            eta = format_time((cfg["max_iters"] - iter_num) * (dt_avg or dt))
            log(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                f"{tokens_per_iter / dt:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, eta {eta}")
            event("train", loss=loss_val, lr=lr, dt=dt, tokens_per_s=tokens_per_iter / dt, mfu=mfu,
                  grad_norm=grad_norm.item() if cfg["grad_clip"] > 0 else None, tokens_seen=tokens_seen)

    if not cfg["eval_only"] and saved_iter != iter_num:
        save()  # the final state: a finished run always leaves a checkpoint to sample from or resume
    if jsonl:
        jsonl.close()


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print_settings()
        return
    try:
        cfg = parse_config(argv)
        train(cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
