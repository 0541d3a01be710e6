"""
Compare finished (or stopped) train.py runs: a markdown table of validation loss against tokens, parameters, speed
and recurrent state, and a plot of validation loss against tokens seen, one line per run.

    python compare_runs.py out-bl-gpt out-bl-hybrid                         # table only if matplotlib is missing
    python compare_runs.py out-bl-gpt out-bl-hybrid --labels="GPT,Hybrid M²RNN" \\
        --png=assets/baselines.png --md=assets/baselines.md

Everything comes from each out_dir's log.jsonl, one JSON object per line as train.py writes it:
    start  {"config": every setting, "model_args": the GPTConfig fields, "n_params": parameters without the
            token embedding (the untied output layer counted), "tokens_per_iter", ...}
    train  {"iter", "time", "loss", "dt", "tokens_per_s", "tokens_seen", ...}   every log_interval steps
    eval   {"iter", "time", "losses": {"train": .., "val": ..}, "tokens_seen"} every eval_interval steps and at the end
A resumed run appends a new start event; its wall time is the sum of its segments (start to last event).

Recurrent state per layer: the numbers a layer carries from one token to the next while generating, per sequence:
    M²RNN      H·K·V       (one K×V matrix per head)
    GDN        Hg·Kg·Vg    (one Kg×Vg matrix per head)
    attention  2·d per token of context: its KV cache grows with the context (2·d·block_size at full length)
The last column adds these up over all layers at block_size tokens of context.
"""
import argparse
import json
import os
import statistics
import sys


class CompareError(RuntimeError):
    """A problem the user can fix (no log, no matplotlib): printed without a traceback."""


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise CompareError(f"{path} not found: is {out_dir} a train.py out_dir?")
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    if not events or events[0]["event"] != "start":
        raise CompareError(f"{path} does not begin with train.py's start event")
    return events


def state_per_layer(model_args):
    """{layer letter: (formula, numbers)} for the kinds of layer in the model; attention's is per token."""
    from model import GPTConfig  # resolves the defaults (None -> derived sizes) exactly as the model does
    c = GPTConfig(**model_args)
    sizes = {"M": (f"{c.m2rnn_heads}·{c.m2rnn_k_dim}·{c.m2rnn_v_dim}", c.m2rnn_heads * c.m2rnn_k_dim * c.m2rnn_v_dim),
             "G": (f"{c.gdn_heads}·{c.gdn_k_dim}·{c.gdn_v_dim}", c.gdn_heads * c.gdn_k_dim * c.gdn_v_dim),
             "A": (f"2·{c.n_embd}", 2 * c.n_embd)}
    return {kind: sizes[kind] for kind in dict.fromkeys(c.layer_pattern)}  # in order of first appearance


def summarize(out_dir, label=None):
    """One run's numbers from its log.jsonl."""
    events = read_log(out_dir)
    start = [e for e in events if e["event"] == "start"][-1]  # a resumed run: the settings it ended with
    args = start["model_args"]
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    wall, seg_start, seg_last = 0.0, None, None  # seconds from each start event to the last one before the next
    speeds, first = [], False  # tokens/s of the train lines, but the first after each start (it includes compiling)
    for e in events:
        if e["event"] == "start":
            if seg_start is not None:
                wall += seg_last - seg_start
            seg_start, first = e["time"], True
        elif e["event"] == "train":
            if not first:
                speeds.append(e["tokens_per_s"])
            first = False
        seg_last = e["time"]
    wall += seg_last - seg_start
    state = state_per_layer(args)
    context = args["block_size"]
    state_total = sum(state[kind][1] * (context if kind == "A" else 1) for kind in args["layer_pattern"])
    vals = [(e["tokens_seen"], e["losses"]["val"]) for e in evals]
    best = min(vals, key=lambda tv: tv[1]) if vals else None
    return {
        "label": label or args["layer_pattern"], "out_dir": out_dir, "layer_pattern": args["layer_pattern"],
        "n_params": start.get("n_params"), "config": start["config"], "model_args": args,
        "tokens_per_iter": start.get("tokens_per_iter"),
        "tokens_seen": max([e["tokens_seen"] for e in evals + trains], default=0),
        "iters": max([e["iter"] for e in evals + trains], default=0),
        "final_val": vals[-1][1] if vals else None, "best_val": best[1] if best else None,
        "best_tokens": best[0] if best else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "wall_s": wall, "state": state, "state_total": state_total, "context": context,
        "val_curve": vals, "train_curve": [(e["tokens_seen"], e["loss"]) for e in trains],
    }


def fmt(x, spec, missing="—"):
    return missing if x is None else format(x, spec)


