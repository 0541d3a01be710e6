"""
Tests for prepare_data.py (CPU, a few seconds):  python -m pytest -q test_data.py

The state-tracking labels are checked against an independent brute force: permutation tuples composed
one by one in plain Python, with the convention prepare_data.py documents: (a o b)(i) = a(b(i)), and the
label at t is g_1 o ... o g_t, i.e. state <- state o g_t.
"""
import json
import os
import sys
import time
import types

import numpy as np
import pytest

import prepare_data as pd
from prepare_data import PrepareError

ORDERS = {"s3": 6, "s5": 120, "a5": 60, "parity": 2}
CASES = [(task, gens) for task in ORDERS for gens in ("all", "gen")]


# ----------------------------------------------------------------------------------------------------------
# brute-force group helpers, independent of prepare_data's tables

def compose(a, b):  # (a o b)(i) = a(b(i)): b acts first
    return tuple(a[i] for i in b)


def sign_by_cycles(p):  # a permutation is even iff (points - number of cycles) is even
    seen, cycles = set(), 0
    for start in range(len(p)):
        if start not in seen:
            cycles += 1
            i = start
            while i not in seen:
                seen.add(i)
                i = p[i]
    return 1 if (len(p) - cycles) % 2 == 0 else -1


def token_elements(task, gens):
    """The permutation each input token stands for: all elements in canonical order, or the generating set."""
    return list(pd.group_elements(task)) if gens == "all" else list(pd.TASKS[task][2])


def check_labels(task, tokens, x, y, lengths):
    """Every label equals the brute-force running composition; padding is x = 0, y = -1."""
    elements = pd.group_elements(task)
    identity = tuple(range(len(elements[0])))
    for row in range(x.shape[0]):
        state = identity
        for t in range(x.shape[1]):
            if t >= lengths[row]:
                assert x[row, t] == 0 and y[row, t] == -1, (row, t)
                continue
            state = compose(state, tokens[x[row, t]])
            assert elements[y[row, t]] == state, (task, row, t)


def load_bins(out_dir):
    return np.concatenate([np.fromfile(os.path.join(out_dir, f), dtype=np.uint16) for f in ("train.bin", "val.bin")])


def read_meta(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# groups and labels

@pytest.mark.parametrize("task", list(ORDERS))
def test_group_elements(task):
    elements = pd.group_elements(task)
    n_points = len(elements[0])
    assert len(elements) == ORDERS[task] == len(set(elements))
    assert list(elements) == sorted(elements)                    # fixed canonical (lexicographic) order
    assert elements[0] == tuple(range(n_points))                 # class 0 is the identity
    assert all(sorted(p) == list(range(n_points)) for p in elements)
    if task == "a5":
        assert all(sign_by_cycles(p) == 1 for p in elements)
    for a in elements[:7]:                                       # closed under composition
        for b in elements:
            assert compose(a, b) in elements


@pytest.mark.parametrize("task", list(ORDERS))
def test_generating_set_generates_the_group(task):
    gens = pd.TASKS[task][2]
    assert 2 <= len(gens) <= 3
    closure, frontier = set(gens), list(gens)
    while frontier:                                              # all products of generators
        a = frontier.pop()
        for g in gens:
            c = compose(a, g)
            if c not in closure:
                closure.add(c)
                frontier.append(c)
    assert closure == set(pd.group_elements(task))


@pytest.mark.parametrize("task,gens", CASES, ids=[f"{t}-{g}" for t, g in CASES])
def test_labels_match_brute_force(task, gens):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 25, size=40)
    x, y = pd.make_task_sequences(task, 40, lengths, gens, rng)
    tokens = token_elements(task, gens)
    assert x.shape == y.shape == (40, lengths.max())
    assert x.min() >= 0 and x.max() == len(tokens) - 1           # every token can occur, none beyond
    check_labels(task, tokens, x, y, lengths)
    assert set(np.asarray(pd.input_elements(task, gens)).tolist()) <= set(range(ORDERS[task]))


def test_labels_fixed_length_and_width():
    x, y = pd.make_task_sequences("s5", 8, 30, "gen", np.random.default_rng(1), width=50)
    assert x.shape == (8, 50) and (y[:, :30] >= 0).all() and (y[:, 30:] == -1).all()
    check_labels("s5", token_elements("s5", "gen"), x, y, [30] * 8)


