"""
Prepare training data: a text corpus as token files, or a state-tracking task as arrays.

    python prepare_data.py                                     # offline default: Python stdlib source, byte tokens
    python prepare_data.py --dataset=files --input=notes/,book.txt --name=mine [--tokenizer=gpt2]
    python prepare_data.py --dataset=openwebtext               # needs `pip install datasets`, network, ~54 GB disk
    python prepare_data.py --dataset=s5 --generators=gen --train_max_len=64 --eval_lens=64,256,1024

Everything is written to <data_root>/<name>/ (default data/pystdlib, data/s5, data/s5_gen, ...).

Text datasets -> train.bin, val.bin: one stream of token ids (np.uint16) with the end-of-text token after
every document; the last val_fraction of the stream is validation. meta.json: {"kind": "text",
"tokenizer": "byte"|"gpt2", "vocab_size", "eot", ...}.

State-tracking tasks (spec section 5: the S5 word problem, and S3, A5, parity) -> train_x.npy, train_y.npy of
shape (n_train, train_max_len), one val_L<len>_x.npy / val_L<len>_y.npy pair per evaluation length, and
meta.json {"kind": "state_tracking", "task", "vocab_size", "n_classes", "train_max_len", "eval_lens", ...}.
x holds input tokens: group elements (--generators=all, token = class id) or indices into a small
generating set (--generators=gen). y[t] is the class id of the running product g_1 o g_2 o ... o g_t.
Training lengths are drawn uniformly from train_min_len..train_max_len; positions after a sequence's end
have x = 0 and y = -1 (ignored by the loss). Arrays are stored as int16.
"""
import argparse
import itertools
import json
import os
import sys
import sysconfig
import threading
from functools import lru_cache

import numpy as np

TEXT_DATASETS = ("pystdlib", "files", "openwebtext")
TASKS = {  # task: (points permuted, even permutations only, generating set)
    "s3": (3, False, [(1, 0, 2), (1, 2, 0)]),              # transposition (0 1), 3-cycle (0 1 2)
    "s5": (5, False, [(1, 0, 2, 3, 4), (1, 2, 3, 4, 0)]),  # transposition (0 1), 5-cycle (0 1 2 3 4)
    "a5": (5, True, [(1, 2, 0, 3, 4), (1, 2, 3, 4, 0)]),   # 3-cycle (0 1 2), 5-cycle (0 1 2 3 4)
    "parity": (2, False, [(0, 1), (1, 0)]),  # Z2 as S2: class 0 = identity = bit 0, class 1 = swap = bit 1
}
EOT_TEXT = "<|endoftext|>"  # how decode() shows the end-of-text token
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                    "encodings"}  # encodings/: mostly generated codec tables, not code worth learning
TIKTOKEN_HELP = ("The gpt2 tokenizer needs tiktoken's BPE files, which tiktoken downloads on first use "
                 "(network needed). Offline, use --tokenizer=byte, or copy tiktoken's cache folder from a "
                 "machine with network (by default <tmp>/data-gym-cache) and point TIKTOKEN_CACHE_DIR at it.")


class PrepareError(RuntimeError):
    """A problem the user can fix (missing input, missing package, no network): printed without a traceback."""


def write_meta(out_dir, meta):
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: .encode(str) -> list[int], .decode(ids) -> str, .vocab_size, .eot

def _decode_runs(ids, n_plain, decode_run, specials):
    """Decode runs of ids in [0, n_plain) with decode_run; any other id becomes specials.get(id, U+FFFD)."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    breaks = np.flatnonzero((ids < 0) | (ids >= n_plain))
    parts, start = [], 0
    for b in breaks:
        parts.append(decode_run(ids[start:b].tolist()))
        parts.append(specials.get(int(ids[b]), "\ufffd"))
        start = b + 1
    parts.append(decode_run(ids[start:].tolist()))
    return "".join(parts)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-text token 256. Needs nothing, handles any text."""
    name, vocab_size, eot = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):  # invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD
        return _decode_runs(ids, 256, lambda run: bytes(run).decode("utf-8", errors="replace"),
                            {self.eot: EOT_TEXT})


class TiktokenTokenizer:
    """A tiktoken BPE encoding (gpt2: vocab 50257, eot 50256). Special tokens in the text are not parsed."""

    def __init__(self, name, enc):
        self.name, self.enc = name, enc
        self.vocab_size, self.eot = enc.n_vocab, enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):  # ids beyond the vocabulary (a padded model vocab) become U+FFFD
        return _decode_runs(ids, self.vocab_size, lambda run: self.enc.decode(run, errors="replace"), {})