def markdown_table(runs):
    lines = ["| model | layers | parameters¹ | tokens | val loss, final | val loss, best (at tokens) | tokens/s² "
             "| wall time³ | state per layer⁴ | state at block_size⁵ |",
             "|" + " --- |" * 10]
    for r in runs:
        state = "; ".join(f"{k} {f} = {n:,}" + ("/token" if k == "A" else "") for k, (f, n) in r["state"].items())
        stopped = f" (stopped at step {r['iters']:,})" if r["iters"] < r["config"]["max_iters"] else ""
        best = f"{fmt(r['best_val'], '.4f')} ({r['best_tokens'] / 1e6:.1f}M)" if r["best_val"] is not None else "—"
        params = f"{r['n_params'] / 1e6:.2f}M" if r["n_params"] else "—"
        lines.append(f"| {r['label']} | `{r['layer_pattern']}` | {params} "
                     f"| {r['tokens_seen'] / 1e6:.1f}M{stopped} | {fmt(r['final_val'], '.4f')} | {best} "
                     f"| {fmt(r['tokens_per_s'], ',.0f')} | {r['wall_s'] / 60:.1f} min | {state} "
                     f"| {r['state_total']:,} |")
    # what the runs share, or that they do not
    shared = {}
    for key in ("dataset", "seed", "batch_size", "block_size", "gradient_accumulation_steps", "learning_rate",
                "max_iters"):
        values = {str(r["config"].get(key)) for r in runs}
        shared[key] = values.pop() if len(values) == 1 else "differs: " + ", ".join(sorted(values))
    tpi = {r["tokens_per_iter"] for r in runs}
    lines += ["",
              f"Data `{shared['dataset']}`, seed {shared['seed']}, {shared['max_iters']} steps of "
              f"{', '.join(f'{t:,}' for t in sorted(tpi))} tokens (batch {shared['batch_size']} × "
              f"{shared['block_size']} × {shared['gradient_accumulation_steps']}), peak lr {shared['learning_rate']}. "
              "Runs with the same data, seed and batch shape train on the same batches in the same order, and "
              "every evaluation of every run sees the same validation batches.",
              "¹ without the token embedding (the output layer counted). ² median of the logged training steps, "
              "compilation left out. ³ from start to the last log line: compilation, evaluations and checkpoints "
              "included. ⁴ numbers carried per sequence: M²RNN H·K·V, Gated DeltaNet Hg·Kg·Vg, attention's KV "
              "cache 2·d per token. ⁵ all layers at block_size tokens of context (attention: 2·d·block_size)."]
    return "\n".join(lines)


def plot(runs, png):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CompareError("the plot needs matplotlib: pip install matplotlib (the table above does not)") from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        line, = ax.plot([t / 1e6 for t, _ in r["val_curve"]], [v for _, v in r["val_curve"]], marker="o",
                        markersize=3, label=r["label"])
        ax.plot([t / 1e6 for t, _ in r["train_curve"]], [v for _, v in r["train_curve"]], color=line.get_color(),
                alpha=0.25, linewidth=0.8)
    # the loss at step 0 (~ln(vocab)) would squash the curves: the y axis starts from the second evaluation
    seconds = [r["val_curve"][1][1] for r in runs if len(r["val_curve"]) > 1]
    lows = [v for r in runs for _, v in r["val_curve"] + r["train_curve"]]
    if seconds and lows:
        ax.set_ylim(min(lows) - 0.02, max(seconds) + 0.05)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"validation loss (lines with dots), training loss (faint): {runs[0]['config']['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="train.py run directories (with log.jsonl)")
    p.add_argument("--labels", help="comma-separated names, one per OUT_DIR (default: each run's layer_pattern, "
                                     "and its folder where runs share one)")
    p.add_argument("--png", default="compare_runs.png", help="plot file; '' for none")
    p.add_argument("--md", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    args.labels = args.labels.split(",") if args.labels else [None] * len(args.out_dirs)
    if len(args.labels) != len(args.out_dirs):
        p.error(f"--labels has {len(args.labels)} names for {len(args.out_dirs)} out_dirs")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = [summarize(d, label) for d, label in zip(args.out_dirs, args.labels)]
    patterns = [r["layer_pattern"] for r in runs]
    for r, label in zip(runs, args.labels):  # a default label (the pattern) that two runs share gets the folder too
        if label is None and patterns.count(r["layer_pattern"]) > 1:
            r["label"] += f" ({os.path.basename(os.path.normpath(r['out_dir']))})"
    table = markdown_table(runs)
    print(table)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(table + "\n")
        print(f"wrote {args.md}")
    if args.png:
        plot(runs, args.png)
    return runs


if __name__ == "__main__":
    try:
        main()
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
