"""
Tests of model.py on the CPU (the M²RNN recurrence runs as the reference loop here).

    python -m pytest -q test_model.py
"""
import math
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, M2RNNBlock

VOCAB = 61
FAMILIES = {  # id: GPTConfig overrides of a tiny model
    "attention-rope": dict(layer_pattern="AA", pos_encoding="rope"),
    "hybrid": dict(layer_pattern="MAM"),
    "m2rnn": dict(layer_pattern="MM"),
    "linear-ablation": dict(layer_pattern="MA", m2rnn_linear=True),
    "gdn-hybrid": dict(layer_pattern="MGAG"),  # Gated DeltaNet, M²RNN and attention (test_gdn.py tests GDN alone)
}


def tiny(**overrides):
    args = dict(block_size=16, vocab_size=VOCAB, n_embd=32, n_head=4, m2rnn_heads=4, m2rnn_k_dim=8,
                m2rnn_v_dim=4, m2rnn_q_heads=1, m2rnn_k_heads=2, mlp_hidden=48)
    args.update(overrides)
    args.setdefault("n_layer", len(args.get("layer_pattern") or "MAM"))
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def rel_err(a, b):
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert math.isfinite(err), "NaN or inf"
    return err


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_initial_loss(family):
    model = tiny(**FAMILIES[family])
    idx = torch.randint(0, VOCAB, (3, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1  # ignored
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.3  # near uniform at init
    logits_only, no_loss = model(idx)
    assert logits_only.shape == (3, 10, VOCAB) and no_loss is None
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("prompt_len", [1, 5])
@pytest.mark.parametrize("family", ["hybrid", "linear-ablation", "attention-rope", "gdn-hybrid"])
def test_incremental_logits_match_full_forward(family, prompt_len):
    """prefill + forward_step at each position reproduce the full forward's logits."""
    model = tiny(**FAMILIES[family]).eval()
    with torch.no_grad():  # weights away from init, so every term matters (W != I, D != 1, conv ...)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    B, S = 2, 12
    idx = torch.randint(0, VOCAB, (B, S))
    with torch.no_grad():
        full, _ = model(idx)  # (B,S,vocab)
        state = model.init_state(B, "cpu")
        logits = model.prefill(idx[:, :prompt_len], state)
        assert rel_err(logits, full[:, prompt_len - 1]) < 1e-4
        for pos in range(prompt_len, S):
            logits = model.forward_step(idx[:, pos], state, pos)
            assert rel_err(logits, full[:, pos]) < 1e-4, f"position {pos}"


def test_generate_greedy_matches_full_forward_and_restarts():
    model = tiny(**FAMILIES["hybrid"]).eval()
    idx = torch.randint(0, VOCAB, (2, 3))
    out = torch.stack(list(model.generate(idx, 6, temperature=0)), dim=1)  # (2,6)
    seq = idx
    for _ in range(6):  # the uncached way: full forward, argmax of the last position
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 3:])
    # past block_size (16) the attention cache fills up and generation restarts from half a window
    tokens = list(model.generate(idx, 40, temperature=1.0, top_k=5))
    assert len(tokens) == 40 and all(t.shape == (2,) and 0 <= t.min() and t.max() < VOCAB for t in tokens)
    state = model.init_state(2, "cpu")
    model.prefill(torch.zeros(2, 16, dtype=torch.long), state)
    with pytest.raises(ValueError, match="KV cache is full"):
        model.forward_step(torch.zeros(2, dtype=torch.long), state, 16)


def test_m2rnn_gate_and_init():
    model = tiny(layer_pattern="MM")
    block = model.transformer.h[0].mixer
    assert isinstance(block, M2RNNBlock)
    H, V = block.H, block.V
    assert torch.equal(block.W.data, torch.eye(V).expand(H, V, V))
    assert torch.equal(block.D.data, torch.ones(H))
    dt = F.softplus(block.dt_bias.data)  # softplus(softplus⁻¹(dt)) = dt
    assert ((dt > 1e-3 * 0.999) & (dt < 1e-1 * 1.001)).all()
    A = block.A_log.data.exp()
    assert ((A >= 1e-4 * 0.999) & (A <= 16)).all()
    f_raw = 5 * torch.randn(3, 7, H)
    f = block.forget_gate(f_raw)
    assert f.dtype == torch.float32 and ((f > 0) & (f < 1)).all()
    expected = torch.exp(-torch.exp(block.A_log) * F.softplus(f_raw + block.dt_bias))
    torch.testing.assert_close(f, expected)
    # conv and norm exist, the ablation has no W
    assert not hasattr(tiny(layer_pattern="MM", m2rnn_linear=True).transformer.h[0].mixer, "W")
    # the conv's output is causal and (B,S,Ch)-contiguous: the kernel reads one step's channels at a time
    x = torch.randn(2, 7, block.Ch)
    y = block.conv(x)
    assert y.is_contiguous() and y.shape == x.shape
    x2 = x.clone()
    x2[:, 4:] += 1.0
    y2 = block.conv(x2)
    assert torch.equal(y2[:, :4], y[:, :4]) and not torch.equal(y2[:, 4], y[:, 4])
    # and it is the depthwise conv of the spec (§2) with SiLU: PyTorch's conv1d, left-padded, as the definition
    ks = block.conv.kernel_size[0]
    expected = F.silu(F.conv1d(x.transpose(1, 2), block.conv.weight, padding=ks - 1, groups=block.Ch)[..., :7])
    torch.testing.assert_close(y, expected.transpose(1, 2))


