"""
Tests of the Gated DeltaNet mixer ('G' in layer_pattern) of model.py. On the CPU: the reference recurrence against
a case worked by hand, the parameters' init and weight decay, the error when flash-linear-attention is missing.
Generation (incremental == full forward) for a GDN hybrid is in test_model.py (family "gdn-hybrid").
On a GPU with flash-linear-attention installed: fla's chunked kernel against the reference, and a GDN model.

    python -m pytest -q test_gdn.py
"""
import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from model import GPT, FLA_MISSING, GatedDeltaNet, GPTConfig, gated_delta_rule, gated_delta_rule_reference
from test_model import rel_err

VOCAB = 61


def tiny(layer_pattern, **overrides):
    args = dict(block_size=128, vocab_size=VOCAB, n_embd=32, n_head=4, m2rnn_heads=4, m2rnn_k_dim=8, m2rnn_v_dim=4,
                mlp_hidden=48)
    args.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=len(layer_pattern), layer_pattern=layer_pattern, **args))


def test_reference_by_hand():
    """One head, Kg = Vg = 2, two steps, unit keys:
      t=1: S_0 = 0, g = 0, beta = 1/2, k = (1,0), v = (2,4):  v − S_0ᵀk = (2,4),  S_1 = 1/2 k (2,4) = [[1,2],[0,0]];
           q = (1,0): o_1 = S_1ᵀ q = (1,2)
      t=2: g = log 1/2: S = 1/2 S_1 = [[.5,1],[0,0]]; k = (.6,.8): Sᵀk = (.3,.6); v = (1,1): v − Sᵀk = (.7,.4);
           beta = 1: S_2 = S + k (.7,.4) = [[.92,1.24],[.56,.32]];  q = (0,1): o_2 = S_2ᵀ q = (.56,.32)
    With beta = 1 the write is exact: S_2ᵀ k_2 = v_2 (the delta rule replaces what k_2 read by v_2)."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # (B,S,Hg,Kg)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]]).view(1, 2, 1, 2)
    v = torch.tensor([[2.0, 4.0], [1.0, 1.0]]).view(1, 2, 1, 2)  # (B,S,Hg,Vg)
    g = torch.tensor([0.0, math.log(0.5)]).view(1, 2, 1)  # (B,S,Hg)
    beta = torch.tensor([0.5, 1.0]).view(1, 2, 1)
    o, s = gated_delta_rule_reference(q, k, v, g, beta)
    torch.testing.assert_close(o, torch.tensor([[1.0, 2.0], [0.56, 0.32]]).view(1, 2, 1, 2))
    torch.testing.assert_close(s, torch.tensor([[0.92, 1.24], [0.56, 0.32]]).view(1, 1, 2, 2))
    torch.testing.assert_close(s[0, 0].t() @ k[0, 1, 0], v[0, 1, 0])
    # from a given state: the second step alone, starting at S_1
    o2, s2 = gated_delta_rule_reference(q[:, 1:], k[:, 1:], v[:, 1:], g[:, 1:], beta[:, 1:],
                                        h0=torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(1, 1, 2, 2))
    torch.testing.assert_close((o2, s2), (o[:, 1:], s))


def test_init_shapes_and_no_decay():
    model = tiny("GA")
    block = model.transformer.h[0].mixer
    assert isinstance(block, GatedDeltaNet)
    assert (block.Hg, block.Kg, block.Vg) == (2, 8, 16)  # defaults: Hg·Kg = d/2, Vg = 2·Kg
    dt = F.softplus(block.dt_bias.data)
    assert ((dt > 1e-3 * 0.999) & (dt < 1e-1 * 1.001)).all()
    assert ((block.A_log.data.exp() >= 1e-4 * 0.999) & (block.A_log.data.exp() <= 16)).all()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert {f"transformer.h.0.mixer.{n}" for n in ("A_log", "dt_bias", "norm.weight")} <= no_decay
    assert not {f"transformer.h.0.mixer.{n}.weight" for n in ("in_proj", "conv", "out_proj")} & no_decay
    idx = torch.randint(0, VOCAB, (2, 9))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, VOCAB) and abs(loss.item() - math.log(VOCAB)) < 0.3


def test_missing_fla_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)  # makes the import fail
    x = torch.zeros(1, 3, 1, 2)
    with pytest.raises(ImportError, match="pip install flash-linear-attention") as info:
        gated_delta_rule(x, x, x, x[..., 0], x[..., 0], impl="fla")  # 'fla': the path CUDA takes with 'auto'
    assert str(info.value) == FLA_MISSING and "tilelang" in FLA_MISSING and "gdn_impl='torch'" in FLA_MISSING


# -----------------------------------------------------------------------------------------------------------------
# GPU: fla's kernel against the reference. Run: python -m pytest -q test_gdn.py -k gpu -rs


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("fla") is None:
        return "needs flash-linear-attention (pip install flash-linear-attention)"
    return ""


gpu = pytest.mark.skipif(_gpu_skip_reason() != "", reason=_gpu_skip_reason())


@gpu
@pytest.mark.parametrize("B, S, Hg, Kg, Vg", [(2, 100, 2, 64, 128), (1, 130, 2, 192, 384)],
                         ids=["B2-S100-H2-K64-V128", "B1-S130-H2-K192-V384-hybrid_gdn"])
def test_gpu_fla_matches_reference(B, S, Hg, Kg, Vg):
    """bf16 inputs through fla's chunked kernel vs the float64 reference on the same values: the output, the last
    state and the gradients of every input (relative norm error < 2e-2). Lengths are not multiples of 64."""
    torch.manual_seed(0)
    cuda = dict(device="cuda")
    q = F.normalize(torch.randn(B, S, Hg, Kg, **cuda), dim=-1) * Kg ** -0.5
    k = F.normalize(torch.randn(B, S, Hg, Kg, **cuda), dim=-1)
    v = torch.randn(B, S, Hg, Vg, **cuda)
    g = -1.6 * torch.rand(B, S, Hg, **cuda)  # log decay, the range of the layer at init
    beta = torch.rand(B, S, Hg, **cuda)
    inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)] + [g.requires_grad_(), beta.bfloat16().requires_grad_()]
    o, s = gated_delta_rule(*inputs, impl="fla")
    do, ds = torch.randn(o.shape, **cuda), torch.randn(s.shape, **cuda)
    ((o.float() * do).sum() + (s.float() * ds).sum()).backward()
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, s_ref = gated_delta_rule_reference(*ref_inputs)
    ((o_ref * do.double()).sum() + (s_ref * ds.double()).sum()).backward()
    assert o.shape == o_ref.shape and s.shape == s_ref.shape  # the state (B,Hg,Kg,Vg), not V first
    assert rel_err(o.double(), o_ref) < 2e-2
    assert rel_err(s.double(), s_ref) < 2e-2
    for name, t, r in zip(("q", "k", "v", "g", "beta"), inputs, ref_inputs):
        assert rel_err(t.grad.double(), r.grad) < 2e-2, name


@gpu
def test_gpu_model_fla_matches_torch_and_generates():
    """A GDN hybrid under bf16 autocast: fla's path against the reference loop (logits and a backward), then
    generation: prefill through fla, steps through the reference, against the full forward."""
    model = tiny("GAG", n_embd=128, gdn_heads=2).cuda()
    idx = torch.randint(0, VOCAB, (2, 100), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
        loss.backward()  # fla's backward: on Hopper with Triton < 3.7.1 it needs tilelang
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        with torch.no_grad():
            state = model.init_state(2, "cuda")
            prefilled = model.prefill(idx[:, :90], state)
            stepped = [model.forward_step(idx[:, pos], state, pos) for pos in range(90, 100)]
            for block in model.transformer.h:
                if isinstance(block.mixer, GatedDeltaNet):
                    block.mixer.impl = "torch"
            reference, _ = model(idx)
    assert rel_err(logits.float(), reference.float()) < 2e-2
    assert rel_err(prefilled.float(), reference[:, 89].float()) < 2e-2
    assert rel_err(torch.stack(stepped, 1).float(), reference[:, 90:].float()) < 2e-2
