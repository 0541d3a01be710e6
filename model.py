"""
A GPT whose layers mix causal self-attention with M²RNN, a non-linear RNN with matrix-valued states
(Mishra, Tan, Stoica, Gonzalez, Dao: "M²RNN: Non-Linear RNNs with Matrix-Valued States for Scalable
Language Modeling", arXiv 2603.14360). nanoGPT's skeleton: config, blocks, GPT, optimizer, MFU, sampling.

The M²RNN layer (spec §2), for an input x (B,S,d):

    q, k, v, f_raw, g = in_proj(x)                    no bias; q,k,v go through a causal conv + SiLU
    f_t = exp(−exp(A_log) · softplus(f_raw_t + dt_bias))   forget gate in (0,1), per head, in fp32
    Z_t = tanh(H_{t-1} W + k_t v_tᵀ)                  the state H_t is a K×V matrix per head
    H_t = f_t · H_{t-1} + (1 − f_t) · Z_t
    y_t = H_tᵀ q_t + D ⊙ v_t                          read-out plus a learned per-head skip
    out = out_proj(RMSNorm(y ⊙ SiLU(g)))              norm over all H·V features

The recurrence itself (with its Triton kernel) lives in m2rnn_kernel.py; this file owns everything around it.
Every layer is a pre-norm residual block: x + mixer(norm(x)), then x + SwiGLU(norm(x)). The mixer of layer i
is chosen by config.layer_pattern[i]: 'A' attention, 'M' M²RNN, 'G' Gated DeltaNet (see MIXERS at the end of
the layer classes). Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv 2412.06464) is the paper's linear baseline,
laid out as flash-linear-attention's layer; on CUDA it runs fla's kernel (an optional dependency):

    q, k, v, beta_raw, a_raw, gate = in_proj(x)       q,k,v: causal conv + SiLU; q, k L2-normalised, q · Kg^-0.5
    beta_t = sigmoid(beta_raw_t),  g_t = −exp(A_log) · softplus(a_raw_t + dt_bias)    per head; g_t log decay
    S_t = exp(g_t) · S_{t-1};  S_t = S_t + beta_t · k_t (v_t − S_tᵀ k_t)ᵀ               the delta rule, S_t Kg×Vg
    o_t = S_tᵀ q_t;  out = out_proj(RMSNorm(o) ⊙ SiLU(gate))                            norm per head

Glossary of dimension letters (shape comments at line ends use them):
    B batch, S sequence length, d model width (n_embd), L layers, vocab vocabulary size
    nh attention heads, hs attention head size (d / nh)
    H M²RNN heads, K key dim (rows of the state), V value dim (columns), Hq / Hk heads of q / k (shared by
    consecutive groups of the H heads), Ch conv channels = Hq·K + Hk·K + H·V, ks conv kernel size
    Hg Gated DeltaNet heads, Kg / Vg its key / value head dims (rows / columns of its state S); its conv has
    Ch = 2·Hg·Kg + Hg·Vg channels
"""
import inspect
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2rnn_kernel import causal_conv_silu, m2rnn, m2rnn_step