def get_tokenizer(name, timeout=60.0):
    """'byte' (vocab 257, eot 256) or 'gpt2' (tiktoken, vocab 50257, eot 50256).
    tiktoken fetches its BPE files on first use; we wait for it in a thread so a dead network cannot hang us."""
    if name == "byte":
        return ByteTokenizer()
    if name != "gpt2":
        raise PrepareError(f"unknown tokenizer {name!r}: use 'byte' or 'gpt2'")
    try:
        import tiktoken
    except ImportError as e:
        raise PrepareError("the gpt2 tokenizer needs tiktoken: pip install tiktoken, or use --tokenizer=byte") from e
    result = {}

    def load():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # requests.ConnectionError, HTTPError, hash mismatch, ...
            result["error"] = e
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    if "enc" in result:
        return TiktokenTokenizer(name, result["enc"])
    error = result.get("error") or TimeoutError(f"no answer in {timeout:g} s")
    raise PrepareError(f"could not load the {name} tokenizer ({type(error).__name__}: {error}). "
                       f"{TIKTOKEN_HELP}") from error


# ----------------------------------------------------------------------------------------------------------
# Text datasets

def list_files(root, suffix="", skip_dirs=()):
    """All files under root (a file or a folder, recursively) ending in suffix, sorted; hidden folders skipped."""
    if os.path.isfile(root):
        return [root]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files if f.endswith(suffix)]
    return sorted(found)


def read_text_files(paths, max_bytes=None):
    """[(path, text)] for the paths that are UTF-8 text (no NUL bytes); stops before max_bytes is exceeded."""
    docs, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # not text
        if "\0" in text:
            continue  # binary that happens to be valid UTF-8
        if max_bytes and total + len(data) > max_bytes:
            break
        docs.append((path, text))
        total += len(data)
    return docs


def stdlib_docs(max_bytes):
    """The first max_bytes of the Python standard library's .py files (sorted; no tests, no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    return read_text_files(list_files(root, ".py", STDLIB_SKIP_DIRS), max_bytes), root


def input_docs(inputs, max_bytes):
    """The text files named by --input (comma-separated files and folders)."""
    paths = []
    for p in inputs.split(","):
        if not os.path.exists(p):
            raise PrepareError(f"input path not found: {p!r} (--input takes files and folders, comma-separated)")
        paths += list_files(p)
    return read_text_files(paths, max_bytes)


def write_text_dataset(out_dir, docs, tok, val_fraction, meta):
    """Tokenize documents (eot after each), split off the last val_fraction, write train.bin, val.bin, meta.json."""
    assert tok.vocab_size <= 2 ** 16, "token ids must fit in uint16"
    if not docs:
        raise PrepareError(f"no UTF-8 text files found in {meta['source']} (within max_bytes, if given)")
    ids = np.concatenate([np.array(tok.encode(text) + [tok.eot], dtype=np.uint16) for _, text in docs])
    n_val = max(1, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise PrepareError(f"only {len(ids)} tokens: too little text for a train/val split")
    os.makedirs(out_dir, exist_ok=True)
    ids[:-n_val].tofile(os.path.join(out_dir, "train.bin"))
    ids[-n_val:].tofile(os.path.join(out_dir, "val.bin"))
    write_meta(out_dir, {"kind": "text", "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
                         "train_tokens": len(ids) - n_val, "val_tokens": n_val, "n_files": len(docs), **meta})


def prepare_openwebtext(out_dir, args):
    """nanoGPT's recipe: download OpenWebText (~8M documents), tokenize in parallel, write uint16 memmaps."""
    try:
        import datasets
    except ImportError as e:
        raise PrepareError("--dataset=openwebtext needs the Hugging Face `datasets` package (pip install "
                           "datasets) and network access (~54 GB download). Offline, use --dataset=files "
                           "--input=PATH for your own text, or the default --dataset=pystdlib.") from e
    tok = get_tokenizer(args.tokenizer)
    try:
        ds = datasets.load_dataset(args.hf_dataset, num_proc=args.num_proc)
    except Exception as e:  # connection errors surface under many types (requests, huggingface_hub, OSError)
        raise PrepareError(f"could not load {args.hf_dataset!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           "This needs network access (and an id your `datasets` version can load, see --hf_dataset);"
                           " offline, use --dataset=files --input=PATH.") from e
    split = ds["train"].train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    def process(example):
        ids = tok.encode(example["text"]) + [tok.eot]
        return {"ids": ids, "len": len(ids)}
    tokenized = split.map(process, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"kind": "text", "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
            "source": args.hf_dataset}
    for name, dset in tokenized.items():
        path, n_tokens = os.path.join(out_dir, f"{name}.bin"), int(np.sum(dset["len"], dtype=np.uint64))
        arr, meta[f"{name}_tokens"] = np.memmap(path, dtype=np.uint16, mode="w+", shape=(n_tokens,)), n_tokens
        n_shards, idx = min(1024, len(dset)), 0
        for i in range(n_shards):  # write in contiguous shards so memory stays bounded
            shard = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
            chunk = np.concatenate(shard["ids"])
            arr[idx:idx + len(chunk)] = chunk
            idx += len(chunk)
            print(f"\rwriting {path}: shard {i + 1}/{n_shards}, {idx:,} tokens", end="", flush=True)
        arr.flush()
        print()
    write_meta(out_dir, meta)