def test_s5_is_not_commutative_so_the_side_matters():
    # the same words composed on the other side give different labels: the brute force above is a real check
    rng = np.random.default_rng(2)
    x, y = pd.make_task_sequences("s5", 20, 10, "all", rng)
    elements = pd.group_elements("s5")
    wrong = 0
    for row in range(20):
        state = elements[0]
        for t in range(10):
            state = compose(elements[x[row, t]], state)          # g_t o state: the other convention
        wrong += elements[y[row, -1]] != state
    assert wrong > 10


def test_parity_is_running_xor():
    for gens in ("all", "gen"):
        x, y = pd.make_task_sequences("parity", 50, 40, gens, np.random.default_rng(3))
        assert set(np.unique(x)) == {0, 1}
        assert np.array_equal(y, np.cumsum(x, axis=1) % 2)


def test_task_dataset_files(tmp_path):
    argv = [f"--data_root={tmp_path}", "--dataset=s3", "--generators=gen", "--n_train=300", "--n_val=7",
            "--train_min_len=3", "--train_max_len=10", "--seed=5"]
    out = pd.main(argv)
    assert out == os.path.join(tmp_path, "s3_gen")
    meta = read_meta(out)
    assert meta["kind"] == "state_tracking" and meta["task"] == "s3"
    assert (meta["vocab_size"], meta["n_inputs"], meta["n_classes"]) == (6, 2, 6)
    assert meta["train_max_len"] == 10 and meta["eval_lens"] == [10, 20, 40, 80, 160]
    x, y = np.load(os.path.join(out, "train_x.npy")), np.load(os.path.join(out, "train_y.npy"))
    assert x.shape == y.shape == (300, 10) and x.dtype == y.dtype == np.int16
    lengths = (y >= 0).sum(axis=1)
    assert lengths.min() == 3 and lengths.max() == 10
    tokens = [pd.group_elements("s3")[c] for c in meta["input_elements"]]
    assert tokens == list(pd.TASKS["s3"][2])
    check_labels("s3", tokens, x, y, lengths)
    for n in meta["eval_lens"]:
        vx, vy = np.load(os.path.join(out, f"val_L{n}_x.npy")), np.load(os.path.join(out, f"val_L{n}_y.npy"))
        assert vx.shape == vy.shape == (7, n) and (vy >= 0).all()
        check_labels("s3", tokens, vx, vy, [n] * 7)
    before = {f: np.load(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".npy")}
    pd.main(argv)                                                # same seed -> same files
    assert all(np.array_equal(v, np.load(os.path.join(out, f))) for f, v in before.items())


def test_relative_data_root_is_taken_from_the_repository(tmp_path, monkeypatch):
    """As train.py and sample.py take it: the same --data_root finds the data wherever the command runs from."""
    repo = os.path.dirname(os.path.abspath(pd.__file__))
    relative = os.path.relpath(tmp_path / "datasets", repo)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = pd.main([f"--data_root={relative}", "--dataset=s3", "--n_train=20", "--n_val=2", "--train_min_len=3",
                   "--train_max_len=6"])
    assert os.path.samefile(out, tmp_path / "datasets" / "s3") and os.path.isfile(os.path.join(out, "meta.json"))


# ----------------------------------------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_round_trip():
    tok = pd.get_tokenizer("byte")
    assert (tok.vocab_size, tok.eot) == (257, 256)
    text = "def f(x):\n\treturn x  # héllo wörld ✓ 日本語 🐍"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eot] + ids) == text + pd.EOT_TEXT + text
    assert tok.decode([0xFF, 65]) == "\ufffdA"                   # invalid UTF-8 does not raise
    assert tok.decode([65, 300, 66, -1]) == "A\ufffdB\ufffd"     # neither do ids outside the vocabulary
    assert tok.decode(np.array(tok.encode("é")[:1] + [67], dtype=np.uint16)) == "\ufffdC"


def tiny_tiktoken():
    import tiktoken
    return tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_tiktoken_wrapper_with_a_local_encoding(monkeypatch):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tiny_tiktoken())
    tok = pd.get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot) == (257, 256)
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")  # special tokens in the text are not parsed
    assert tok.decode(tok.encode("ça va") + [256, 999]) == "ça va<|endoftext|>\ufffd"


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_gpt2_offline_is_a_clear_error(monkeypatch, failure):
    import tiktoken

    def offline(name):
        if failure == "hang":
            time.sleep(5)
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    start = time.time()
    with pytest.raises(PrepareError, match="--tokenizer=byte") as err:
        pd.get_tokenizer("gpt2", timeout=0.3)
    assert time.time() - start < 2
    assert "TIKTOKEN_CACHE_DIR" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# text datasets

