"""
Tests of train.py on the CPU with a very small model: the configurator, that training lowers the loss,
exact resume from a checkpoint, atomic and corrupt checkpoints, clear errors for missing data, DDP with two
gloo processes against one process, and state-tracking data.

    python -m pytest -q test_train.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare_data
import train
from model import GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = dict(  # a model small enough that an optimizer step takes a few milliseconds
    n_layer=2, layer_pattern="MA", n_embd=32, n_head=2, m2rnn_heads=2, m2rnn_k_dim=8, m2rnn_v_dim=8,
    mlp_hidden=64, block_size=16, batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3,
    min_lr=3e-4, warmup_iters=2, eval_iters=2, log_interval=1, device="cpu", compile=False,
    always_save_checkpoint=False,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """data_root/toy: a byte-level text dataset of a few repeated lines, which a tiny model learns quickly."""
    root = tmp_path_factory.mktemp("data")
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 1\n\n" * 60
    docs = [(f"doc{i}", text[i * 7:]) for i in range(4)]
    prepare_data.write_text_dataset(str(root / "toy"), docs, prepare_data.ByteTokenizer(), 0.2, {"source": "test"})
    return str(root)


def config(data_root, out_dir, **overrides):
    cfg = dict(train.DEFAULTS, **TINY, dataset="toy", data_root=data_root, out_dir=str(out_dir))
    cfg.update(overrides)
    return cfg


def read_log(out_dir, event="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == event]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


# -----------------------------------------------------------------------------------------------------------
# configurator

def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text("import math  # modules and _private names are ignored\n_scale = 2\n"
                    "batch_size = 8 * _scale  # plain assignments\nlayer_pattern = 'MMAM'\nn_layer = 4\n")
    cfg = train.parse_config([str(path), "--batch_size=3", "--out_dir=runs/a=b", "--learning_rate=1",
                              "--betas=(0.8,0.99)", "--compile=False", "--dataset=s5", "--dropout=0.1"])
    assert cfg["n_layer"] == 4 and cfg["layer_pattern"] == "MMAM"
    assert cfg["batch_size"] == 3  # the command line comes after the file
    assert cfg["out_dir"] == "runs/a=b"  # split on the first '=' only
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float  # int -> float
    assert cfg["betas"] == (0.8, 0.99) and cfg["compile"] is False and cfg["dataset"] == "s5"
    assert train.parse_config(["--dataset=123"])["dataset"] == "123"  # a string setting keeps the text
    assert train.parse_config(["--compile=auto"])["compile"] == "auto"


@pytest.mark.parametrize("argv,message", [
    (["--batch_sise=3"], "unknown setting 'batch_sise'.*Did you mean 'batch_size'.*Valid settings: out_dir, "),
    (["--batch_size=1.5"], "batch_size must be of type int like its default"),
    (["--decay_lr=1"], "decay_lr must be of type bool"),
    (["--max_iters=True"], "max_iters must be of type int"),
    (["--compile=maybe"], "compile must be one of"),
    (["--init_from=resum"], "init_from must be one of"),
    (["--batch_size"], "expected --key=value"),
    (["no_such_config.py"], "config file not found"),
    (["--eval_interval=0"], "eval_interval must be at least 1, got 0"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    (["--batch_size=-2"], "batch_size must be at least 1"),
], ids=["typo", "float-for-int", "int-for-bool", "bool-for-int", "bad-choice", "bad-init", "no-value", "no-file",
        "zero-interval", "zero-accumulation", "negative-batch"])
def test_config_errors(argv, message):
    with pytest.raises(train.SetupError, match=message):
        train.parse_config(argv)


def test_unknown_name_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("learning_rte = 1e-3\n")
    with pytest.raises(train.SetupError, match=r"unknown setting 'learning_rte' \(config file .*bad.py\).*"
                                               r"Did you mean 'learning_rate'"):
        train.parse_config([str(path)])


def test_config_files_in_the_repo_parse():
    for name in sorted(f for f in os.listdir(os.path.join(REPO, "config")) if f.endswith(".py")):
        cfg = train.parse_config([os.path.join(REPO, "config", name)])
        assert len(cfg["layer_pattern"]) == cfg["n_layer"], name
        args = {k: cfg[k] for k in train.MODEL_KEYS}
        config = GPTConfig(**dict(args, vocab_size=256, m2rnn_grad_clip=cfg["m2rnn_grad_clip"] or None))
        resolved = ("m2rnn_grad_clip", "pos_encoding")  # turned into None / 'rope' or 'none' by the config
        assert all(getattr(config, k) == v for k, v in args.items() if k not in resolved), name


def test_lr_schedule():
    cfg = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1, max_iters=100, warmup_iters=-1, lr_decay_iters=0)
    lrs = [train.get_lr(i, cfg) for i in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(1.0)  # 10% warmup, then the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay, monotone
    assert lrs[100] == pytest.approx(0.1) and train.get_lr(500, cfg) == 0.1


# -----------------------------------------------------------------------------------------------------------
# training, checkpoints, resume

def test_training_lowers_the_loss(data_root, tmp_path):
    train.train(config(data_root, tmp_path, max_iters=30, eval_interval=30))
    evals = read_log(tmp_path, "eval")
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 30
    assert evals[-1]["losses"]["val"] < evals[0]["losses"]["val"] - 1.0
    steps = read_log(tmp_path)
    assert [e["iter"] for e in steps] == list(range(1, 31))
    assert all(np.isfinite(e["loss"]) and e["tokens_per_s"] > 0 for e in steps)
    assert steps[-1]["tokens_seen"] == 30 * 2 * 4 * 16
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl"]  # no temporary file left behind
    ckpt = train.load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["iter_num"] == 30 and ckpt["config"]["max_iters"] == 30 and ckpt["model_args"]["vocab_size"] == 257


def test_resume_continues_exactly(data_root, tmp_path):
    """8 iterations straight == 4 iterations, then a resumed run to 8: the same losses and weights, bit for bit.
    Dropout is on, so the torch RNG must be restored too, and the data RNG for the batches."""
    common = dict(dropout=0.1, lr_decay_iters=8, eval_interval=3)  # lr_decay_iters fixed: same schedule
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.train(config(data_root, straight, max_iters=8, **common))
    train.train(config(data_root, split, max_iters=4, **common))
    train.train(config(data_root, split, max_iters=8, init_from="resume", **common))
    losses = {e["iter"]: e["loss"] for e in read_log(straight)}
    resumed = {e["iter"]: e["loss"] for e in read_log(split)}
    assert list(resumed) == list(range(1, 9))  # the log is appended to on resume
    assert resumed == losses  # exact equality of floats
    a, b = final_weights(straight), final_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_says_when_the_schedule_changed(data_root, tmp_path, capsys):
    """lr_decay_iters = 0 means max_iters: resuming to a larger max_iters stretches the cosine, and the run says so
    with the settings that would continue the saved schedule."""
    train.train(config(data_root, tmp_path, max_iters=4, eval_interval=4))
    train.train(config(data_root, tmp_path, max_iters=6, eval_interval=4, init_from="resume"))
    assert ("schedule is not the saved run's: warmup, decay steps (2, 6) now, (2, 4) then (set --warmup_iters=2 "
            "--lr_decay_iters=4" in capsys.readouterr().out)
    # the checkpoint now holds the second run's schedule (2, 6): following the advice keeps it, with no message
    train.train(config(data_root, tmp_path, max_iters=8, eval_interval=4, init_from="resume", lr_decay_iters=6))
    out = capsys.readouterr().out
    assert "resuming from" in out and "schedule is not" not in out


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"x": torch.arange(3)})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"x": torch.arange(5)})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone, the old checkpoint intact
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_missing_or_corrupt_checkpoint_is_a_clear_error(data_root, tmp_path):
    cfg = config(data_root, tmp_path, max_iters=2, init_from="resume")
    with pytest.raises(train.SetupError, match="no checkpoint at .*ckpt.pt.*--init_from=scratch"):
        train.train(cfg)
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(train.SetupError, match="could not read checkpoint .*corrupt or truncated"):
        train.train(cfg)
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(train.SetupError, match="not one of train.py's: it lacks optimizer"):
        train.train(cfg)


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = dict(train.DEFAULTS, **TINY, data_root=str(tmp_path), out_dir=str(tmp_path / "out"))
    with pytest.raises(train.SetupError, match=r"no dataset at .*pystdlib.*python prepare_data.py --data_root="):
        train.train(dict(cfg, dataset="pystdlib"))
    with pytest.raises(train.SetupError, match=r"python prepare_data.py --dataset=s5 --generators=gen"):
        train.train(dict(cfg, dataset="s5_gen"))
    result = subprocess.run([sys.executable, "train.py", "--dataset=nothing_here", f"--data_root={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--dataset=files --input=PATH --name=nothing_here" in result.stderr


def test_state_tracking_data(tmp_path):
    prepare_data.main(["--dataset=parity", f"--data_root={tmp_path}", "--n_train=64", "--n_val=8",
                       "--train_max_len=12", "--eval_lens=12,24"])
    out = tmp_path / "out"
    train.train(config(str(tmp_path), out, dataset="parity", max_iters=3, eval_interval=3, block_size=12))
    evals = read_log(out, "eval")
    assert set(evals[-1]["accuracy"]) == {"12", "24"}
    assert [len(evals[-1]["accuracy_by_position"][n]) for n in ("12", "24")] == [12, 24]
    assert all(0 <= a <= 1 for a in evals[-1]["accuracy"].values())
    assert set(evals[-1]["losses"]) == {"train", "val_L12", "val_L24", "val"}
    assert len(read_log(out)) == 3
    with pytest.raises(train.SetupError, match="rows are 12 long: set block_size >= 12"):
        train.train(config(str(tmp_path), out, dataset="parity", max_iters=1, block_size=8))


# -----------------------------------------------------------------------------------------------------------
# DDP

def test_ddp_two_processes_match_one(data_root, tmp_path):
    """torchrun with 2 gloo processes x 2 micro-batches == 1 process x 4 micro-batches: every process draws the
    whole global batch's indices from the same RNG and keeps its half, and DDP averages the two halves' gradients.
    Equal up to float rounding (the gradient sums are added in another order)."""
    common = dict(max_iters=4, eval_interval=4, gradient_accumulation_steps=4)
    train.train(config(data_root, tmp_path / "one", **common))
    # buckets of 1 MiB, not the default 25: the setting reaches DDP and changes only when sums are sent
    args = [f"--{k}={v}" for k, v in config(data_root, tmp_path / "two", **common, ddp_bucket_cap_mb=1).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [e["iter"] for e in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([e["loss"] for e in two], [e["loss"] for e in one], rtol=1e-5)
    for e1, e2 in zip(read_log(tmp_path / "one", "eval"), read_log(tmp_path / "two", "eval")):  # split over ranks
        assert e1["iter"] == e2["iter"] and e1["losses"] == pytest.approx(e2["losses"], rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_needs_a_divisible_accumulation(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # as torchrun sets it, for the first of 2 processes
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.SetupError, match="gradient_accumulation_steps=3 must be a multiple of the number of "
                                               r"processes \(2\)"):
        train.train(config(data_root, tmp_path, gradient_accumulation_steps=3))


def test_unknown_device_is_a_clear_error():
    with pytest.raises(train.SetupError, match="device='gpu' is not a device torch knows: use 'cpu', 'cuda'"):
        train.processes_and_device(dict(train.DEFAULTS, device="gpu"))