# ----------------------------------------------------------------------------------------------------------
# State-tracking tasks. A permutation p of n points is the tuple (p(0), ..., p(n-1)). We compose as functions,
# (a o b)(i) = a(b(i)): b acts first. The running product s_t = g_1 o ... o g_t = s_{t-1} o g_t, so each new
# element is composed on the right: s_t[i] = s_{t-1}[g_t[i]]. Class ids index group_elements(task).

@lru_cache(maxsize=None)
def group_elements(task):
    """The group's elements as permutation tuples in lexicographic order (class 0 is the identity)."""
    if task not in TASKS:
        raise PrepareError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    n_points, even_only, _ = TASKS[task]
    perms = itertools.permutations(range(n_points))  # lexicographic
    return tuple(p for p in perms if not even_only or permutation_sign(p) == 1)


def permutation_sign(p):  # +1 for an even number of inversions, -1 for odd
    return (-1) ** sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))


@lru_cache(maxsize=None)
def multiplication_table(task):
    """table[a, b] = class of elements[a] o elements[b]  (elements[b] acts first)."""
    elements = group_elements(task)
    index = {p: i for i, p in enumerate(elements)}
    table = np.array([[index[tuple(a[i] for i in b)] for b in elements] for a in elements], dtype=np.int64)
    table.flags.writeable = False
    return table


def input_elements(task, generators):
    """Class id of the group element that each input token stands for."""
    if generators == "all":
        return np.arange(len(group_elements(task)))
    if generators == "gen":
        index = {p: i for i, p in enumerate(group_elements(task))}
        return np.array([index[g] for g in TASKS[task][2]])
    raise PrepareError(f"unknown generators {generators!r}: use 'all' or 'gen'")


def make_task_sequences(task, n, length_or_lengths, generators, rng, width=None):
    """n random words and their running products -> (x, y), int64 arrays of shape (n, width).
    length_or_lengths: one length for all, or an (n,) array; past its length a row has x = 0, y = -1.
    width defaults to the longest length."""
    lengths = np.broadcast_to(np.asarray(length_or_lengths, dtype=np.int64), (n,))
    max_len = width or int(lengths.max())
    table, inputs = multiplication_table(task), input_elements(task, generators)
    x = rng.integers(0, len(inputs), size=(n, max_len))  # input tokens
    g = inputs[x]                                       # (n, max_len) class of each input element
    y = np.empty((n, max_len), dtype=np.int64)
    state = np.zeros(n, dtype=np.int64)                 # the identity
    for t in range(max_len):
        state = table[state, g[:, t]]                   # s_t = s_{t-1} o g_t
        y[:, t] = state
    pad = np.arange(max_len) >= lengths[:, None]
    x[pad], y[pad] = 0, -1
    return x, y