@dataclass
class GPTConfig:
    block_size: int = 1024  # training length; length of the attention KV cache in generation
    vocab_size: int = 50304
    n_layer: int = 12
    n_embd: int = 768
    layer_pattern: Optional[str] = None  # one char per layer, 'A' attention / 'M' M²RNN; None: the paper's hybrid
    n_head: int = 12  # attention heads
    pos_encoding: str = "auto"  # 'rope' | 'none' | 'auto': rope iff every layer is attention (hybrids: none)
    m2rnn_heads: Optional[int] = None  # H; None: n_embd // m2rnn_v_dim (state width H·V = d)
    m2rnn_k_dim: int = 64  # K
    m2rnn_v_dim: int = 16  # V
    m2rnn_q_heads: int = 1  # Hq, divides H
    m2rnn_k_heads: int = 1  # Hk, divides H
    m2rnn_conv_size: int = 4  # ks of the depthwise causal conv on q, k, v
    m2rnn_grad_clip: Optional[float] = 1.0  # clamp of the gradient reaching each state (spec §3); None: off
    m2rnn_impl: str = "auto"  # 'auto' (Triton on CUDA, reference loop on CPU) | 'triton' | 'torch'
    m2rnn_linear: bool = False  # ablation: no tanh, W fixed at 0 (gated linear attention)
    m2rnn_store_states: bool = False  # the kernel's forward keeps every state for its backward: faster, more memory
    gdn_heads: int = 2  # Hg, Gated DeltaNet ('G') heads
    gdn_k_dim: Optional[int] = None  # Kg; None: n_embd // (2·Hg), key width d/2 (the paper: 2 x 256 at d = 1024)
    gdn_v_dim: Optional[int] = None  # Vg; None: 2·Kg (fla's expand_v = 2)
    gdn_conv_size: int = 4  # ks of its depthwise causal conv on q, k, v
    gdn_impl: str = "auto"  # 'auto' (fla's kernel on CUDA, reference loop on CPU) | 'fla' | 'torch'
    mlp_hidden: Optional[int] = None  # SwiGLU hidden size; None: 8/3·d rounded up to a multiple of 64
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"GPTConfig: {msg}")
        # derived sizes, resolved here so that asdict(config) round-trips through GPTConfig(**...)
        if self.layer_pattern is None:  # the paper's layout (attention at 4, 12, 20 of 24), for any depth
            self.layer_pattern = "".join("A" if i % 8 == 4 else "M" for i in range(self.n_layer))
        if self.m2rnn_heads is None:
            self.m2rnn_heads = max(1, self.n_embd // self.m2rnn_v_dim)
        if self.gdn_k_dim is None:
            self.gdn_k_dim = max(1, self.n_embd // (2 * self.gdn_heads))
        if self.gdn_v_dim is None:
            self.gdn_v_dim = 2 * self.gdn_k_dim
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.pos_encoding == "auto":
            self.pos_encoding = "rope" if set(self.layer_pattern) == {"A"} else "none"

        for name in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "m2rnn_heads", "m2rnn_k_dim",
                     "m2rnn_v_dim", "m2rnn_q_heads", "m2rnn_k_heads", "m2rnn_conv_size", "gdn_heads", "gdn_k_dim",
                     "gdn_v_dim", "gdn_conv_size", "mlp_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if len(self.layer_pattern) != self.n_layer:
            fail(f"layer_pattern {self.layer_pattern!r} has {len(self.layer_pattern)} chars but n_layer = "
                 f"{self.n_layer}: give exactly one char per layer")
        unknown = sorted(set(self.layer_pattern) - set(MIXERS))
        if unknown:
            fail(f"unknown layer kind(s) {unknown} in layer_pattern {self.layer_pattern!r}; known: "
                 + ", ".join(f"'{c}' {cls.__name__}" for c, cls in MIXERS.items()))
        if self.pos_encoding not in ("rope", "none"):
            fail(f"pos_encoding must be 'rope', 'none' or 'auto', got {self.pos_encoding!r}")
        if "A" in self.layer_pattern and self.n_embd % self.n_head:
            fail(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if "A" in self.layer_pattern and self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            fail(f"rope needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}")
        for name in ("m2rnn_q_heads", "m2rnn_k_heads"):
            if self.m2rnn_heads % getattr(self, name):
                fail(f"{name} ({getattr(self, name)}) must divide m2rnn_heads ({self.m2rnn_heads}): "
                     f"a shared head serves a consecutive group of heads")
        if self.m2rnn_impl not in ("auto", "triton", "torch"):
            fail(f"m2rnn_impl must be 'auto', 'triton' or 'torch', got {self.m2rnn_impl!r}")
        if self.gdn_impl not in ("auto", "fla", "torch"):
            fail(f"gdn_impl must be 'auto', 'fla' or 'torch', got {self.gdn_impl!r}")
        if self.m2rnn_grad_clip is not None and not self.m2rnn_grad_clip > 0:
            fail(f"m2rnn_grad_clip must be > 0 or None, got {self.m2rnn_grad_clip!r}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if hasattr(F, "rms_norm"):  # torch >= 2.4
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    """SwiGLU: c_proj(SiLU(x W_gate) ⊙ x W_up), no bias."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)  # [gate | up]
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (..., mlp_hidden) each
        return self.c_proj(F.silu(gate) * up)


def apply_rope(x, pos, inv_freq):
    """Rotate pairs (x[i], x[i + hs/2]) of x (B,nh,S,hs) by angle pos·inv_freq[i]; pos (S,) positions."""
    angle = pos.float()[:, None] * inv_freq[None, :]  # (S, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B,nh,S,hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through F.scaled_dot_product_attention. RoPE or no positional encoding.
    Generation keeps a KV cache of block_size positions per layer."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.hs, self.dropout = config.n_head, config.n_embd // config.n_head, config.dropout
        self.block_size = config.block_size
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # [q | k | v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.rope = config.pos_encoding == "rope"
        inv_freq = config.rope_theta ** (-torch.arange(0, self.hs, 2, dtype=torch.float32) / self.hs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,)

    def _qkv(self, x, pos):
        B, S, d = x.shape
        q, k, v = (t.view(B, S, self.n_head, self.hs).transpose(1, 2)  # (B,nh,S,hs) each
                   for t in self.c_attn(x).split(d, dim=-1))
        if self.rope:
            q, k = apply_rope(q, pos, self.inv_freq), apply_rope(k, pos, self.inv_freq)
        return q, k, v

    def forward(self, x, cache=None):
        """x (B,S,d) -> (B,S,d). Any length S (no position table); with a fresh cache, also fill it (prefill)."""
        B, S, d = x.shape
        q, k, v = self._qkv(x, torch.arange(S, device=x.device))  # (B,nh,S,hs)
        if cache is not None:
            if S > self.block_size:
                raise ValueError(f"prompt of {S} tokens does not fit the KV cache of block_size={self.block_size}")
            cache["k"][:, :, :S], cache["v"][:, :, :S], cache["length"] = k, v, S
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B,nh,S,hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, S, d))

    def init_cache(self, batch_size, device, dtype):
        shape = (batch_size, self.n_head, self.block_size, self.hs)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),  # (B,nh,block_size,hs)
                "v": torch.zeros(shape, device=device, dtype=dtype),
                "length": 0}  # positions filled

    def step(self, x, cache, pos):
        """One token x (B,d) at position pos: append its key and value to the cache, attend to all of it."""
        if pos >= self.block_size:
            raise ValueError(f"the attention KV cache is full (block_size={self.block_size}); "
                             f"GPT.generate restarts from a shorter context when that happens")
        if pos != cache["length"]:
            raise ValueError(f"step at position {pos} but the cache holds {cache['length']} positions")
        B, d = x.shape
        q, k, v = self._qkv(x[:, None], torch.full((1,), pos, device=x.device))  # (B,nh,1,hs); no host sync
        cache["k"][:, :, pos], cache["v"][:, :, pos], cache["length"] = k[:, :, 0], v[:, :, 0], pos + 1
        # one query: softmax(q Kᵀ / √hs) V written out. SDPA here meets a new key length at every token; on an
        # H200 that cost ~40 ms per token, it seems by building a cuDNN plan per length (notes_throughput.md).
        keys, values = cache["k"][:, :, :pos + 1], cache["v"][:, :, :pos + 1]  # (B,nh,pos+1,hs)
        att = (q @ keys.transpose(-2, -1)).float() * self.hs ** -0.5  # (B,nh,1,pos+1)
        y = att.softmax(dim=-1).to(values.dtype) @ values  # (B,nh,1,hs)
        return self.c_proj(y.reshape(B, d))


class CausalConv(nn.Conv1d):
    """Depthwise causal conv over time (kernel ks, no bias), then SiLU: what both recurrent mixers do to q, k, v.
    Generation keeps the last ks-1 inputs in cache["conv"] (B,ks-1,Ch)."""

    def __init__(self, channels, ks):
        super().__init__(channels, channels, ks, groups=channels, padding=ks - 1, bias=False)

    def forward(self, x, cache=None):
        """x (B,S,Ch) -> (B,S,Ch), output t from inputs t-ks+1..t. With a fresh cache, also store x's tail.
        causal_conv_silu (m2rnn_kernel.py) computes it: on CUDA two memory-bound Triton kernels (one pass over
        (B,S,Ch) forward, one backward), elsewhere the sum of ks shifted products that defines it. cuDNN's depthwise
        conv on a transposed view cost 0.26 ms more per layer's forward+backward at config/hybrid.py's shape than
        torch.compile's fusion of that sum, and the kernels ~0.2 ms less again (notes_throughput.md).
        The output is (B,S,Ch) in memory: the recurrence reads all channels of one step at a time."""
        ks = self.kernel_size[0]
        if cache is not None:
            padded = F.pad(x, (0, 0, ks - 1, 0))  # zeros before the sequence, for prompts shorter than ks-1
            cache["conv"] = padded[:, padded.shape[1] - (ks - 1):].to(cache["conv"].dtype)  # (B,ks-1,Ch)
        return causal_conv_silu(x, self.weight[:, 0])  # weight (Ch,ks): tap j reads ks-1-j steps back

    def init_cache(self, batch_size, device, dtype):
        """cache["conv"] before the first token: the zeros the causal padding puts there, (B,ks-1,Ch)."""
        return torch.zeros(batch_size, self.kernel_size[0] - 1, self.in_channels, device=device, dtype=dtype)

    def step(self, x, cache):
        """One input x (B,Ch) -> the output at its position (B,Ch); shifts cache["conv"] by one."""
        window = torch.cat([cache["conv"], x[:, None].to(cache["conv"].dtype)], dim=1)  # (B,ks,Ch) oldest first
        cache["conv"] = window[:, 1:]
        return F.silu((window * self.weight[:, 0].t()).sum(dim=1))


class M2RNNBlock(nn.Module):
    """The M²RNN mixer of spec §2: projections, conv, gate, recurrence, skip, gated norm, output projection."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.H, self.K, self.V = H, K, V = c.m2rnn_heads, c.m2rnn_k_dim, c.m2rnn_v_dim
        self.Hq, self.Hk, self.ks = c.m2rnn_q_heads, c.m2rnn_k_heads, c.m2rnn_conv_size
        self.grad_clip, self.impl, self.linear = c.m2rnn_grad_clip, c.m2rnn_impl, c.m2rnn_linear
        self.store_states = c.m2rnn_store_states
        self.sizes = [self.Hq * K, self.Hk * K, H * V, H, H * V]  # [q | k | v | f_raw | g]
        self.Ch = self.Hq * K + self.Hk * K + H * V  # channels of the conv: q, k, v
        self.in_proj = nn.Linear(c.n_embd, sum(self.sizes), bias=False)
        self.conv = CausalConv(self.Ch, self.ks)
        if not self.linear:  # the linear ablation has W = 0: no parameter
            self.W = nn.Parameter(torch.empty(H, V, V))  # state transition, one per head
        self.A_log = nn.Parameter(torch.empty(H))  # decay rate: f = exp(−exp(A_log)·dt)
        self.dt_bias = nn.Parameter(torch.empty(H))  # dt = softplus(f_raw + dt_bias)
        self.D = nn.Parameter(torch.empty(H))  # skip y += D ⊙ v
        self.norm = RMSNorm(H * V)
        self.out_proj = nn.Linear(H * V, c.n_embd, bias=False)

    def forget_gate(self, f_raw):
        """f_raw (..., H) -> f = exp(−exp(A_log) · softplus(f_raw + dt_bias)) in (0,1), float32."""
        dt = F.softplus(f_raw.float() + self.dt_bias)  # (..., H)
        return torch.exp(-torch.exp(self.A_log) * dt)

    def _transition(self, x):  # W (H,V,V), or one shared zero matrix (1,V,V) for the linear ablation
        return x.new_zeros(1, self.V, self.V, dtype=torch.float32) if self.linear else self.W

    def _output(self, y, v, g):
        """y (..., H, V) read-out, v (..., H, V), g (..., H·V) -> (..., d)."""
        y = y + self.D[:, None] * v  # learned skip, per head
        return self.out_proj(self.norm(y.flatten(-2) * F.silu(g)))

    def forward(self, x, cache=None):
        """x (B,S,d) -> (B,S,d). With a fresh cache, also store the conv inputs' tail and the last state."""
        B, S, _ = x.shape
        H, K, V = self.H, self.K, self.V
        qkv, f_raw, g = self.in_proj(x).split([self.Ch, H, H * V], dim=-1)  # (B,S,Ch) (B,S,H) (B,S,H·V)
        q, k, v = self.conv(qkv, cache).split(self.sizes[:3], dim=-1)
        q, k, v = q.view(B, S, self.Hq, K), k.view(B, S, self.Hk, K), v.view(B, S, H, V)  # (B,S,Hq,K) ...
        f = self.forget_gate(f_raw)  # (B,S,H) fp32
        y, h_last = m2rnn(q, k, v, self._transition(x), f, grad_clip=self.grad_clip, impl=self.impl,
                          nonlinear=not self.linear, store_states=self.store_states)  # (B,S,H,V), (B,H,K,V)
        if cache is not None:
            cache["h"] = h_last.float()
        return self._output(y, v, g)

    def init_cache(self, batch_size, device, dtype):
        return {"conv": self.conv.init_cache(batch_size, device, dtype),  # (B,ks-1,Ch)
                "h": torch.zeros(batch_size, self.H, self.K, self.V, device=device, dtype=torch.float32)}  # (B,H,K,V)

    def step(self, x, cache, pos):
        """One token x (B,d): O(1) work whatever pos is (pos is unused: the state carries position)."""
        B = x.shape[0]
        H, K, V = self.H, self.K, self.V
        qkv, f_raw, g = self.in_proj(x).split([self.Ch, H, H * V], dim=-1)  # (B,Ch) (B,H) (B,H·V)
        q, k, v = self.conv.step(qkv, cache).split(self.sizes[:3], dim=-1)
        q, k, v = q.view(B, self.Hq, K), k.view(B, self.Hk, K), v.view(B, H, V)
        y, cache["h"] = m2rnn_step(q, k, v, self._transition(x), self.forget_gate(f_raw), cache["h"],
                                   nonlinear=not self.linear)  # (B,H,V), (B,H,K,V)
        return self._output(y, v, g)


def gated_delta_rule_reference(q, k, v, g, beta, h0=None):
    """The Gated DeltaNet recurrence, a literal loop over time in float32 (float64 for float64 inputs).
    q, k (B,S,Hg,Kg) as they enter the rule (L2-normalised, q scaled), v (B,S,Hg,Vg), g (B,S,Hg) log decay,
    beta (B,S,Hg), h0 (B,Hg,Kg,Vg) or None (zeros). Returns o (B,S,Hg,Vg) in v's dtype and the last state."""
    out_dtype, dt = v.dtype, torch.promote_types(v.dtype, torch.float32)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    B, S, Hg, Kg = k.shape
    s = h0.to(dt) if h0 is not None else k.new_zeros(B, Hg, Kg, v.shape[-1])  # (B,Hg,Kg,Vg)
    outs = []
    for t in range(S):
        # Yang et al.'s gated delta rule S_t = S_{t-1} α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ (their S is our Sᵀ)
        s = torch.exp(g[:, t, :, None, None]) * s
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", s, k[:, t])  # v_t − S_tᵀ k_t  (B,Hg,Vg)
        s = s + beta[:, t, :, None, None] * k[:, t, :, :, None] * err[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", s, q[:, t]))  # o_t = S_tᵀ q_t
    o = torch.stack(outs, dim=1) if S > 0 else v.new_zeros(B, 0, Hg, v.shape[-1])
    return o.to(out_dtype), s


FLA_MISSING = ("Gated DeltaNet layers ('G' in layer_pattern) on CUDA run the kernels of flash-linear-attention, an "
               "optional dependency that is not installed: pip install flash-linear-attention. On Hopper GPUs "
               "(H100/H200) with Triton < 3.7.1 its backward also needs tilelang (pip install tilelang). Or set "
               "gdn_impl='torch' for the plain PyTorch loop (slow).")


def gated_delta_rule(q, k, v, g, beta, impl="auto"):
    """The recurrence over a sequence from a zero state, arguments and return as gated_delta_rule_reference.
    impl 'auto': fla's chunked kernel on CUDA tensors, the reference loop elsewhere; 'fla' or 'torch' to choose."""
    if impl == "torch" or (impl == "auto" and not v.is_cuda):
        return gated_delta_rule_reference(q, k, v, g, beta)
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # imported on first use: optional
    except ImportError as e:
        raise ImportError(FLA_MISSING) from e
    return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=1.0, output_final_state=True)


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet mixer, laid out as flash-linear-attention's GatedDeltaNet layer: projections, conv,
    gates, the delta rule, a gated RMSNorm per head (weight shared by the heads), output projection."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.Hg, self.Kg, self.Vg = Hg, Kg, Vg = c.gdn_heads, c.gdn_k_dim, c.gdn_v_dim
        self.ks, self.impl = c.gdn_conv_size, c.gdn_impl
        self.Ch = 2 * Hg * Kg + Hg * Vg  # channels of the conv: q, k, v
        self.sizes = [self.Ch, Hg, Hg, Hg * Vg]  # [q k v | beta_raw | a_raw | gate]
        self.in_proj = nn.Linear(c.n_embd, sum(self.sizes), bias=False)
        self.conv = CausalConv(self.Ch, self.ks)
        self.A_log = nn.Parameter(torch.empty(Hg))  # decay rate: g = −exp(A_log)·dt
        self.dt_bias = nn.Parameter(torch.empty(Hg))  # dt = softplus(a_raw + dt_bias)
        self.norm = RMSNorm(Vg)
        self.out_proj = nn.Linear(Hg * Vg, c.n_embd, bias=False)

    def _rule_inputs(self, qkv, beta_raw, a_raw):
        """qkv (..., Ch) after the conv, beta_raw and a_raw (..., Hg) -> q, k (..., Hg, Kg) in v's dtype,
        v (..., Hg, Vg), g (..., Hg) fp32, beta (..., Hg)."""
        Hg, Kg, Vg = self.Hg, self.Kg, self.Vg
        q, k, v = (t.unflatten(-1, (Hg, -1)) for t in qkv.split([Hg * Kg, Hg * Kg, Hg * Vg], dim=-1))
        q = (F.normalize(q.float(), dim=-1) * Kg ** -0.5).to(v.dtype)  # norms in fp32; fla wants one dtype
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        g = -torch.exp(self.A_log) * F.softplus(a_raw.float() + self.dt_bias)  # log decay ≤ 0, fp32
        return q, k, v, g, torch.sigmoid(beta_raw)

    def _output(self, o, gate):
        """o (..., Hg, Vg), gate (..., Hg·Vg) -> (..., d)."""
        return self.out_proj((self.norm(o) * F.silu(gate.unflatten(-1, (self.Hg, self.Vg)))).flatten(-2))

    def forward(self, x, cache=None):
        """x (B,S,d) -> (B,S,d). With a fresh cache, also store the conv inputs' tail and the last state."""
        qkv, beta_raw, a_raw, gate = self.in_proj(x).split(self.sizes, dim=-1)  # (B,S,Ch) (B,S,Hg) .. (B,S,Hg·Vg)
        q, k, v, g, beta = self._rule_inputs(self.conv(qkv, cache), beta_raw, a_raw)  # (B,S,Hg,Kg) ...
        o, s_last = gated_delta_rule(q, k, v, g, beta, impl=self.impl)  # (B,S,Hg,Vg), (B,Hg,Kg,Vg)
        if cache is not None:
            cache["S"] = s_last.float()
        return self._output(o, gate)

    def init_cache(self, batch_size, device, dtype):
        return {"conv": self.conv.init_cache(batch_size, device, dtype),  # (B,ks-1,Ch)
                "S": torch.zeros(batch_size, self.Hg, self.Kg, self.Vg, device=device, dtype=torch.float32)}

    def step(self, x, cache, pos):
        """One token x (B,d): O(1) work, the reference rule for one step (pos is unused)."""
        qkv, beta_raw, a_raw, gate = self.in_proj(x).split(self.sizes, dim=-1)  # (B,Ch) (B,Hg) (B,Hg) (B,Hg·Vg)
        q, k, v, g, beta = self._rule_inputs(self.conv.step(qkv, cache), beta_raw, a_raw)  # (B,Hg,Kg) ...
        o, cache["S"] = gated_delta_rule_reference(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                                   cache["S"])  # (B,1,Hg,Vg), (B,Hg,Kg,Vg)
        return self._output(o[:, 0], gate)


MIXERS = {"A": CausalSelfAttention, "M": M2RNNBlock, "G": GatedDeltaNet}  # layer_pattern char -> mixer


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.kind = config.layer_pattern[layer_idx]
        self.norm_1 = RMSNorm(config.n_embd)
        self.mixer = MIXERS[self.kind](config)
        self.norm_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        x = x + self.drop(self.mixer(self.norm_1(x), cache))  # (B,S,d)
        return x + self.drop(self.mlp(self.norm_2(x)))

    def step(self, x, cache, pos):
        x = x + self.mixer.step(self.norm_1(x), cache, pos)  # (B,d)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # no position table: RoPE or the recurrence
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self._init_weights()
        print(f"GPT {config.layer_pattern} (pos_encoding={config.pos_encoding}): "
              f"{self.get_num_params() / 1e6:.2f}M parameters")

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out wte (a lookup, no FLOPs). lm_head is untied and counted."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if non_embedding else n

    @torch.no_grad()
    def _init_weights(self):
        """Every parameter's initial value:
            transformer.wte.weight, lm_head.weight       N(0, 0.02)
            Linear weights (c_attn, c_fc, in_proj)       N(0, 0.02)
            residual out-projections (attention and      N(0, 0.02 / sqrt(2·n_layer))   GPT-2: keeps the residual
              MLP c_proj, M²RNN and GDN out_proj)                                         stream's variance O(1)
            RMSNorm weights (norm_1, norm_2, ln_f,       1
              M²RNN norm)
            M²RNN conv.weight (Ch,1,ks)                  U(−1/sqrt(ks), 1/sqrt(ks))  (PyTorch's default for it)
            M²RNN W (H,V,V)                              I per head
            M²RNN A_log (H,)                             log A, A ~ U(0, 16) clamped at ≥ 1e-4 (no log 0)
            M²RNN dt_bias (H,)                           softplus⁻¹(dt) = dt + log(−expm1(−dt)),
                                                         dt ~ logUniform(1e-3, 1e-1) clamped at ≥ 1e-4
            M²RNN D (H,)                                 1
            Gated DeltaNet conv, A_log, dt_bias (Hg,)    as M²RNN's; its in_proj, out_proj, norm as above
        At init, with f_raw ≈ 0, each head forgets at f = exp(−A·dt), anywhere in (e^-1.6, 1) (GDN's exp(g) alike)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (M2RNNBlock, GatedDeltaNet)):
                bound = 1 / math.sqrt(module.ks)
                nn.init.uniform_(module.conv.weight, -bound, bound)
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0, 16).clamp_(min=1e-4).log())
                dt = torch.exp(torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
                dt = dt.clamp_(min=1e-4)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                if isinstance(module, M2RNNBlock):
                    if not module.linear:
                        module.W.copy_(torch.eye(module.V).expand_as(module.W))
                    nn.init.ones_(module.D)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "out_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx, targets=None):
        """idx (B,S) token ids -> logits (B,S,vocab) for every position, and the mean cross-entropy against
        targets (B,S) (entries -1 are ignored) or None. S may exceed block_size (length generalisation)."""
        x = self.transformer.wte(idx)  # (B,S,d)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B,S,vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type):
        """AdamW. No weight decay on parameters of dim < 2: norm weights, and the M²RNN's A_log, dt_bias, D (spec §2;
        the Gated DeltaNet's A_log and dt_bias too), all vectors; matrices (Linear, conv, embeddings, M²RNN W) decay."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        print(f"decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print(f"non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), the PaLM convention: no recomputation counted.
          6·N                 N = matmul weights (every weight matrix but wte and the M²RNN W; the depthwise
                              conv counts too: 2 FLOPs per weight per token, like a matmul)
          + 12·L_A·d·T        attention scores and values, attention layers only, T = block_size
          + 3·L_M·H·(2·K·V² + 6·K·V)   M²RNN recurrence, forward ×3 for forward + backward; per head and token:
                              2·K·V² for H_{t-1} W, 2·K·V for k_t v_tᵀ and its add, 2·K·V for the gated blend,
                              2·K·V for the read-out H_tᵀ q_t (tanh is not counted). The kernel's backward also
                              recomputes the forward (a 4th pass): that is rematerialisation, not counted.
          + 3·L_G·Hg·7·Kg·Vg  Gated DeltaNet recurrence as the reference loop does it: Kg·Vg for the decay, 2·Kg·Vg
                              each for S_tᵀ k_t, the rank-1 update and the read-out (fla's chunked form does more)"""
        c = self.config
        n_matmul = sum(p.numel() for name, p in self.named_parameters()
                       if p.dim() >= 2 and name != "transformer.wte.weight" and not name.endswith(".W"))
        n_attn, n_m2rnn, n_gdn = (c.layer_pattern.count(kind) for kind in "AMG")
        H, K, V = c.m2rnn_heads, c.m2rnn_k_dim, c.m2rnn_v_dim
        recurrence = (2 * K * V * V + 6 * K * V) * H if not c.m2rnn_linear else 6 * K * V * H
        gdn = 7 * c.gdn_heads * c.gdn_k_dim * c.gdn_v_dim
        return 6 * n_matmul + 12 * n_attn * c.n_embd * c.block_size + 3 * n_m2rnn * recurrence + 3 * n_gdn * gdn

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilisation: achieved / peak. fwdbwd_per_iter sequences of block_size tokens per
        iteration taking dt seconds. peak_flops defaults to the bf16 dense peak of the GPU holding the model;
        None when unknown (a CPU, an unlisted GPU)."""
        peak_flops = peak_flops or gpu_peak_flops(self.lm_head.weight.device)
        if peak_flops is None:
            return None
        return self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt / peak_flops

    # ---------------------------------------------------------------------------------------------
    # generation: a per-layer cache, O(1) recurrent work per token for M²RNN and Gated DeltaNet layers

    def init_state(self, batch_size, device, dtype=None):
        """A fresh cache per layer: attention {"k","v": (B,nh,block_size,hs), "length"}, M²RNN
        {"conv": (B,ks-1,Ch), "h": (B,H,K,V) fp32}, Gated DeltaNet {"conv": (B,ks-1,Ch), "S": (B,Hg,Kg,Vg) fp32}.
        dtype (default: the parameters') of k, v and conv."""
        dtype = dtype or self.lm_head.weight.dtype
        return [block.mixer.init_cache(batch_size, device, dtype) for block in self.transformer.h]

    def prefill(self, idx, state):
        """Run the prompt idx (B,S) through the full forward, filling a fresh state from init_state.
        Returns the logits (B,vocab) of the last position; the next token goes to forward_step at pos=S."""
        x = self.transformer.wte(idx)
        for block, cache in zip(self.transformer.h, state):
            x = block(x, cache)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))

    def forward_step(self, idx_t, state, pos):
        """Advance the state (updated in place) by one token idx_t (B,) at position pos -> logits (B,vocab)."""
        x = self.transformer.wte(idx_t)  # (B,d)
        for block, cache in zip(self.transformer.h, state):
            x = block.step(x, cache, pos)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Yield max_new_tokens new tokens, each (B,), continuing idx (B,S). temperature 0 is greedy.
        Models with attention see at most block_size tokens (the KV cache): a longer prompt is cropped to
        its last block_size tokens, and when the cache fills up generation restarts from the last
        block_size // 2 tokens (a fresh prefill: recurrent states restart too). Models without attention
        have no such limit: their state is O(1) and carries the whole history."""
        if idx.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token (e.g. the end-of-text token)")
        window = self.config.block_size if "A" in self.config.layer_pattern else idx.shape[1] + max_new_tokens
        tokens = idx[:, -window:]  # (B,S) what the attention layers can see
        state = self.init_state(idx.shape[0], idx.device)
        logits, pos = self.prefill(tokens, state), tokens.shape[1]
        for i in range(max_new_tokens):
            idx_next = sample_next(logits, temperature, top_k)  # (B,)
            yield idx_next
            if i == max_new_tokens - 1:
                break
            tokens = torch.cat([tokens, idx_next[:, None]], dim=1)[:, -window:]
            if pos == window:  # the KV cache is full: restart from the last half window
                tokens = tokens[:, -(window // 2):]
                state = self.init_state(idx.shape[0], idx.device)
                logits, pos = self.prefill(tokens, state), tokens.shape[1]
            else:
                logits, pos = self.forward_step(idx_next, state, pos), pos + 1

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """Load a train.py checkpoint {"model": state_dict, "model_args": GPTConfig fields, "config", ...}.
        Returns (model in eval mode on device, the checkpoint's other entries without model / optimizer)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py ...) "
                                    f"or point out_dir at a run directory holding ckpt.pt")
        try:  # weights_only: tensors, numbers, strings and containers only, no code (train.py saves nothing else)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
            found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path} is not a train.py checkpoint: expected a dict with 'model' and "
                             f"'model_args', found {found}")
        try:
            config = GPTConfig(**ckpt["model_args"])
        except TypeError as e:
            raise ValueError(f"{path}: model_args do not match this model.py's GPTConfig ({e})") from e
        model = cls(config)
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        try:
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape
            raise ValueError(f"{path}: weights do not fit the model built from its model_args ({e})") from e
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the model built from its model_args: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
        return model.to(device).eval(), info


def sample_next(logits, temperature=1.0, top_k=None):
    """logits (B,vocab) -> next token ids (B,): argmax if temperature is 0, else sampled from the softmax
    of logits / temperature restricted to the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B,top_k) sorted
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense tensor-core peak, by name substring


def gpu_peak_flops(device):
    """bf16 dense peak of a CUDA device from PEAK_FLOPS, or None (then MFU is not reported): also for a model
    run on the CPU of a machine that has a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