def test_no_decay_groups():
    model = tiny(layer_pattern="MA")
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    expected = {f"transformer.h.{i}.{n}" for i in range(2) for n in ("norm_1.weight", "norm_2.weight")}
    expected |= {f"transformer.h.0.mixer.{n}" for n in ("A_log", "dt_bias", "D", "norm.weight")}
    expected |= {"transformer.ln_f.weight"}
    assert no_decay == expected
    assert "transformer.h.0.mixer.W" in decay and decay | no_decay == set(names.values())


def test_adamw_lowers_loss():
    model = tiny(**FAMILIES["hybrid"])
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 1e-8, "cpu")
    idx = torch.randint(0, VOCAB, (4, 8))
    targets = torch.randint(0, VOCAB, (4, 8))
    losses = []
    for _ in range(8):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layer=3, layer_pattern="MA"), "2 chars but n_layer = 3"),
    (dict(n_layer=2, layer_pattern="MX"), r"unknown layer kind\(s\) \['X'\]"),
    (dict(n_layer=1, layer_pattern="A", n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=1, layer_pattern="M", m2rnn_heads=6, m2rnn_q_heads=4), "m2rnn_q_heads .4. must divide"),
    (dict(n_layer=1, layer_pattern="M", m2rnn_k_heads=3, m2rnn_heads=4), "m2rnn_k_heads .3. must divide"),
    (dict(pos_encoding="alibi"), "pos_encoding must be"),
    (dict(m2rnn_impl="cuda"), "m2rnn_impl must be"),
    (dict(gdn_impl="cuda"), "gdn_impl must be"),
    (dict(n_layer=0), "n_layer must be a positive int"),
], ids=["pattern-length", "pattern-char", "n_head", "q-heads", "k-heads", "pos", "impl", "gdn-impl", "n_layer"])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**overrides)


def test_config_defaults():
    c = GPTConfig(n_layer=24, n_embd=1024, n_head=16)
    assert c.layer_pattern == "".join("A" if i in (4, 12, 20) else "M" for i in range(24))  # the paper's hybrid
    assert c.pos_encoding == "none" and c.m2rnn_heads * c.m2rnn_v_dim == 1024
    assert GPTConfig(n_layer=2, layer_pattern="AA").pos_encoding == "rope"


def test_flops_and_mfu():
    model = tiny(**FAMILIES["hybrid"])
    assert model.flops_per_token() > 6 * model.get_num_params()
    assert model.estimate_mfu(1, 1.0, peak_flops=1e12) == pytest.approx(model.flops_per_token() * 16 / 1e12)
    assert model.estimate_mfu(1, 1.0) is None  # on the CPU (GPU or not beside it): no number rather than a wrong one


def test_compile_fullgraph_matches_eager():
    """fullgraph=True: dynamo and AOTAutograd trace the whole forward and backward with no graph break.
    The backend is aot_eager: inductor's C++ code generation on the CPU takes minutes for this unrolled
    loop (M2RNN_TEST_INDUCTOR=1 runs it anyway); on CUDA, training compiles with inductor."""
    backend = "inductor" if os.environ.get("M2RNN_TEST_INDUCTOR") == "1" else "aot_eager"
    model = tiny(layer_pattern="MA", n_layer=2)
    idx = torch.randint(0, VOCAB, (2, 6))
    targets = torch.randint(0, VOCAB, (2, 6))
    _, loss = model(idx, targets)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    _, loss_c = compiled(idx, targets)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, eager[n]) < 1e-3, n


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model = tiny(**FAMILIES["hybrid"])
    path = tmp_path / "ckpt.pt"
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
    torch.save({"model": state, "model_args": asdict(model.config), "config": {"dataset": "x"}, "iter_num": 3}, path)
    loaded, info = GPT.from_checkpoint(str(path), "cpu")
    idx = torch.randint(0, VOCAB, (1, 5))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])
    assert info["iter_num"] == 3 and "model" not in info
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        GPT.from_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        GPT.from_checkpoint(str(tmp_path / "bad.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        GPT.from_checkpoint(str(tmp_path / "other.pt"))
    torch.save({"model": state, "model_args": {**asdict(model.config), "m2rnn_v_dim": 8}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="do not fit"):
        GPT.from_checkpoint(str(tmp_path / "wrong.pt"))