def prepare_task(out_dir, args):
    """Training words of random lengths (padded to train_max_len), then n_val words of each eval length."""
    task, gens, rng = args.dataset, args.generators, np.random.default_rng(args.seed)
    os.makedirs(out_dir, exist_ok=True)
    lengths = {"train": rng.integers(args.train_min_len, args.train_max_len + 1, size=args.n_train)}
    lengths.update({f"val_L{n}": np.full(args.n_val, n) for n in args.eval_lens})
    for prefix, lens in lengths.items():
        width = args.train_max_len if prefix == "train" else int(lens[0])
        x, y = make_task_sequences(task, len(lens), lens, gens, rng, width)
        np.save(os.path.join(out_dir, f"{prefix}_x.npy"), x.astype(np.int16))
        np.save(os.path.join(out_dir, f"{prefix}_y.npy"), y.astype(np.int16))
    inputs, n_classes = input_elements(task, gens), len(group_elements(task))
    write_meta(out_dir, {
        "kind": "state_tracking", "task": task, "vocab_size": max(len(inputs), n_classes),
        "n_inputs": len(inputs), "n_classes": n_classes, "generators": gens,
        "input_elements": inputs.tolist(),  # class id of each input token
        "train_min_len": args.train_min_len, "train_max_len": args.train_max_len, "eval_lens": args.eval_lens,
        "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed, "dtype": "int16",
        "composition": "y[t] = class of g_1 o ... o g_t, (a o b)(i) = a(b(i))"})


# ----------------------------------------------------------------------------------------------------------
# Command line

def positive_int(s):
    if not s.strip().isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def dataset_dir(data_root, name):
    """data_root/name, where a relative data_root is taken from this file's folder (the repository's): so
    prepare_data.py, train.py, sample.py and eval_state_tracking.py find the same folder wherever they run."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), data_root, name)  # an absolute one is kept


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--dataset", default="pystdlib", choices=TEXT_DATASETS + tuple(TASKS))
    p.add_argument("--name", help="output folder under data_root (default: the dataset, + _gen if generators=gen)")
    p.add_argument("--data_root", default="data",
                   help="where datasets go (default data); a relative path is taken from this file's folder, "
                        "as train.py and sample.py take it")
    p.add_argument("--tokenizer", choices=("byte", "gpt2"), help="default: byte, gpt2 for openwebtext")
    p.add_argument("--input", help="files dataset: comma-separated files and folders (searched recursively)")
    p.add_argument("--max_bytes", type=positive_int, help="cap on text read (default: 8 MB for pystdlib)")
    p.add_argument("--val_fraction", type=float, help="default: 0.1, 0.0005 for openwebtext")
    p.add_argument("--hf_dataset", default="Skylion007/openwebtext", help="Hugging Face id, for openwebtext")
    p.add_argument("--num_proc", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--generators", default="all", choices=("all", "gen"), help="all elements, or a generating set")
    p.add_argument("--train_min_len", type=positive_int, default=1)
    p.add_argument("--train_max_len", type=positive_int, default=64)
    p.add_argument("--n_train", type=positive_int, default=100_000)
    p.add_argument("--n_val", type=positive_int, default=1000, help="sequences per evaluation length")
    p.add_argument("--eval_lens", type=lambda s: [positive_int(v) for v in s.split(",")],
                   help="comma-separated evaluation lengths (default: train_max_len x 1,2,4,8,16)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    if args.dataset == "files" and not args.input:
        p.error("--dataset=files needs --input=PATH[,PATH...]")
    if args.train_min_len > args.train_max_len:
        p.error(f"--train_min_len={args.train_min_len} is above --train_max_len={args.train_max_len}")
    if args.val_fraction is None:
        args.val_fraction = 0.0005 if args.dataset == "openwebtext" else 0.1
    if not 0 < args.val_fraction < 1:
        p.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if not args.eval_lens:
        args.eval_lens = [args.train_max_len * m for m in (1, 2, 4, 8, 16)]
    args.tokenizer = args.tokenizer or ("gpt2" if args.dataset == "openwebtext" else "byte")
    suffix = "_gen" if args.dataset in TASKS and args.generators == "gen" else ""
    args.name = args.name or args.dataset + suffix
    return args


def main(argv=None):
    """Build the dataset described by argv; returns the output folder."""
    args = parse_args(argv)
    out_dir = dataset_dir(args.data_root, args.name)
    if args.dataset in TASKS:
        prepare_task(out_dir, args)
    elif args.dataset == "openwebtext":
        prepare_openwebtext(out_dir, args)
    else:
        tok = get_tokenizer(args.tokenizer)
        if args.dataset == "pystdlib":
            docs, root = stdlib_docs(args.max_bytes or 8_000_000)
            source = f"python {sys.version.split()[0]} stdlib .py files under {root}"
        else:
            docs, source = input_docs(args.input, args.max_bytes), args.input
        write_text_dataset(out_dir, docs, tok, args.val_fraction, {"source": source})
    for f in sorted(os.listdir(out_dir)):
        print(f"{os.path.join(out_dir, f)}: {os.path.getsize(os.path.join(out_dir, f)):,} bytes")
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
