"""
Throughput of whole models (issue 6): training tokens/s, MFU and peak memory of GPT, the hybrid, the all-M²RNN
model and GPT with one M²RNN layer, at ~equal parameter count (GPT-2 small, block 1024); then the per-token
latency of cached decoding (model.prefill, then model.forward_step, as sample.py generates) at positions 128 … 8k.

    python bench.py --out=bench-1gpu     # one GPU, both parts: ~5-8 minutes on an H200, mostly compilation
    python bench.py --mode=generate --gen_models=hybrid --gen_batch_size=8           # one part, other settings
    torchrun --standalone --nproc_per_node=2 bench.py --mode=train --out=bench-ddp --baseline=bench-1gpu/bench.json
    python bench.py --device=cpu --compile=False --threads=1 --n_layer=3 --n_embd=64 --n_head=2 --m2rnn_heads=4 \\
        --m2rnn_k_dim=16 --m2rnn_v_dim=16 --mlp_hidden=128 --block_size=64 --batch_size=2 --vocab_size=256 \\
        --warmup=1 --steps=2 --gen_positions=8,16 --gen_steps=4     # CPU smoke test: every code path, tiny sizes

Each model's settings come from its config file(s), read by train.py's configurator; `--key=value` then overrides
a model or system setting of every model (OVERRIDABLE, checked as train.py checks it) or sets one of the bench
settings below. A changed n_layer repeats or cuts each layer pattern to n_layer letters (at 3: gpt 'AAA',
hybrid 'MMA', m2rnn 'MMM', one_m 'MAA').

Training step = train.py's: bf16 autocast forward, backward, gradient clipping (grad_clip of the config), AdamW
step, zero_grad; torch.compile on CUDA; random tokens (no data loading). Steps run back to back, timed with CUDA
events (the clock on the CPU); medians are reported. Under torchrun each process runs batch_size x block_size
tokens per step (DDP, NCCL on CUDA, gloo on CPU); tokens/s is the global rate, the step time the slowest
process's median. --baseline=<an earlier bench.json> adds the ratio of tokens/s to that run (DDP scaling).
Decoding (eager, batch gen_batch_size): a prefill of p random tokens, then gen_steps greedy tokens, for every p
in gen_positions, gen_rounds times over; ms/token is the median of a position's steps over all rounds (eager
decoding is bound by the CPU's kernel launches, whose jitter comes in bursts: single sweeps put the hybrid's
ratio 8192/128 anywhere from 0.89x to 1.48x); cache MiB: the attention keys/values up to p plus the M²RNN
states. Peak GiB: training, the whole run of a model; decoding, the timed steps (weights and the cache, allocated
for the last position).
"""
import difflib
import gc
import json
import os
import statistics
import sys
import textwrap
import time
from contextlib import nullcontext, redirect_stdout

import torch
import torch.distributed as dist

import train
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------------------------------------
# Bench settings (model, batch and system settings come from the config files: see OVERRIDABLE)
mode = "all"  # 'train', 'generate' or 'all' (under torchrun: training only)
models = "gpt,hybrid,m2rnn,one_m"  # models of the training benchmark (names in MODELS)
gen_models = "gpt,hybrid"  # models of the generation benchmark
warmup = 10  # untimed training steps per model (the first one compiles)
steps = 20  # timed training steps per model
gen_positions = (128, 512, 1024, 2048, 4096, 8192)  # decoding starts after a prefill of this many tokens
gen_steps = 32  # timed decode steps from each position, in each round
gen_rounds = 3  # sweeps over gen_positions; ms/token is the median of all rounds' steps at a position
gen_batch_size = 1  # sequences decoded together
vocab_size = 50257  # GPT-2 BPE, as train.py reads it from OpenWebText's meta.json
out = ""  # a folder for bench.md (the tables), bench.json (every number), bench.png; "": print only
baseline = ""  # bench.json of an earlier run (e.g. one GPU): adds the ratio of tokens/s to it per model
# -----------------------------------------------------------------------------------------------------------
BENCH = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (int, str, tuple)}
OVERRIDABLE = [k for k in train.MODEL_KEYS if k not in ("layer_pattern", "pos_encoding")] + \
              ["batch_size", "device", "dtype", "compile", "backend", "ddp_bucket_cap_mb", "threads", "seed"]
