"""
Length generalisation on a state-tracking task (spec section 5): evaluate a trained model on sequences longer
than any it was trained on, and compare models in a table and a plot.

    python eval_state_tracking.py --out_dir=out-st-m2rnn               # table, and out_dir/eval_state_tracking.json
    python eval_state_tracking.py --plot out-st-m2rnn out-st-gpt out-st-linear \\
        --png=assets/state_tracking.png --md=assets/state_tracking.md    # accuracy vs length, one line per model

Evaluation: the checkpoint out_dir/ckpt.pt (train.py) is run on every val_L<n>_x.npy / val_L<n>_y.npy of its
dataset (prepare_data.py writes them at 1, 2, 4, 8, 16 times the longest training length). The prediction at
position t is the argmax over the group's classes; it is right when it is the running product g_1 o ... o g_t.
Two numbers per length n:
    per-position accuracy   right predictions / all predictions (every position 1..n of every sequence)
    sequence accuracy       sequences whose n predictions are all right
A model that tracks the state keeps both at ~1 far beyond the training length; a shortcut collapses just after
it (a constant guess scores 1 / n_classes per position, and ~0 per sequence once n is large).

--plot reads the eval_state_tracking.json of each out_dir (run the evaluation first) and draws per-position and
sequence accuracy against length, one line per model. It needs matplotlib (pip install matplotlib); the
markdown table (--md) does not.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import prepare_data

RESULTS = "eval_state_tracking.json"  # written into each out_dir


class EvalError(RuntimeError):
    """A problem the user can fix (no checkpoint, no data, no matplotlib): printed without a traceback."""


def model_label(model_args):
    """A short name for a model, from its GPTConfig fields."""
    pattern = model_args["layer_pattern"]
    if set(pattern) == {"A"}:
        return f"attention ({model_args['pos_encoding']})"
    if set(pattern) == {"M"}:
        return "linear ablation (GLA)" if model_args.get("m2rnn_linear") else "M²RNN"
    return f"hybrid {pattern}" + (" (linear)" if model_args.get("m2rnn_linear") else "")


def data_dir_of(train_config):
    """The dataset folder train.py read: data_root (relative to the repository) / dataset."""
    return prepare_data.dataset_dir(train_config.get("data_root", "data"), train_config["dataset"])


@torch.no_grad()
def evaluate_lengths(model, data_dir, device, batch_size=250, max_seqs=None, autocast=None):
    """Accuracy of model (GPT, eval mode) on each val_L<n> file of data_dir (meta.json's eval_lens).
    Returns (meta, [{"length", "per_position_acc", "sequence_acc", "n_seqs", "acc_by_position"}, ...])."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise EvalError(f"no dataset at {data_dir} (meta.json not found): make it with prepare_data.py, "
                        f"or point --data_dir at it")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("kind") != "state_tracking":
        raise EvalError(f"{data_dir} holds a {meta.get('kind')!r} dataset, not a state-tracking task")
    n_classes = meta["n_classes"]
    rows = []
    for n in sorted(meta["eval_lens"]):
        x = np.load(os.path.join(data_dir, f"val_L{n}_x.npy"))
        y = np.load(os.path.join(data_dir, f"val_L{n}_y.npy"))
        if max_seqs:
            x, y = x[:max_seqs], y[:max_seqs]
        hits = torch.zeros(x.shape[1], dtype=torch.float64)  # right predictions, per position
        counted = torch.zeros(x.shape[1], dtype=torch.float64)  # predictions made, per position
        whole = 0  # sequences with every prediction right
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i:i + batch_size].astype(np.int64)).to(device)  # (b,n)
            yb = torch.from_numpy(y[i:i + batch_size].astype(np.int64)).to(device)  # (b,n), -1 = no target
            with autocast or torch.autocast(device.type, enabled=False):
                logits, _ = model(xb)  # (b,n,vocab)
            right = logits[..., :n_classes].argmax(-1) == yb
            mask = yb >= 0
            hits += (right & mask).sum(0).double().cpu()
            counted += mask.sum(0).double().cpu()
            whole += (right | ~mask).all(1).sum().item()
        rows.append({"length": n, "per_position_acc": (hits.sum() / counted.sum()).item(),
                     "sequence_acc": whole / len(x), "n_seqs": len(x),
                     "acc_by_position": [round(v, 4) for v in (hits / counted.clamp(min=1)).tolist()]})
    return meta, rows


def format_table(label, meta, rows):
    train_len = meta["train_max_len"]
    lines = [f"{label} on {meta['task']} ({meta.get('generators', 'all')} generators), trained on lengths "
             f"{meta.get('train_min_len', 1)}..{train_len}",
             f"{'length':>7} {'x train':>8} {'per-position acc':>17} {'sequence acc':>13} {'seqs':>6}"]
    for r in rows:
        lines.append(f"{r['length']:>7} {r['length'] / train_len:>7g}x {r['per_position_acc']:>17.4f} "
                     f"{r['sequence_acc']:>13.4f} {r['n_seqs']:>6}")
    return "\n".join(lines)


