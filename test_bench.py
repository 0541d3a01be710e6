"""
Tests of bench.py on the CPU: the CPU smoke run (every code path at tiny sizes, as a subprocess), the models it
builds from the config files, and clear errors for bad flags.

    python -m pytest -q test_bench.py
"""
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
SMOKE = ["--device=cpu", "--compile=False", "--threads=1", "--n_layer=3", "--n_embd=64", "--n_head=2",
         "--m2rnn_heads=4", "--m2rnn_k_dim=16", "--m2rnn_v_dim=16", "--mlp_hidden=128", "--block_size=32",
         "--batch_size=2", "--vocab_size=256", "--warmup=1", "--steps=2", "--gen_positions=8,16", "--gen_steps=3"]


def test_cpu_smoke_run(tmp_path):
    baseline = tmp_path / "one.json"  # as if from an earlier run: adds the 'vs baseline' column
    baseline.write_text(json.dumps({"train": [{"model": m, "tokens_per_s": 100.0} for m in bench.MODELS]}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "bench.py", *SMOKE, f"--out={out}", f"--baseline={baseline}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "bench.md").read_text()
    assert table.strip() in result.stdout
    training = table.split("\n\n")[1]  # header line, training table, decoding table, latency ratios
    rows = {cells[0]: cells for cells in (re.split(r"\s*\|\s*", line)[1:-1] for line in training.splitlines()[2:])}
    for name, layers in [("gpt", "AAA"), ("hybrid", "MMA"), ("m2rnn", "MMM"), ("one_m", "MAA")]:
        model, pattern, params, shape, step_ms, tokens_s, vs_gpt, mfu, peak, vs_base = rows[name]
        assert pattern == layers and shape == "2 x 32 x 1" and mfu == "-" and peak == "-"  # no GPU: no MFU, peak
        assert float(params[:-1]) > 0 and float(step_ms) > 0 and float(tokens_s.replace(",", "")) > 0
        assert float(vs_gpt) > 0 and float(vs_base) > 0
    assert rows["gpt"][6] == "1.000"
    results = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in results["train"]] == list(bench.MODELS)
    gen = [(r["model"], r["position"]) for r in results["generate"]]  # gen_rounds (3) sweeps pooled: one row each
    assert gen == [("gpt", 8), ("gpt", 16), ("hybrid", 8), ("hybrid", 16)]
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["cache_mib"] > 0 for r in results["generate"])
    assert "- hybrid: ms/token at position 16 / at 8 = " in table
    if importlib.util.find_spec("matplotlib"):  # the plot beside the tables, or a line that says what it needs
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "bench.png").exists() and "pip install matplotlib" in result.stdout


def test_decoding_pools_the_rounds(monkeypatch):
    """Each position's ms/token is the median of every round's steps, not of one sweep: timed steps faked so
    that call i (positions in order, round after round) takes i + 1 ms."""
    s, overrides = bench.parse_args(SMOKE[:-3] + ["--gen_positions=8,16", "--gen_steps=2", "--gen_rounds=3"])
    cfg, args = bench.model_args("hybrid", overrides, s)
    calls = []

    def fake_step_times(fn, n, device):
        fn()  # one real decode step, so the code around it runs
        calls.append(n)
        return [len(calls) / 1e3] * n
    monkeypatch.setattr(bench, "step_times", fake_step_times)
    rows = bench.bench_generate("hybrid", cfg, args, s, torch.device("cpu"), contextlib.nullcontext(), torch.float32)
    assert calls == [2] * 6  # 2 positions x 3 rounds
    assert [(r["position"], r["ms_per_token"]) for r in rows] == [(8, 3.0), (16, 4.0)]  # medians of 1,3,5 and 2,4,6


def test_models_from_the_configs_at_equal_size():
    s, _ = bench.parse_args([])
    counts = {}
    for name, pattern, pos in [("gpt", "A" * 12, "rope"), ("hybrid", "MMAMMMMMMMAM", "none"),
                               ("m2rnn", "M" * 12, "none"), ("one_m", "M" + "A" * 11, "rope")]:
        cfg, args = bench.model_args(name, [], s)
        assert (args["layer_pattern"], args["pos_encoding"], args["block_size"]) == (pattern, pos, 1024)
        assert cfg["batch_size"] == 12 and args["vocab_size"] == 50257
        # one gradient bucket under DDP wherever an M²RNN layer is (README, "Whole models")
        assert cfg["ddp_bucket_cap_mb"] == (1000 if "M" in pattern else 25)
        with torch.device("meta"):  # full size, no memory
            counts[name] = GPT(GPTConfig(**args)).get_num_params()
    assert max(counts.values()) / min(counts.values()) < 1.02, counts
    _, args = bench.model_args("hybrid", ["--n_layer=3", "--batch_size=4"], s)
    assert args["layer_pattern"] == "MMA" and args["n_layer"] == 3


def test_flags_are_typed_like_their_defaults():
    s, overrides = bench.parse_args(["--steps=3", "--mode=train", "--gen_positions=128", "--n_layer=3", "--out=o"])
    assert (s["steps"], s["mode"], s["gen_positions"], s["out"]) == (3, "train", (128,), "o")
    assert overrides == ["--n_layer=3"]
    assert bench.parse_args(["--gen_positions=8,16"])[0]["gen_positions"] == (8, 16)


@pytest.mark.parametrize("argv,message", [
    (["--step=3"], r"unknown setting 'step'\. Did you mean 'steps'\?"),
    (["--learning_rate=1e-3"], "unknown setting 'learning_rate'.*overrides of the configs: block_size"),
    (["--layer_pattern=MA"], "unknown setting 'layer_pattern'"),
    (["--steps=2.5"], "steps must be of type int like its default 20, got 2.5"),
    (["--gen_positions=8,x"], "gen_positions must be of type tuple"),
    (["--gen_positions=0,8"], "--gen_positions must be distinct positive ints"),
    (["--gen_positions=8,8"], "--gen_positions must be distinct positive ints"),
    (["--n_layer=three"], "n_layer must be of type int"),
    (["--models=gpt,gtp"], r"unknown model\(s\) \['gtp'\]"),
    (["--mode=both"], r"mode must be one of \('train', 'generate', 'all'\), got 'both'"),
    (["--steps"], "expected --key=value"),
    (["--steps=0"], "--steps must be at least 1, got 0"),
    (["--gen_rounds=0"], "--gen_rounds must be at least 1, got 0"),
], ids=["typo", "train-only-setting", "pattern", "float-for-int", "bad-tuple", "zero-position", "same-position", "bad-override",
        "bad-model", "bad-mode", "no-value", "no-steps", "no-rounds"])
def test_flag_errors(argv, message):
    with pytest.raises(bench.SetupError, match=message):
        bench.parse_args(argv)


def test_flag_error_on_the_command_line():
    result = subprocess.run([sys.executable, "bench.py", "--batchsize=2"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unknown setting 'batchsize'. Did you mean 'batch_size'?" in result.stderr
