"""
Tests of compare_runs.py on the CPU: two tiny runs of train.py (an M²RNN hybrid and a Gated DeltaNet hybrid) write
real log.jsonl files; the table must report what they logged, and the plot must be written (or its absence
explained).

    python -m pytest -q test_compare_runs.py
"""
import importlib.util
import json
import os
import shutil
import statistics
import sys

import pytest

import compare_runs
import train
from test_train import config, data_root  # noqa: F401  (data_root is a pytest fixture: the toy dataset)

SMALL_GDN = dict(gdn_heads=2, gdn_k_dim=8, gdn_v_dim=16)  # train.py's defaults are the 768-wide model's


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):  # noqa: F811
    """Two out_dirs, 4 steps each with the same seed and data, evaluated every 2 steps; the GDN run stops at step 2
    and is resumed to 4 (its log: two start events, evaluations at steps 0, 2, 2, 4)."""
    root = tmp_path_factory.mktemp("runs")
    dirs = [str(root / "m2rnn"), str(root / "gdn")]
    common = dict(eval_interval=2, lr_decay_iters=4, **SMALL_GDN)
    train.train(config(data_root, dirs[0], layer_pattern="MA", max_iters=4, **common))
    train.train(config(data_root, dirs[1], layer_pattern="GA", max_iters=2, **common))
    train.train(config(data_root, dirs[1], layer_pattern="GA", max_iters=4, init_from="resume", **common))
    return dirs


def events(out_dir, kind):
    """The log.jsonl events of one kind ('start', 'train', 'eval'), or all of them (kind None)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [e for e in map(json.loads, f) if kind in (None, e["event"])]


def test_table_reports_the_logs(runs, tmp_path):
    md = tmp_path / "table.md"
    result = compare_runs.main(runs + ["--labels=M2RNN hybrid,GDN hybrid", "--png=", f"--md={md}"])
    for r, out_dir, label in zip(result, runs, ("M2RNN hybrid", "GDN hybrid")):
        starts, evals = events(out_dir, "start"), events(out_dir, "eval")
        vals = [e["losses"]["val"] for e in evals]
        assert r["label"] == label and r["n_params"] == starts[0]["n_params"] > 0
        assert r["tokens_seen"] == 4 * 2 * 4 * 16  # steps x micro-batches x batch x block
        assert r["final_val"] == vals[-1] and r["best_val"] == min(vals)
    first, resumed = result
    log = events(runs[0], None)
    speeds = [e["tokens_per_s"] for e in log if e["event"] == "train"][1:]  # the first step includes compiling
    assert first["tokens_per_s"] == pytest.approx(statistics.median(speeds))
    assert first["wall_s"] == pytest.approx(log[-1]["time"] - log[0]["time"])  # start to the last eval
    # the resumed run: wall time is the sum of the two segments, and the first step after each start is not speed
    log = events(runs[1], None)
    assert [e["event"] for e in log if e["event"] != "train"] == ["start", "eval", "eval", "start", "eval", "eval"]
    cut = [i for i, e in enumerate(log) if e["event"] == "start"][1]
    segments = (log[cut - 1]["time"] - log[0]["time"]) + (log[-1]["time"] - log[cut]["time"])
    assert resumed["wall_s"] == pytest.approx(segments)
    speeds = [e["tokens_per_s"] for e in log if e["event"] == "train" and e["iter"] in (2, 4)]
    assert resumed["tokens_per_s"] == pytest.approx(statistics.median(speeds))
    # state per layer: M²RNN H·K·V = 2·8·8, GDN Hg·Kg·Vg = 2·8·16, attention 2·d = 64 per token
    assert result[0]["state"] == {"M": ("2·8·8", 128), "A": ("2·32", 64)}
    assert result[1]["state"] == {"G": ("2·8·16", 256), "A": ("2·32", 64)}
    assert result[0]["state_total"] == 128 + 64 * 16 and result[1]["state_total"] == 256 + 64 * 16  # block 16
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| GDN hybrid"))
    assert f"{result[1]['final_val']:.4f}" in row and "`GA`" in row and "G 2·8·16 = 256" in row
    assert "Data `toy`, seed 1337, 4 steps of 128 tokens" in text and "stopped" not in text


def test_plot_or_a_clear_message(runs, tmp_path, monkeypatch, capsys):
    png = tmp_path / "loss.png"
    if importlib.util.find_spec("matplotlib"):
        compare_runs.main(runs + [f"--png={png}"])
        assert png.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(compare_runs.CompareError, match="the plot needs matplotlib: pip install matplotlib"):
        compare_runs.main(runs + [f"--png={png}"])
    assert "| MA | `MA` |" in capsys.readouterr().out  # the table is printed before the plot is tried


def test_errors(runs, tmp_path):
    with pytest.raises(compare_runs.CompareError, match="log.jsonl not found"):
        compare_runs.main([str(tmp_path), "--png="])
    with pytest.raises(SystemExit):  # argparse: --labels must name every run
        compare_runs.main(runs + ["--labels=only one", "--png="])


def test_default_labels_tell_runs_of_one_pattern_apart(runs, tmp_path):
    """Without --labels a run is named by its layer pattern; two runs of the same pattern also by their folders."""
    assert [r["label"] for r in compare_runs.main(runs + ["--png="])] == ["MA", "GA"]
    other = shutil.copytree(runs[0], tmp_path / "other")
    same = compare_runs.main([runs[0], str(other) + "/", runs[1], "--png="])
    assert [r["label"] for r in same] == ["MA (m2rnn)", "MA (other)", "GA"]