def evaluate_out_dir(args):
    from model import GPT  # here, so that --plot does not need torch's model code
    from train import resolve_dtype
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        model, info = GPT.from_checkpoint(ckpt_path, device)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from e
    train_config = info.get("config", {})
    data_dir = args.data_dir or data_dir_of(train_config)
    dtype = resolve_dtype(args.dtype, device)  # as train.py
    autocast = None if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    label = args.label or model_label(info["model_args"])
    t0 = time.time()
    meta, rows = evaluate_lengths(model, data_dir, device, args.batch_size, args.max_seqs, autocast)
    print(format_table(label, meta, rows))
    print(f"({ckpt_path}, iteration {info.get('iter_num')}, {dtype} on {device}, {time.time() - t0:.1f} s)")
    result = {"label": label, "out_dir": args.out_dir, "iter_num": info.get("iter_num"), "dtype": dtype,
              "data_dir": data_dir, "task": meta["task"], "generators": meta.get("generators"),
              "n_classes": meta["n_classes"],
              "train_min_len": meta.get("train_min_len"), "train_max_len": meta["train_max_len"],
              "model_args": info["model_args"], "results": rows}
    path = os.path.join(args.out_dir, RESULTS)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


# ----------------------------------------------------------------------------------------------------------
# comparison of several models: markdown table and plot

def load_results(out_dirs):
    results = []
    for d in out_dirs:
        path = os.path.join(d, RESULTS)
        if not os.path.isfile(path):
            raise EvalError(f"{path} not found: evaluate first (python eval_state_tracking.py --out_dir={d})")
        with open(path) as f:
            results.append(json.load(f))
    return results


def markdown_table(results):
    """One row per model; per length, 'per-position / sequence' accuracy in percent."""
    lengths = sorted({r["length"] for res in results for r in res["results"]})
    train_len = results[0]["train_max_len"]
    head = "| model | " + " | ".join(f"L={n} ({n / train_len:g}x)" for n in lengths) + " |"
    lines = [head, "|" + " --- |" * (len(lengths) + 1)]
    for res in results:
        by_len = {r["length"]: r for r in res["results"]}
        cells = [f"{100 * by_len[n]['per_position_acc']:.1f} / {100 * by_len[n]['sequence_acc']:.1f}"
                 if n in by_len else "-" for n in lengths]
        lines.append(f"| {res['label']} | " + " | ".join(cells) + " |")
    task = results[0]["task"]
    lines.append(f"\nPer-position / whole-sequence accuracy (%) on {task}, trained on lengths "
                 f"{results[0].get('train_min_len', 1)}..{train_len}.")
    return "\n".join(lines)


def plot(results, png):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EvalError("the plot needs matplotlib: pip install matplotlib (the markdown table does not)") from e
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    train_len = results[0]["train_max_len"]
    for res in results:
        lengths = [r["length"] for r in res["results"]]
        for ax, key in zip(axes, ("per_position_acc", "sequence_acc")):
            ax.plot(lengths, [r[key] for r in res["results"]], marker="o", label=res["label"])
    lengths = sorted({r["length"] for res in results for r in res["results"]})
    for ax, title in zip(axes, ("per-position accuracy", "whole-sequence accuracy")):
        ax.axvline(train_len, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (dashed: longest training length)")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if results[0].get("n_classes"):  # a uniform guess; the majority class can score a little more
        axes[0].axhline(1 / results[0]["n_classes"], color="gray", linestyle=":", linewidth=1, label="chance")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower left")
    fig.suptitle(f"{results[0]['task']} word problem: length generalisation")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out_dir", help="a train.py run directory holding ckpt.pt (evaluation mode)")
    p.add_argument("--data_dir", help="dataset folder (default: the checkpoint's data_root/dataset)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="'auto': as train.py (bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--batch_size", type=int, default=250, help="sequences per forward pass")
    p.add_argument("--max_seqs", type=int, default=0, help="sequences per length (0: all in the file)")
    p.add_argument("--label", help="name of the model in tables and plots (default: from its config)")
    p.add_argument("--plot", nargs="+", metavar="OUT_DIR", help="compare the evaluated out_dirs")
    p.add_argument("--png", default="state_tracking.png", help="plot file (with --plot)")
    p.add_argument("--md", help="also write the markdown table to this file (with --plot)")
    args = p.parse_args(argv)
    if bool(args.out_dir) == bool(args.plot):
        p.error("give either --out_dir=DIR (evaluate) or --plot DIR [DIR ...] (compare)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.out_dir:
        return evaluate_out_dir(args)
    results = load_results(args.plot)
    table = markdown_table(results)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
        print(f"wrote {args.md}")
    plot(results, args.png)
    return results


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
