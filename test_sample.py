"""
sample.py end to end on the CPU: a tiny model trained by train.py, then sampled through the command line, and
sample.py's clear errors (its --key=value settings are checked by train.py's configurator).

    python -m pytest -q test_sample.py
"""
import os
import re
import subprocess
import sys

import pytest

import train
from test_train import REPO, config, data_root  # noqa: F401  (data_root is a fixture)


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):  # noqa: F811
    out_dir = tmp_path_factory.mktemp("out")
    train.train(config(data_root, out_dir, max_iters=40, eval_interval=40))
    return str(out_dir)


def test_sample_greedy_continues_the_training_text(trained):
    """The toy text repeats 'def add(a, b):\\n    return a + b ...': greedy decoding from 'def ' must produce
    the characters of that text (a model that learned nothing prints noise)."""
    result = run_sample(f"--out_dir={trained}", "--start=def ", "--num_samples=1", "--max_new_tokens=40",
                        "--temperature=0", "--top_k=None", "--device=cpu", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("---------------")[0]
    text = text[text.index("def "):]  # after the model's one-line summary
    assert len(text) >= 4 + 40
    assert set(text) <= set("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 1\n"), text


@pytest.mark.parametrize("args,message", [
    (["--max_new_token=5"], "unknown setting 'max_new_token'.*Did you mean 'max_new_tokens'"),
    (["--top_k=1.5"], "top_k must be of type int like its default 200 \\(or None\\)"),
    (["--dtype=float64"], "dtype must be one of"),
    (["--out_dir=/nonexistent/run"], "ckpt.pt"),
    (["--top_k=0"], "top_k must be at least 1 \\(or None: all tokens\\)"),
    (["--temperature=-1"], "temperature at least 0"),
])
def test_sample_errors_say_what_to_do(args, message):
    result = run_sample(*args, "--device=cpu")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_sample_prompt_file_must_exist(trained):
    result = run_sample(f"--out_dir={trained}", "--start=FILE:/nonexistent/prompt.txt", "--device=cpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--start=FILE:/nonexistent/prompt.txt: no such file" in result.stderr, result.stderr
