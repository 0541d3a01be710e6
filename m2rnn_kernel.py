"""
The M²RNN recurrence: a chunked Triton kernel with a hand-written backward, and the
plain PyTorch reference it is tested against.

M²RNN (Mishra et al., arXiv 2603.14360) keeps, per head, a matrix state H_t (K×V):

    Z_t = tanh(H_{t-1} W + k_t v_tᵀ)          (1)  K×V: matrix product, then outer product
    H_t = f_t · H_{t-1} + (1 − f_t) · Z_t      (2)  gated, non-linear state update
    y_t = H_tᵀ q_t                              (3)  V-vector read-out

Glossary of dimension letters, used in every shape comment of this file:
    B batch, S sequence length, H heads, K key dim (rows of the state), V value dim
    (columns of the state), C chunk length (steps between two stored states),
    BK rows of the state one Triton program owns, NB = ceil(K / BK) row blocks.

One layout everywhere: q (B,S,Hq,K), k (B,S,Hk,K), v (B,S,Hv,V), W (Hw,V,V), f (B,S,Hf),
state (B,H,K,V) in float32. H = max(Hq, Hk, Hv, Hf, Hw); a tensor with fewer heads is
shared by consecutive groups of heads (head h reads head h // (H // Hx)), as grouped-query
attention shares keys and values.

The kernel, in reading order:
  * forward: one program per (batch, head, row block). Rows of H are independent
    (H W mixes columns only, k_t[i] scales row i), so a program owns BK rows and keeps them
    in registers for the whole sequence. Every C steps it writes the state to a checkpoint
    buffer (B,H,NC,K,V) with NC = ceil(S/C): that is all the backward needs.
  * backward: chunks in reverse order. For each chunk the program reloads the checkpoint,
    recomputes the chunk's states forward (storing H_{t-1} and Z_t in a small per-program
    scratch of C steps), then walks the chunk backward with the equations of the spec §3.
    Memory is O(S/C + C) states instead of O(S): no buffer of all S states ever exists.
  * the `torch.library` custom ops and their autograd, so torch.compile traces through.
  * `m2rnn(...)`, the public function, and `m2rnn_reference(...)`, a literal loop.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

DEFAULT_CHUNK = 64  # steps between two stored states (C)


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        # the special-function unit's approximation: max relative error ~2^-11, enough for bf16
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        # tanh(x) = 2·sigmoid(2x) − 1: portable (runs in Triton's CPU interpreter), fp32-accurate
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _store_or_add(ptr, value, mask, ATOMIC: tl.constexpr):
    # several programs write the same element when heads are shared or rows are split
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _m2rnn_fwd_kernel(
    Q, Kt, Vt, W, F, H0, Y, HT, CKPT,
    stride_qb, stride_qs, stride_qh, stride_qk,
    stride_kb, stride_ks, stride_kh, stride_kk,
    stride_vb, stride_vs, stride_vh, stride_vv,
    stride_fb, stride_fs, stride_fh,
    S, NC,
    H: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr, GF: tl.constexpr,
    GW: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
    HAS_H0: tl.constexpr, Y_ATOMIC: tl.constexpr, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
):
    """One program: rows [i_k·BK, (i_k+1)·BK) of the state of head i_h in batch i_b.
    G* = H // H* is the number of heads sharing one head of that tensor."""
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)  # the rows this program owns
    o_v = tl.arange(0, V)
    m_k = o_k < K
    m_kv = m_k[:, None]

    p_q = Q + i_b * stride_qb + (i_h // GQ) * stride_qh + o_k * stride_qk
    p_k = Kt + i_b * stride_kb + (i_h // GK) * stride_kh + o_k * stride_kk
    p_v = Vt + i_b * stride_vb + (i_h // GV) * stride_vh + o_v * stride_vv
    p_f = F + i_b * stride_fb + (i_h // GF) * stride_fh
    p_y = Y + (i_b * S * H + i_h) * V + o_v  # Y is (B,S,H,V) contiguous float32
    o_state = (i_bh * K + o_k[:, None]) * V + o_v[None, :]  # offsets in a (B,H,K,V) state

    b_w = tl.load(W + (i_h // GW) * V * V + o_v[:, None] * V + o_v[None, :])  # (V,V) fp32
    if HAS_H0:
        b_h = tl.load(H0 + o_state, mask=m_kv, other=0.0)  # (BK,V) fp32
    else:
        b_h = tl.zeros([BK, V], dtype=tl.float32)

    for i_c in range(NC):
        # checkpoint: the state before step i_c·C, from which the backward recomputes the chunk
        tl.store(CKPT + (i_bh * NC + i_c) * K * V + o_state - i_bh * K * V, b_h, mask=m_kv)
        for t in range(i_c * C, tl.minimum(i_c * C + C, S)):
            b_k = tl.load(p_k + t * stride_ks, mask=m_k, other=0.0).to(tl.float32)  # (BK,)
            b_v = tl.load(p_v + t * stride_vs).to(tl.float32)  # (V,)
            b_f = tl.load(p_f + t * stride_fs).to(tl.float32)  # scalar
            b_q = tl.load(p_q + t * stride_qs, mask=m_k, other=0.0).to(tl.float32)  # (BK,)
            # (1) Z_t = tanh(H_{t-1} W + k_t v_tᵀ)
            b_z = _tanh(tl.dot(b_h, b_w, input_precision=PRECISION) + b_k[:, None] * b_v[None, :], FAST_TANH)
            # (2) H_t = f_t H_{t-1} + (1 − f_t) Z_t
            b_h = b_f * b_h + (1.0 - b_f) * b_z
            # (3) y_t = H_tᵀ q_t, this program's rows only: summed over row blocks when NB > 1
            b_y = tl.sum(b_q[:, None] * b_h, axis=0)  # (V,)
            _store_or_add(p_y + t * H * V, b_y, o_v < V, Y_ATOMIC)
    tl.store(HT + o_state, b_h, mask=m_kv)


@triton.jit
def _m2rnn_bwd_kernel(
    Q, Kt, Vt, W, F, CKPT, DY, DHT,
    DQ, DK, DV, DF, DW, DH0, SCRATCH,
    stride_qb, stride_qs, stride_qh, stride_qk,
    stride_kb, stride_ks, stride_kh, stride_kk,
    stride_vb, stride_vs, stride_vh, stride_vv,
    stride_fb, stride_fs, stride_fh,
    S, NC, clip,
    H: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, HF: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr, C: tl.constexpr,
    HAS_DHT: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
    GW: tl.constexpr,
):
    """Reverse walk of spec §3 over the rows [i_k·BK, (i_k+1)·BK) of one (batch, head).
    Gradients of q, k (per row) are added over sharing heads; gradients of v, f sum over rows
    too, so they are added over row blocks as well. dW is written per (batch, head, row block)
    and summed on the host (deterministic, and small: B·H·NB·V·V numbers)."""
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, V)
    m_k = o_k < K
    m_kv = m_k[:, None]

    p_q = Q + i_b * stride_qb + (i_h // (H // HQ)) * stride_qh + o_k * stride_qk
    p_k = Kt + i_b * stride_kb + (i_h // (H // HK)) * stride_kh + o_k * stride_kk
    p_v = Vt + i_b * stride_vb + (i_h // (H // HV)) * stride_vh + o_v * stride_vv
    p_f = F + i_b * stride_fb + (i_h // (H // HF)) * stride_fh
    # gradient buffers are contiguous float32 with the layout of their input
    p_dq = DQ + (i_b * S * HQ + i_h // (H // HQ)) * K + o_k
    p_dk = DK + (i_b * S * HK + i_h // (H // HK)) * K + o_k
    p_dv = DV + (i_b * S * HV + i_h // (H // HV)) * V + o_v
    p_df = DF + i_b * S * HF + i_h // (H // HF)
    p_dy = DY + (i_b * S * H + i_h) * V + o_v
    o_state = (i_bh * K + o_k[:, None]) * V + o_v[None, :]
    o_tile = o_k[:, None] * V + o_v[None, :]  # offsets in one (K,V) state
    # this program's scratch: C recomputed steps of (H_{t-1}, Z_t), each (BK,V) of a (K,V) tile
    p_scr = SCRATCH + (i_bh * NB + i_k) * C * 2 * K * V + o_tile

    b_w = tl.load(W + (i_h // GW) * V * V + o_v[:, None] * V + o_v[None, :])  # (V,V)
    if HAS_DHT:
        b_g = tl.load(DHT + o_state, mask=m_kv, other=0.0)  # dL/dH_S from the returned state
    else:
        b_g = tl.zeros([BK, V], dtype=tl.float32)
    b_dw = tl.zeros([V, V], dtype=tl.float32)
    # several programs add into the same dq/dk element iff q/k heads are shared;
    # into the same dv/df element iff heads are shared or rows are split
    Q_ATOMIC: tl.constexpr = HQ < H
    K_ATOMIC: tl.constexpr = HK < H
    V_ATOMIC: tl.constexpr = (HV < H) or (NB > 1)
    F_ATOMIC: tl.constexpr = (HF < H) or (NB > 1)

    for i_r in range(NC):
        i_c = NC - 1 - i_r
        t0 = i_c * C
        n_t = tl.minimum(C, S - t0)
        # recompute the chunk's states from its checkpoint, as the forward did
        b_h = tl.load(CKPT + (i_bh * NC + i_c) * K * V + o_tile, mask=m_kv, other=0.0)
        for j in range(n_t):
            t = t0 + j
            b_k = tl.load(p_k + t * stride_ks, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(p_v + t * stride_vs).to(tl.float32)
            b_f = tl.load(p_f + t * stride_fs).to(tl.float32)
            b_z = _tanh(tl.dot(b_h, b_w, input_precision=PRECISION) + b_k[:, None] * b_v[None, :], FAST_TANH)
            tl.store(p_scr + (2 * j) * K * V, b_h, mask=m_kv)  # H_{t-1}
            tl.store(p_scr + (2 * j + 1) * K * V, b_z, mask=m_kv)  # Z_t
            b_h = b_f * b_h + (1.0 - b_f) * b_z
        tl.debug_barrier()  # scratch written by some threads is read by others below
        for j_r in range(n_t):
            j = n_t - 1 - j_r
            t = t0 + j
            b_hp = tl.load(p_scr + (2 * j) * K * V, mask=m_kv, other=0.0)  # H_{t-1}
            b_z = tl.load(p_scr + (2 * j + 1) * K * V, mask=m_kv, other=0.0)  # Z_t
            b_k = tl.load(p_k + t * stride_ks, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(p_v + t * stride_vs).to(tl.float32)
            b_f = tl.load(p_f + t * stride_fs).to(tl.float32)
            b_q = tl.load(p_q + t * stride_qs, mask=m_k, other=0.0).to(tl.float32)
            b_dy = tl.load(p_dy + t * H * V).to(tl.float32)  # (V,)
            b_ht = b_f * b_hp + (1.0 - b_f) * b_z  # H_t
            # G_t = G + q_t dy_tᵀ: everything that reaches H_t, then clipped (spec §3)
            b_g = b_g + b_q[:, None] * b_dy[None, :]
            if CLIP:
                b_g = tl.minimum(tl.maximum(b_g, -clip), clip)
            b_dq = tl.sum(b_ht * b_dy[None, :], axis=1)  # dq_t = H_t dy_t        (BK,)
            b_df = tl.sum(tl.sum(b_g * (b_hp - b_z), axis=1), axis=0)  # df_t = Σ G_t ⊙ (H_{t-1} − Z_t)
            b_da = (1.0 - b_f) * b_g * (1.0 - b_z * b_z)  # dA_t: gradient at the tanh input
            b_dw += tl.dot(tl.trans(b_hp), b_da, input_precision=PRECISION)  # dW += H_{t-1}ᵀ dA_t
            b_dk = tl.sum(b_da * b_v[None, :], axis=1)  # dk_t = dA_t v_t       (BK,)
            b_dv = tl.sum(b_da * b_k[:, None], axis=0)  # dv_t = dA_tᵀ k_t      (V,)
            # G = f_t G_t + dA_t Wᵀ flows on to H_{t-1}
            b_g = b_f * b_g + tl.dot(b_da, tl.trans(b_w), input_precision=PRECISION)
            _store_or_add(p_dq + t * HQ * K, b_dq, m_k, Q_ATOMIC)
            _store_or_add(p_dk + t * HK * K, b_dk, m_k, K_ATOMIC)
            _store_or_add(p_dv + t * HV * V, b_dv, o_v < V, V_ATOMIC)
            _store_or_add(p_df + t * HF, b_df, None, F_ATOMIC)
        tl.debug_barrier()  # the next chunk overwrites the scratch these threads just read
    tl.store(DH0 + o_state, b_g, mask=m_kv)
    tl.store(DW + ((i_bh * NB + i_k) * V + o_v[:, None]) * V + o_v[None, :], b_dw)


# -----------------------------------------------------------------------------
# host side: launchers


def _heads(q, k, v, W, f):
    counts = dict(q=q.shape[2], k=k.shape[2], v=v.shape[2], f=f.shape[2], W=W.shape[0])
    return max(counts.values()), counts


def _launch_config(K, dtype):
    BK = min(triton.next_power_of_2(K), 64)
    fast = dtype != torch.float32 and not _interpreting()
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return BK, fast, precision


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(*shape, device, dtype):
    """Every buffer the kernels must fill completely; tests replace this to poison them with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _m2rnn_forward_launch(q, k, v, W, f, h0, chunk):
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, n = _heads(q, k, v, W, f)
    C = chunk
    NC = triton.cdiv(S, C)
    BK, fast, precision = _launch_config(K, q.dtype)
    NB = triton.cdiv(K, BK)
    Wc = W.float().contiguous()
    y = (torch.zeros if NB > 1 else _empty)(B, S, H, V, device=q.device, dtype=torch.float32)
    h_last = _empty(B, H, K, V, device=q.device, dtype=torch.float32)
    ckpt = _empty(B, H, NC, K, V, device=q.device, dtype=torch.float32)
    h0c = h0.float().contiguous() if h0 is not None else h_last  # dummy pointer when absent
    _m2rnn_fwd_kernel[(B * H, NB)](
        q, k, v, Wc, f, h0c, y, h_last, ckpt,
        *q.stride(), *k.stride(), *v.stride(), *f.stride(),
        S, NC,
        H=H, GQ=H // n["q"], GK=H // n["k"], GV=H // n["v"], GF=H // n["f"], GW=H // n["W"],
        K=K, V=V, BK=BK, C=C, HAS_H0=h0 is not None, Y_ATOMIC=NB > 1,
        PRECISION=precision, FAST_TANH=fast, num_warps=4,
    )
    return y.to(q.dtype), h_last, ckpt


def _m2rnn_backward_launch(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk):
    B, S, Hq, K = q.shape
    V = v.shape[-1]
    H, n = _heads(q, k, v, W, f)
    C = chunk
    NC = ckpt.shape[2]
    BK, fast, precision = _launch_config(K, q.dtype)
    NB = triton.cdiv(K, BK)
    dev, f32 = q.device, torch.float32
    dq = torch.zeros(B, S, n["q"], K, device=dev, dtype=f32)
    dk = torch.zeros(B, S, n["k"], K, device=dev, dtype=f32)
    dv = torch.zeros(B, S, n["v"], V, device=dev, dtype=f32)
    df = torch.zeros(B, S, n["f"], device=dev, dtype=f32)
    dw = _empty(B, H, NB, V, V, device=dev, dtype=f32)
    dh0 = _empty(B, H, K, V, device=dev, dtype=f32)
    scratch = _empty(B * H * NB, C, 2, K, V, device=dev, dtype=f32)
    dy = dy.contiguous()
    dht = dh_last.float().contiguous() if dh_last is not None else dh0  # dummy when absent
    _m2rnn_bwd_kernel[(B * H, NB)](
        q, k, v, W.float().contiguous(), f, ckpt, dy, dht,
        dq, dk, dv, df, dw, dh0, scratch,
        *q.stride(), *k.stride(), *v.stride(), *f.stride(),
        S, NC, float(grad_clip or 0.0),
        H=H, HQ=n["q"], HK=n["k"], HV=n["v"], HF=n["f"], K=K, V=V, BK=BK, NB=NB, C=C,
        HAS_DHT=dh_last is not None, CLIP=grad_clip is not None,
        PRECISION=precision, FAST_TANH=fast, GW=H // n["W"], num_warps=4,
    )
    # dW: sum over batch and row blocks, then over the heads that share one W
    dW = dw.sum(dim=(0, 2)).view(n["W"], H // n["W"], V, V).sum(1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dW.to(W.dtype), df.to(f.dtype), dh0


# -----------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake (shape) implementations and autograd.
# grad_clip changes only the backward; it rides along the forward op so autograd can see it.


@torch.library.custom_op("m2rnn::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, f: torch.Tensor,
                h0: Optional[torch.Tensor], grad_clip: Optional[float], chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _m2rnn_forward_launch(q, k, v, W, f, h0, chunk)


@_forward_op.register_fake
def _(q, k, v, W, f, h0, grad_clip, chunk):
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, _ = _heads(q, k, v, W, f)
    NC = (S + chunk - 1) // chunk
    return (q.new_empty(B, S, H, V), q.new_empty(B, H, K, V, dtype=torch.float32),
            q.new_empty(B, H, NC, K, V, dtype=torch.float32))


@torch.library.custom_op("m2rnn::backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, f: torch.Tensor,
                 ckpt: torch.Tensor, dy: torch.Tensor, dh_last: Optional[torch.Tensor],
                 grad_clip: Optional[float], chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _m2rnn_backward_launch(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk)


@_backward_op.register_fake
def _(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk):
    B, H, _, K, V = ckpt.shape
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(W),
            torch.empty_like(f), ckpt.new_empty(B, H, K, V))


def _setup_context(ctx, inputs, output):
    q, k, v, W, f, h0, grad_clip, chunk = inputs
    ctx.save_for_backward(q, k, v, W, f, output[2])  # checkpoints only: the backward recomputes states
    ctx.has_h0, ctx.grad_clip, ctx.chunk = h0 is not None, grad_clip, chunk


def _backward(ctx, dy, dh_last, _dckpt):
    q, k, v, W, f, ckpt = ctx.saved_tensors
    dq, dk, dv, dW, df, dh0 = _backward_op(q, k, v, W, f, ckpt, dy, dh_last, ctx.grad_clip, ctx.chunk)
    return dq, dk, dv, dW, df, (dh0 if ctx.has_h0 else None), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# the public function


def m2rnn(q, k, v, W, f, h0=None, grad_clip=None, impl="auto", chunk=DEFAULT_CHUNK):
    """M²RNN recurrence over a whole sequence, equations (1)-(3).

    q (B,S,Hq,K), k (B,S,Hk,K), v (B,S,Hv,V), W (Hw,V,V), f (B,S,Hf) in (0,1),
    h0 (B,H,K,V) or None (zeros). Returns y (B,S,H,V) in q's dtype and the last state
    (B,H,K,V) in float32. grad_clip=c clamps the gradient reaching every state to [-c, c]
    (spec §3). impl: "triton" (the chunked kernel), "torch" (the reference loop) or "auto"
    (Triton on CUDA tensors, the reference elsewhere).
    """
    _check_inputs(q, k, v, W, f, h0)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return m2rnn_reference(q, k, v, W, f, h0, grad_clip)
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                           "importing triton) to run on the CPU; use impl='torch' for the reference")
    y, h_last, _ = _forward_op(q, k, v, W, f, h0, None if grad_clip is None else float(grad_clip), int(chunk))
    return y, h_last


def _check_inputs(q, k, v, W, f, h0):
    def fail(msg):
        raise ValueError(f"m2rnn: {msg}. Expected q (B,S,Hq,K), k (B,S,Hk,K), v (B,S,Hv,V), "
                         f"W (Hw,V,V), f (B,S,Hf), h0 (B,H,K,V) or None; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, W {tuple(W.shape)}, f {tuple(f.shape)}"
                         f"{'' if h0 is None else ', h0 ' + str(tuple(h0.shape))}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or W.dim() != 3 or f.dim() != 3:
        fail("wrong number of dimensions")
    B, S, _, K = q.shape
    V = v.shape[-1]
    if k.shape[:2] != (B, S) or v.shape[:2] != (B, S) or f.shape[:2] != (B, S):
        fail("batch and sequence sizes differ")
    if k.shape[-1] != K or W.shape[1:] != (V, V):
        fail("head dims differ")
    H, counts = _heads(q, k, v, W, f)
    if any(H % c for c in counts.values()):
        fail(f"every head count must divide the largest ({H}): {counts}")
    if h0 is not None and tuple(h0.shape) != (B, H, K, V):
        fail(f"h0 must be (B,H,K,V) = {(B, H, K, V)}")


# -----------------------------------------------------------------------------
# the reference: a literal loop over time, in float32 (or float64 for float64 inputs)


class _ClipGrad(torch.autograd.Function):
    """Identity forward; the backward clamps the gradient reaching the state (spec §3).
    Autograd sums every use of H_t (the read-out y_t, the next step, the returned state)
    before calling this, so the clamp sees G_t = G + q_t dy_tᵀ as in the equations."""

    @staticmethod
    def forward(ctx, h, c):
        ctx.c = c
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-ctx.c, ctx.c), None


def _expand_heads(x, H, dim):
    """Share a tensor with fewer heads over consecutive groups of heads."""
    return x if x.shape[dim] == H else x.repeat_interleave(H // x.shape[dim], dim=dim)


def m2rnn_reference(q, k, v, W, f, h0=None, grad_clip=None, nonlinear=True):
    """Same signature and return as m2rnn. nonlinear=False drops the tanh (with W = 0 this is
    the linear ablation: a gated linear-attention layer)."""
    H, _ = _heads(q, k, v, W, f)
    out_dtype, dt = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = (_expand_heads(x, H, 2).to(dt) for x in (q, k, v))
    f, W = _expand_heads(f, H, 2).to(dt), _expand_heads(W, H, 0).to(dt)
    B, S, _, K = q.shape
    h = h0.to(dt) if h0 is not None else q.new_zeros(B, H, K, v.shape[-1])
    ys = []
    for t in range(S):
        a = h @ W + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B,H,K,V): H_{t-1} W + k_t v_tᵀ
        z = torch.tanh(a) if nonlinear else a  # (1)
        f_t = f[:, t, :, None, None]
        h = f_t * h + (1 - f_t) * z  # (2)
        if grad_clip is not None:
            h = _ClipGrad.apply(h, grad_clip)
        ys.append(torch.einsum("bhkv,bhk->bhv", h, q[:, t]))  # (3) y_t = H_tᵀ q_t
    y = torch.stack(ys, dim=1) if S > 0 else q.new_zeros(B, 0, H, v.shape[-1])
    return y.to(out_dtype), h


def m2rnn_step(q, k, v, W, f, h, nonlinear=True):
    """One decoding step, O(1) in the position: q (B,Hq,K), k (B,Hk,K), v (B,Hv,V), f (B,Hf),
    h (B,H,K,V) float32. Returns y (B,H,V) in q's dtype and the new state."""
    y, h = m2rnn_reference(q[:, None], k[:, None], v[:, None], W, f[:, None], h, nonlinear=nonlinear)
    return y[:, 0], h