def test_default_is_offline_python_stdlib(tmp_path):
    start = time.time()
    out = pd.main([f"--data_root={tmp_path}"])
    assert time.time() - start < 15
    assert out == os.path.join(tmp_path, "pystdlib")
    meta = read_meta(out)
    assert meta["kind"] == "text" and meta["tokenizer"] == "byte" and (meta["vocab_size"], meta["eot"]) == (257, 256)
    train = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert 1_000_000 < len(train) + len(val) <= 8_000_000 + meta["n_files"] and train.max() <= 256
    docs, root = pd.stdlib_docs(8_000_000)
    paths = [p for p, _ in docs]
    assert paths == sorted(paths) and len(paths) == meta["n_files"] > 50
    for p in paths:
        rel = os.path.relpath(p, root).split(os.sep)
        assert p.endswith(".py") and not {"test", "tests", "site-packages"} & set(rel[:-1])
    with open(paths[0], encoding="utf-8") as f:
        first = f.read()
    text = pd.get_tokenizer("byte").decode(load_bins(out))
    assert text.startswith(first + pd.EOT_TEXT)
    assert text == "".join(t + pd.EOT_TEXT for _, t in docs)


def test_files_dataset(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "a.txt").write_text("plain ascii text\n" * 20)
    (src / "sub" / "b.md").write_text("# héllo wörld ✓ 日本語\n" * 20, encoding="utf-8")
    (src / "c.bin").write_bytes(bytes(range(256)))               # binary: skipped
    (src / ".git" / "x.txt").write_text("hidden")                # hidden folder: skipped
    extra = tmp_path / "extra.txt"
    extra.write_text("one more file")
    out = pd.main(["--dataset=files", f"--input={src},{extra}", "--name=mine", f"--data_root={tmp_path / 'data'}"])
    meta = read_meta(out)
    assert out.endswith("mine") and meta["n_files"] == 3 and meta["tokenizer"] == "byte"
    expected = "".join(t + pd.EOT_TEXT for t in ["plain ascii text\n" * 20, "# héllo wörld ✓ 日本語\n" * 20,
                                                  "one more file"])
    assert pd.get_tokenizer("byte").decode(load_bins(out)) == expected


# ----------------------------------------------------------------------------------------------------------
# clear errors

@pytest.mark.parametrize("argv,message", [
    (["--dataset=nope"], "invalid choice: 'nope'"),
    (["--dataset=s5", "--train_max_len=0"], "expected a positive integer, got '0'"),
    (["--dataset=s5", "--eval_lens=64,x"], "expected a positive integer, got 'x'"),
    (["--dataset=s5", "--train_min_len=9", "--train_max_len=8"], "--train_min_len=9 is above"),
    (["--dataset=files"], "--dataset=files needs --input"),
    (["--val_fraction=1.5"], "--val_fraction must be between 0 and 1"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        pd.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_input_path(tmp_path):
    with pytest.raises(PrepareError, match="input path not found"):
        pd.main(["--dataset=files", f"--input={tmp_path / 'nowhere'}", f"--data_root={tmp_path}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no UTF-8 text files"):
        pd.main(["--dataset=files", f"--input={tmp_path / 'empty'}", f"--data_root={tmp_path}"])


def test_openwebtext_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)           # makes `import datasets` fail
    with pytest.raises(PrepareError) as err:
        pd.main(["--dataset=openwebtext", f"--data_root={tmp_path}"])
    assert "pip install datasets" in str(err.value) and "--dataset=files" in str(err.value)
    assert not os.path.exists(tmp_path / "openwebtext")


def test_openwebtext_without_network(monkeypatch, tmp_path):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(PrepareError, match="network access") as err:
        pd.main(["--dataset=openwebtext", "--tokenizer=byte", f"--data_root={tmp_path}"])
    assert "--dataset=files" in str(err.value)


def test_unknown_task_and_tokenizer():
    with pytest.raises(PrepareError, match="unknown task 'z7'"):
        pd.make_task_sequences("z7", 2, 3, "all", np.random.default_rng(0))
    with pytest.raises(PrepareError, match="unknown generators"):
        pd.make_task_sequences("s3", 2, 3, "some", np.random.default_rng(0))
    with pytest.raises(PrepareError, match="unknown tokenizer 'bpe'"):
        pd.get_tokenizer("bpe")