REPO = os.path.dirname(os.path.abspath(__file__))
MODELS = {  # name: (config files, applied in order; then settings replacing theirs, as --key=value)
    "gpt": (["config/gpt.py"], []),
    "hybrid": (["config/hybrid.py"], []),
    "m2rnn": (["config/m2rnn.py"], []),
    # GPT with its first layer M²RNN (M²RNN sizes from hybrid.py, the rest from gpt.py). Its 11 attention layers
    # keep GPT's RoPE (gpt.py's pos_encoding; model.py's 'auto' would drop it as in the paper's hybrids), so its
    # ratio to GPT is the cost of the one M²RNN layer alone. Under DDP it takes one gradient bucket, as the M²RNN
    # configs do: with gpt.py's 25 MiB it scaled 1.69-1.86x on 2 GPUs, with one bucket 1.79-1.83x (notes_throughput.md)
    "one_m": (["config/hybrid.py", "config/gpt.py"], ["--layer_pattern=MAAAAAAAAAAA", "--ddp_bucket_cap_mb=1000"]),
}
SetupError = train.SetupError


def parse_args(argv):
    """Bench settings and the list of --key=value overrides of the configs, each checked by train.py's
    configurator: against BENCH's defaults, and against train.py's settings."""
    ours, overrides = [], []
    for arg in argv:
        key, sep, text = arg[2:].partition("=")
        if not arg.startswith("--") or not sep:
            raise SetupError(f"expected --key=value, got {arg!r}")
        if key not in BENCH and key not in OVERRIDABLE:
            close = difflib.get_close_matches(key, [*BENCH, *OVERRIDABLE], n=1)
            raise SetupError(f"unknown setting {key!r}.{f' Did you mean {close[0]!r}?' if close else ''} Bench "
                             f"settings: {', '.join(BENCH)}; overrides of the configs: {', '.join(OVERRIDABLE)}")
        if key == "gen_positions" and "," not in text:
            arg += ","  # one position is a tuple too: --gen_positions=128
        (ours if key in BENCH else overrides).append(arg)
    train.parse_config(overrides)  # train.py's checks of the values; raises SetupError
    settings = train.parse_config(ours, defaults=BENCH, choices={"mode": ("train", "generate", "all")})
    for key in ("models", "gen_models"):
        unknown = [m for m in settings[key].split(",") if m not in MODELS]
        if unknown:
            raise SetupError(f"--{key}: unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    positions = settings["gen_positions"]
    if not all(type(p) is int and p > 0 for p in positions) or len(set(positions)) < len(positions):
        raise SetupError(f"--gen_positions must be distinct positive ints, got {positions!r}")
    for key in ("steps", "gen_steps", "gen_rounds", "gen_batch_size"):  # medians of at least one timing
        if settings[key] < 1:
            raise SetupError(f"--{key} must be at least 1, got {settings[key]}")
    return settings, overrides


def model_args(name, overrides, s):
    """(train.py settings, GPTConfig arguments) of a model: config files, its own settings, then the overrides."""
    files, settings = MODELS[name]
    cfg = train.parse_config([os.path.join(REPO, f) for f in files] + settings + overrides)
    n = cfg["n_layer"]
    cfg["layer_pattern"] = (cfg["layer_pattern"] * n)[:n]
    args = {k: cfg[k] for k in train.MODEL_KEYS}
    args.update(vocab_size=s["vocab_size"], m2rnn_grad_clip=cfg["m2rnn_grad_clip"] or None)  # as train.py does
    return cfg, args


def step_times(fn, n, device):
    """Seconds of each of n back-to-back calls of fn: CUDA events on a GPU (no sync in between), else the clock."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for e in events[1:]:
            fn()
            e.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    stamps = [time.perf_counter()]
    for _ in range(n):
        fn()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bench_train(name, cfg, args, s, device, autocast, use_compile, world):
    """Median training step of one model; its memory is freed when this returns (see free())."""
    torch.manual_seed(cfg["seed"])
    raw = GPT(GPTConfig(**args)).to(device)
    optimizer = raw.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], cfg["betas"], cfg["eps"],
                                         device.type)
    model = torch.compile(raw) if use_compile else raw
    model = train.wrap_ddp(model, cfg, device, world)
    B, T = cfg["batch_size"], cfg["block_size"]
    x, y = torch.randint(s["vocab_size"], (2, B, T), device=device)  # (B,T) each: random tokens

    def step():  # train.py's step without accumulation (dtype float16 would need its GradScaler: timing only)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_times(step, s["warmup"], device)  # compilation, allocator and autotuning warm-up
    dt = torch.tensor(statistics.median(step_times(step, s["steps"], device)), device=device)  # NCCL: on the GPU
    if world > 1:
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest process sets the pace
    dt = dt.item()
    return dict(model=name, layers=args["layer_pattern"], params=raw.get_num_params(), batch=B, block=T,
                world=world, step_ms=dt * 1e3, tokens_per_s=world * B * T / dt, mfu=raw.estimate_mfu(B, dt),
                peak_gib=peak(device))


@torch.no_grad()
def bench_generate(name, cfg, args, s, device, autocast, cache_dtype):
    """Per-token latency of model.forward_step after a prefill of p tokens, for each p in gen_positions."""
    # The attention KV cache holds block_size positions (CausalSelfAttention.init_cache), so the model is built
    # with block_size = the last position + gen_steps; weights and M²RNN states do not depend on it.
    args = dict(args, block_size=max(s["gen_positions"]) + s["gen_steps"])
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**args)).to(device).eval()  # eager, as sample.py runs it
    B = s["gen_batch_size"]
    times, cache, peaks = {p: [] for p in s["gen_positions"]}, {}, {}
    for _ in range(s["gen_rounds"]):
        for p in s["gen_positions"]:
            state = model.init_state(B, device, cache_dtype)  # cache in the autocast dtype (sample.py: the weights')
            with autocast:
                at = [p, model.prefill(torch.randint(s["vocab_size"], (B, p), device=device), state).argmax(-1)]
                cache[p] = sum(t.nbytes * (c["length"] / t.shape[2] if k in ("k", "v") else 1)  # KV up to p, M²RNN all
                               for c in state for k, t in c.items() if torch.is_tensor(t))

                def decode():  # one greedy token at position at[0]
                    at[1] = model.forward_step(at[1], state, at[0]).argmax(-1)
                    at[0] += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                times[p] += step_times(decode, s["gen_steps"], device)
            peaks[p] = max(peaks.get(p, 0), peak(device)) if device.type == "cuda" else None
    rows = []
    for p, ts in times.items():
        dt = statistics.median(ts)
        rows.append(dict(model=name, layers=args["layer_pattern"], position=p, batch=B, ms_per_token=dt * 1e3,
                         tokens_per_s=B / dt, cache_mib=cache[p] / 2**20, peak_gib=peaks[p]))
    return rows


def peak(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device):
    gc.collect()
    torch._dynamo.reset()  # drop the compiled graphs of the last model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def tables(header, train_rows, gen_rows, base):
    """Markdown: the training table (tokens/s vs gpt, and vs the baseline run if any), the decoding table."""
    lines, gpt = [header, ""], next((r["tokens_per_s"] for r in train_rows if r["model"] == "gpt"), None)
    if train_rows:
        head = ["model", "layers", "params", "batch x block x GPUs", "step ms", "tokens/s", "vs gpt", "MFU",
                "peak GiB"] + ["vs baseline"] * bool(base)
        lines += [row(head), row(["---"] * len(head))]
        for r in train_rows:
            b = base.get(r["model"])
            lines.append(row([r["model"], r["layers"], f"{r['params'] / 1e6:.2f}M",
                              f"{r['batch']} x {r['block']} x {r['world']}", f"{r['step_ms']:.1f}",
                              f"{r['tokens_per_s']:,.0f}", fmt(gpt and r["tokens_per_s"] / gpt, ".3f"),
                              fmt(r["mfu"], ".1%"), fmt(r["peak_gib"], ".2f")]
                             + [fmt(b and r["tokens_per_s"] / b, ".2f")] * bool(base)))
        lines.append("")
    if gen_rows:
        lines += [row(["model", "position", "ms/token", "tokens/s", "cache MiB", "peak GiB"]), row(["---"] * 6)]
        lines += [row([r["model"], r["position"], f"{r['ms_per_token']:.3f}", f"{r['tokens_per_s']:,.1f}",
                       f"{r['cache_mib']:.2f}", fmt(r["peak_gib"], ".2f")]) for r in gen_rows]
        lines.append("")
        for name in dict.fromkeys(r["model"] for r in gen_rows):
            rs = [r for r in gen_rows if r["model"] == name]
            lines.append(f"- {name}: ms/token at position {rs[-1]['position']} / at {rs[0]['position']} = "
                         f"{rs[-1]['ms_per_token'] / rs[0]['ms_per_token']:.2f}x (issue 6 target, hybrid: <= 1.2x)")
    return "\n".join(lines)


def plot(header, train_rows, gen_rows, png):
    """bench.png beside the tables: training tokens/s per model, each bar labelled with its ratio to gpt, and
    decoding ms/token against the position. Needs matplotlib; without it only the tables are written."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.png not written: the plot needs matplotlib (pip install matplotlib)")
        return
    panels = [rows for rows in (train_rows, gen_rows) if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if train_rows:
        ax = axes.pop(0)
        gpt = next((r["tokens_per_s"] for r in train_rows if r["model"] == "gpt"), None)
        bars = ax.bar([r["model"] for r in train_rows], [r["tokens_per_s"] for r in train_rows])
        if gpt:
            ax.bar_label(bars, [f"{r['tokens_per_s'] / gpt:.2f}x gpt" for r in train_rows])
        ax.margins(y=0.12)  # room for the labels
        ax.set_ylabel("training tokens/s")
        ax.set_title(f"training step, {train_rows[0]['batch']} x {train_rows[0]['block']} tokens per GPU")
    if gen_rows:
        ax = axes.pop(0)
        for name in dict.fromkeys(r["model"] for r in gen_rows):
            rows = [r for r in gen_rows if r["model"] == name]
            ax.plot([r["position"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        positions = sorted({r["position"] for r in gen_rows})
        ax.set_xticks(positions, [str(p) for p in positions])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("position (tokens already in the context)")
        ax.set_ylabel("ms per decoded token")
        ax.set_title("cached decoding")
        ax.legend()
    fig.suptitle(textwrap.fill(header, 150), fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv):
    s, overrides = parse_args(argv)
    system = train.parse_config(overrides)  # device, dtype, compile, backend, threads
    ddp, rank, world, device = train.processes_and_device(system)  # as train.py: torchrun's processes, the GPU
    dtype, autocast, use_compile = train.precision(system, device)
    base = {}
    if s["baseline"]:
        if not os.path.isfile(s["baseline"]):
            raise SetupError(f"--baseline={s['baseline']}: no such file (a bench.json written by --out)")
        try:
            with open(s["baseline"]) as f:
                base = {r["model"]: r["tokens_per_s"] for r in json.load(f)["train"]}
        except (ValueError, KeyError, TypeError) as e:
            raise SetupError(f"--baseline={s['baseline']}: not a bench.json with a training table "
                             f"({type(e).__name__}: {e})") from e
    if ddp:
        train.init_process_group(system, device)
    try:
        train_rows, gen_rows = [], []
        with nullcontext() if rank == 0 else redirect_stdout(open(os.devnull, "w")):  # one process prints
            if s["mode"] in ("train", "all"):
                for m in s["models"].split(","):
                    cfg, args = model_args(m, overrides, s)
                    train_rows.append(bench_train(m, cfg, args, s, device, autocast, use_compile, world))
                    free(device)
                    print(f"{m}: {train_rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
            if s["mode"] != "train" and ddp:
                print("generation runs in one process: skipped under torchrun (launch it with python)")
            elif s["mode"] in ("generate", "all"):
                for m in s["gen_models"].split(","):
                    cfg, args = model_args(m, overrides, s)
                    gen_rows += bench_generate(m, cfg, args, s, device, autocast, getattr(torch, dtype))
                    free(device)
        if rank == 0:
            gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            launcher = f"torchrun --standalone --nproc_per_node={world}" if ddp else "python"
            header = (f"{world} x {gpu}, torch {torch.__version__}, {dtype}, compile={use_compile}, "
                      f"{time.strftime('%Y-%m-%d')}; {launcher} bench.py {' '.join(argv)}")
            text = tables(header, train_rows, gen_rows, base)
            print(text)
            if s["out"]:
                os.makedirs(s["out"], exist_ok=True)
                with open(os.path.join(s["out"], "bench.md"), "w") as f:
                    f.write(text + "\n")
                with open(os.path.join(s["out"], "bench.json"), "w") as f:
                    json.dump({"header": header, "settings": s, "overrides": overrides, "train": train_rows,
                               "generate": gen_rows}, f, indent=1)
                plot(header, train_rows, gen_rows, os.path.join(s["out"], "bench.png"))
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
