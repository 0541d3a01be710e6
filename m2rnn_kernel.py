"""
The M²RNN recurrence: a chunked Triton kernel with a hand-written backward, and the
plain PyTorch reference it is tested against.

M²RNN (Mishra et al., arXiv 2603.14360) keeps, per head, a matrix state H_t (K×V):

    Z_t = tanh(H_{t-1} W + k_t v_tᵀ)          (1)  K×V: matrix product, then outer product
    H_t = f_t · H_{t-1} + (1 − f_t) · Z_t      (2)  gated, non-linear state update
    y_t = H_tᵀ q_t                              (3)  V-vector read-out

Glossary of dimension letters, used in every shape comment of this file:
    B batch, S sequence length, H heads, K key dim (rows of the state), V value dim
    (columns of the state), C chunk length (steps between two checkpoints),
    BK rows of the state one Triton program owns, NB = ceil(K / BK) row blocks.

One layout everywhere: q (B,S,Hq,K), k (B,S,Hk,K), v (B,S,Hv,V), W (Hw,V,V), f (B,S,Hf),
state (B,H,K,V) in float32. H = max(Hq, Hk, Hv, Hf, Hw); a tensor with fewer heads is
shared by consecutive groups of heads (head h reads head h // (H // Hx)), as grouped-query
attention shares keys and values.

The kernel, in reading order:
  * forward: one program per (batch, head, row block), one warp (V/32 for states wider than 32 columns:
    _warps says why). Rows of H are independent
    (H W mixes columns only, k_t[i] scales row i), so a program owns BK rows and keeps them
    in registers for the whole sequence. Every C steps it writes the state to a checkpoint
    buffer (B,H,NC,K,V) with NC = ceil(S/C): that is all the backward needs. Where the whole grid
    runs at once (8 programs per SM, or 12 with bf16 inputs under a register cap), it loads its inputs
    8 steps at a time (one layout change per tile, not per step), and where even programs of 16 rows
    all fit, it runs those (more warps to hide each one's chain).
  * backward: chunks in reverse order. For each chunk the program reloads the checkpoint,
    recomputes the chunk's states forward (storing H_{t-1} in a small per-program scratch of
    C steps), then walks the chunk backward with the equations of the spec §3, recomputing
    Z_t from H_{t-1} on the way. Memory is O(S/C + C) states instead of O(S): no buffer of
    all S states exists (unless asked for, below). Checkpoints and scratch are float16 for bf16 inputs; the scratch
    holds each state in the order the tensor cores' registers hold it (_to_private), so it
    goes out and comes back without moving between threads. Where the grid is small, chunk c
    is walked while chunk c−1 is recomputed, a step of each in one loop.
    With store_states=True the forward stores every state in that order instead, and the
    backward is the reverse walk alone: faster, at ~B·S·H·K·V stored numbers.
  * the `torch.library` custom ops and their autograd, so torch.compile traces through.
  * `m2rnn(...)`, the public function, and `m2rnn_reference(...)`, a literal loop.
  * last, the depthwise causal conv + SiLU that feeds q, k, v to the recurrence: `causal_conv_silu(...)`, two
    memory-bound Triton kernels with their ops, and `causal_conv_silu_reference(...)`.
"""
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton for this platform (macOS): m2rnn() runs the PyTorch reference only
    from types import SimpleNamespace
    triton = SimpleNamespace(jit=lambda fn: fn)  # the kernels below are defined but never launched
    tl = SimpleNamespace(constexpr=None)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

DEFAULT_CHUNK = 64  # steps between two stored states (C)


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST == 1:
        # the special-function unit's approximation: max relative error ~2^-11, enough for bf16
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        # fp32-accurate and portable (Triton's CPU interpreter has no libdevice): the Taylor series
        # to x^15 where |x| < 0.55 (relative error < 1e-7 there), else (1 − e^{−2|x|}) / (1 + e^{−2|x|}),
        # whose subtraction loses nothing once e^{−2|x|} < 1/3. The shortcut 2·sigmoid(2x) − 1 has
        # an absolute error of ~1e-7, which near 0 is a large relative one: seen to grow to 2.5e-4
        # on y over 4096 steps.
        x2 = x * x
        p = -929569.0 / 638512875.0
        p = p * x2 + 21844.0 / 6081075.0
        p = p * x2 - 1382.0 / 155925.0
        p = p * x2 + 62.0 / 2835.0
        p = p * x2 - 17.0 / 315.0
        p = p * x2 + 2.0 / 15.0
        p = p * x2 - 1.0 / 3.0
        series = x + x * x2 * p
        e = tl.exp(-2.0 * tl.abs(x))
        far = (1.0 - e) / (1.0 + e)
        return tl.where(tl.abs(x) < 0.55, series, tl.where(x < 0, -far, far))


@triton.jit
def _bf16_parts(x, EMULATED: tl.constexpr):
    """x = hi + lo to ~2^-16, hi and lo in bf16 (float32 copies of them when EMULATED). hi is x rounded to bf16,
    x − hi is exact in float32, and lo is that rounded to bf16. Rounding, not truncating: truncated parts err
    with the sign of x, and that bias adds up over the recurrence (3x the error, measured). On the GPU one block
    of PTX per pair of elements: `cvt.rn.bf16x2.f32` rounds two values into one register, already packed as the
    tensor cores take them, the two high halves back in float32 are a shift and a mask, and lo is packed the
    same way: 3 instructions an element, where rounding hi with integer operations took 4 and Triton's own
    conversion runs one element per instruction on the pipe the tanh needs (notes_kernel.md, v8, v17). The
    interpreter has no PTX: there hi is rounded with integer operations (half of bf16's last place added, the
    upper 16 bits kept; ties away from zero, where cvt.rn rounds them to even: one value in 65,536)."""
    if EMULATED:
        hi_bits = (x.to(tl.uint32, bitcast=True) + 0x8000) & 0xFFFF0000
        lo = x - hi_bits.to(tl.float32, bitcast=True)
        hi = (hi_bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return hi.to(tl.float32), lo.to(tl.bfloat16).to(tl.float32)
    # $2, $3: a pair of x; $0: their high parts, packed (PTX puts the first source in the upper half); $1: the low
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a, b; cvt.rn.bf16x2.f32 $0, $3, $2; shl.b32 a, $0, 16; and.b32 b, $0, 0xffff0000; "
        "sub.f32 a, $2, a; sub.f32 b, $3, b; cvt.rn.bf16x2.f32 $1, b, a; }",
        "=r,=r,r,r", [x], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


@triton.jit
def _matmul(a, b, PRECISION: tl.constexpr):
    """a @ b for float32 blocks. "ieee" is tl.dot's exact mode. "bf16x3" splits each operand into
    bf16 high and low parts and keeps three of the four products (error ~2^-16): the tensor cores
    then take bf16 operands. "bf16" keeps the high parts only (error ~2^-9), for sums whose terms'
    errors average out (dW). "...-emulated" is the same arithmetic with float32 operands, for
    Triton's CPU interpreter, whose bf16 tl.dot is wrong (seen with Triton 3.9)."""
    if PRECISION == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        EMULATED: tl.constexpr = PRECISION == "bf16x3-emulated" or PRECISION == "bf16-emulated"
        a_hi, a_lo = _bf16_parts(a, EMULATED)
        b_hi, b_lo = _bf16_parts(b, EMULATED)
        if PRECISION == "bf16x3" or PRECISION == "bf16x3-emulated":
            acc = tl.dot(a_lo, b_hi, out_dtype=tl.float32, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, out_dtype=tl.float32, input_precision="ieee")
            return tl.dot(a_hi, b_hi, acc, out_dtype=tl.float32, input_precision="ieee")
        else:
            return tl.dot(a_hi, b_hi, out_dtype=tl.float32, input_precision="ieee")


@triton.jit
def _matmul_f16_state(a, b, EMULATED: tl.constexpr):
    """a @ b where a holds float16 values (a stored state) and b is float32: b splits into float16
    high and low parts, so the two products are exact to ~2^-22 of b; no split of a is needed."""
    b_hi = b.to(tl.float16)
    b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
    a = a.to(tl.float16)
    if EMULATED:
        a, b_hi, b_lo = a.to(tl.float32), b_hi.to(tl.float32), b_lo.to(tl.float32)
    acc = tl.dot(a, b_lo, out_dtype=tl.float32, input_precision="ieee")
    return tl.dot(a, b_hi, acc, out_dtype=tl.float32, input_precision="ieee")


@triton.jit
def _candidate(b_h, b_w, b_k, b_v, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr, NONLINEAR: tl.constexpr):
    """(1) Z_t = tanh(H_{t-1} W + k_t v_tᵀ); without the tanh for the linear ablation."""
    if PRECISION == "f16-state" or PRECISION == "f16-state-emulated":
        b_a = _matmul_f16_state(b_h, b_w, PRECISION == "f16-state-emulated")
    else:
        b_a = _matmul(b_h, b_w, PRECISION)
    b_a += b_k[:, None] * b_v[None, :]
    if NONLINEAR:
        b_a = _tanh(b_a, FAST_TANH)
    return b_a


@triton.jit
def _store_or_add(ptr, value, mask, ATOMIC: tl.constexpr):
    # several programs write the same element when heads are shared or rows are split
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _load_step(p_q, p_k, p_v, p_f, t, stride_qs, stride_ks, stride_vs, stride_fs, m_k):
    """Inputs of step t as float32: q (BK,), k (BK,), v (V,), f (scalar). Prefetches past the
    end of a range ask for a clamped, valid step whose values go unused."""
    b_q = tl.load(p_q + t * stride_qs, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(p_k + t * stride_ks, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(p_v + t * stride_vs).to(tl.float32)
    b_f = tl.load(p_f + t * stride_fs).to(tl.float32)
    return b_q, b_k, b_v, b_f


@triton.jit
def _sum_rows_into(p_out, b_x, b_m, mask, ATOMIC: tl.constexpr):
    """b_mᵀ b_x, a sum over the program's rows of the (BK, V) block b_m weighted by b_x (BK,), into p_out (V,)
    where mask allows: the read-out y_t = H_tᵀ q_t (3), and dv_t = dA_tᵀ k_t in the backward. Where several
    programs add into p_out (the rows are split over programs), the atomic adds finish the sum: in the tensor
    cores' register layout a thread holds rows i, i+8, i+16, ... of its columns, which the first reshape below
    gathers with no sum across threads; one round of shuffles then adds the partial sums of threads 4 lanes apart
    (rows i and i+1, mod 8), which halves the values the atomics carry: each thread adds 2 columns. Measured
    (notes_kernel.md, v11, v16, v18): for y, the full sum (3 rounds, then through shared memory to one thread)
    cost 17 more instructions a step, no round at all was 1.6-3% slower than one, a second round 3-10% slower;
    for dv, the backward from 5.8% faster (7B) to 0.9% slower (B=1) than with the full sum."""
    BK: tl.constexpr = b_m.shape[0]
    V: tl.constexpr = b_m.shape[1]
    if ATOMIC:
        part = tl.sum(tl.reshape(b_x[:, None] * b_m, [BK // 8, 8, V]), axis=0)  # (8, V): row r in part[r % 8]
        part = tl.sum(tl.reshape(part, [4, 2, V]), axis=1)  # (4, V): rows 2j and 2j + 1 (mod 8) in part[j]
        tl.atomic_add(p_out[None, :] + 0 * tl.arange(0, 4)[:, None], part, mask=mask[None, :], sem="relaxed")
    else:
        tl.store(p_out, tl.sum(b_x[:, None] * b_m, axis=0), mask=mask)


@triton.jit
def _to_private(b):
    """(BK,V) -> (32, BK/16, V/2/VEC, VEC), ordered so that dimension 0 is the lane that holds the element in the
    tensor cores' accumulator layout (lane 4g + c holds rows g and g+8 of each 16-row block, and columns 2c and
    2c+1 of each 8-column tile) and the last is VEC elements (16 bytes) of one lane's: stored at _private_offsets,
    each lane's values lie together, so a state goes to memory and back to the tensor cores' layout without
    moving between lanes. Stored in plain (BK,V) order, the backward's scratch went through shared memory both ways.
    For V = 16 only (the paper's, measured): other V keep the plain order (with V = 64 and bf16 inputs this
    order gave NaN on the GPU, when V = 64 ran in one warp: most likely the stale-memory read that _warps avoids,
    which the plain order showed too; the private order was not tried again at V/32 warps: notes_kernel.md)."""
    BK: tl.constexpr = b.shape[0]
    V: tl.constexpr = b.shape[1]
    VEC: tl.constexpr = 128 // b.dtype.primitive_bitwidth
    if V == 16:
        x = tl.reshape(b, [BK // 16, 2, 8, V // 8, 4, 2])  # row = 16m + 8h + g, column = 8n + 2c + e
        x = tl.permute(x, (2, 4, 0, 1, 3, 5))  # (g, c, m, h, n, e)
        x = tl.reshape(x, [32, BK // 16, V // 2 // VEC, VEC])
    else:
        x = b
    return x


@triton.jit
def _from_private(x, V: tl.constexpr):
    """The inverse of _to_private: (32, BK/16, V/2/VEC, VEC) -> (BK,V)."""
    if V == 16:
        M: tl.constexpr = x.shape[1]
        x = tl.reshape(x, [8, 4, M, 2, V // 8, 2])  # (g, c, m, h, n, e)
        x = tl.reshape(tl.permute(x, (2, 3, 0, 4, 1, 5)), [M * 16, V])
    return x


@triton.jit
def _private_offsets(p, BK: tl.constexpr, V: tl.constexpr):
    """Where _to_private's elements go in a (BK,V) block of memory at p: 16 rows' worth (V/2 values of each lane,
    lanes in order) after another, so one float16 access of the warp covers 512 contiguous bytes. Four dimensions,
    so that Triton's coalescing gives each lane VEC contiguous values of its own: the layout _to_private leaves
    them in."""
    VEC: tl.constexpr = 128 // p.dtype.element_ty.primitive_bitwidth
    if V == 16:
        N: tl.constexpr = V // 2 // VEC
        o = tl.arange(0, 32)[:, None, None, None] * (V // 2) + tl.arange(0, BK // 16)[None, :, None, None] * (16 * V)
        o = o + tl.arange(0, N)[None, None, :, None] * VEC + tl.arange(0, VEC)[None, None, None, :]
    else:
        o = tl.arange(0, BK)[:, None] * V + tl.arange(0, V)[None, :]
    return o


@triton.jit
def _stored_states(CKPT, i_bh, i_k, S, o_private, KP: tl.constexpr, BK: tl.constexpr, V: tl.constexpr):
    """A program's first block in the states store_states keeps, (B,H,S+1,KP,V): slot t holds H_{t-1}, slot S
    H_{S-1}; the next slot is KP·V further. The forward writes it and the backward reads it."""
    return CKPT + (i_bh.to(tl.int64) * (S + 1) * KP + i_k * BK) * V + o_private


@triton.jit
def _store_state(p, b_h, mask=None):
    """One state kept for the backward (store_states), at p from _stored_states, in p's dtype. Marked to leave L2
    first: each is read once, by the backward, long after, while L2 should keep the forward's prefetched inputs
    (stored forward 3% faster at the hybrid's shape, 1% at 400M; notes_kernel.md, v20)."""
    tl.store(p, _to_private(b_h.to(p.dtype.element_ty)), mask=mask, eviction_policy="evict_first")


@triton.jit
def _forward_step(b_h, b_q_prev, b_w, b_k, b_v, b_f, p_y_prev, m_y_prev, PRECISION: tl.constexpr,
                  FAST_TANH: tl.constexpr, NONLINEAR: tl.constexpr, Y_ATOMIC: tl.constexpr):
    """Step t: returns H_t. Also the read-out of the step before, y_{t-1} = H_{t-1}ᵀ q_{t-1} (3), whose
    reduction then overlaps this step's chain, stored where m_y_prev allows."""
    b_z = _candidate(b_h, b_w, b_k, b_v, PRECISION, FAST_TANH, NONLINEAR)  # (1)
    _sum_rows_into(p_y_prev, b_q_prev, b_h, m_y_prev, Y_ATOMIC)  # (3)
    return b_f * b_h + (1.0 - b_f) * b_z  # (2) H_t = f_t H_{t-1} + (1 − f_t) Z_t


@triton.jit
def _unstack8(x, N: tl.constexpr):
    """x (N, 8) -> its 8 columns, each (N,): a tile of 8 steps' inputs, one step at a time."""
    even, odd = tl.split(tl.reshape(x, [N, 4, 2]))  # columns 0 2 4 6 and 1 3 5 7
    c04, c26 = tl.split(tl.reshape(even, [N, 2, 2]))
    c15, c37 = tl.split(tl.reshape(odd, [N, 2, 2]))
    c0, c4 = tl.split(c04)
    c2, c6 = tl.split(c26)
    c1, c5 = tl.split(c15)
    c3, c7 = tl.split(c37)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _load_tile8(p_q, p_k, p_v, p_f, t, S, stride_qs, stride_ks, stride_vs, stride_fs, m_kv, V: tl.constexpr):
    """Inputs of steps t..t+7 as tiles, one column per step: q, k (BK, 8), v (V, 8), and f as a (V, 8) tile
    (each step's f repeated over V: it scales the state's columns). Steps past S read f = 1 and k = v = q = 0."""
    o_s = t + tl.arange(0, 8)
    m_s = (o_s < S)[None, :]
    t_q = tl.load(p_q[:, None] + o_s[None, :] * stride_qs, mask=m_kv & m_s, other=0.0)
    t_k = tl.load(p_k[:, None] + o_s[None, :] * stride_ks, mask=m_kv & m_s, other=0.0)
    t_v = tl.load(p_v[:, None] + o_s[None, :] * stride_vs, mask=m_s, other=0.0)
    t_f = tl.load(p_f + o_s[None, :] * stride_fs + 0 * tl.arange(0, V)[:, None], mask=m_s, other=1.0)
    return t_q, t_k, t_v, t_f


@triton.jit
def _m2rnn_fwd_kernel(
    Q, Kt, Vt, W, F, H0, Y, HT, CKPT,
    stride_qb, stride_qs, stride_qh, stride_qk,
    stride_kb, stride_ks, stride_kh, stride_kk,
    stride_vb, stride_vs, stride_vh, stride_vv,
    stride_fb, stride_fs, stride_fh,
    S, NC,
    H: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, HF: tl.constexpr,
    HW: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
    HAS_H0: tl.constexpr, Y_ATOMIC: tl.constexpr, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
    NONLINEAR: tl.constexpr, TILE8: tl.constexpr, EVERY_STEP: tl.constexpr, KP: tl.constexpr,
):
    """One program: rows [i_k·BK, (i_k+1)·BK) of the state of head i_h in batch i_b.
    Head i_h reads head i_h // (H // HX) of a tensor with HX heads. TILE8: inputs are loaded as tiles of
    8 steps (C a multiple of 8), else one step at a time. EVERY_STEP: CKPT holds every state (B,H,S+1,KP,V), for
    a backward that reads them instead of recomputing: H_{t-1} in slot t, H_{S-1} in slot S, each in blocks of 16
    rows in _to_private's order (KP: K padded to whole row blocks); else it holds the NC checkpoints (B,H,NC,K,V)."""
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)  # the rows this program owns
    o_v = tl.arange(0, V)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None]

    p_q = Q + i_b * stride_qb + (i_h // (H // HQ)) * stride_qh + o_k * stride_qk
    p_k = Kt + i_b * stride_kb + (i_h // (H // HK)) * stride_kh + o_k * stride_kk
    p_v = Vt + i_b * stride_vb + (i_h // (H // HV)) * stride_vh + o_v * stride_vv
    p_f = F + i_b * stride_fb + (i_h // (H // HF)) * stride_fh
    p_y = Y + (i_b * S * H + i_h) * V + o_v  # Y is (B,S,H,V) contiguous
    o_state = (i_bh * K + o_k[:, None]) * V + o_v[None, :]  # offsets in a (B,H,K,V) state
    p_ckpt = CKPT + i_bh * NC * K * V + o_k[:, None] * V + o_v[None, :]  # (B,H,NC,K,V)
    SLOT: tl.constexpr = KP * V  # if EVERY_STEP: from one stored state to the next
    o_private = _private_offsets(CKPT, BK, V)
    p_states = _stored_states(CKPT, i_bh, i_k, S, o_private, KP, BK, V)

    b_w = tl.load(W + (i_h // (H // HW)) * V * V + o_v[:, None] * V + o_v[None, :])  # (V,V) fp32
    if HAS_H0:
        b_h = tl.load(H0 + o_state, mask=m_kv, other=0.0)  # (BK,V) fp32
    else:
        b_h = tl.zeros([BK, V], dtype=tl.float32)

    b_q_prev = tl.zeros([BK], dtype=tl.float32)  # q of the step before (none before step 0)
    if not TILE8:
        # inputs are loaded two steps ahead of their use (n_: next step, nn_: the one after), so that
        # their latency hides behind two steps of math; one step ahead was 4-14% slower (notes_kernel.md)
        n_q, n_k, n_v, n_f = _load_step(p_q, p_k, p_v, p_f, 0, stride_qs, stride_ks, stride_vs, stride_fs, m_k)
        nn_q, nn_k, nn_v, nn_f = _load_step(p_q, p_k, p_v, p_f, tl.minimum(1, S - 1), stride_qs, stride_ks,
                                            stride_vs, stride_fs, m_k)
        for i_c in range(NC):
            # checkpoint: the state before the chunk, from which the backward recomputes it. Stored here,
            # outside the step loop: inside it, under `if t % C == 0`, the state's conversion to the
            # store's layout ran on every step (notes_kernel.md, v4)
            if not EVERY_STEP:
                tl.store(p_ckpt + i_c * K * V, b_h.to(CKPT.dtype.element_ty), mask=m_kv)
            for j in range(tl.minimum(C, S - i_c * C)):
                t = i_c * C + j
                if EVERY_STEP:
                    _store_state(p_states + t * SLOT, b_h)  # H_{t-1}
                b_q, b_k, b_v, b_f = n_q, n_k, n_v, n_f
                n_q, n_k, n_v, n_f = nn_q, nn_k, nn_v, nn_f
                nn_q, nn_k, nn_v, nn_f = _load_step(p_q, p_k, p_v, p_f, tl.minimum(t + 2, S - 1), stride_qs,
                                                    stride_ks, stride_vs, stride_fs, m_k)
                b_h = _forward_step(b_h, b_q_prev, b_w, b_k, b_v, b_f, p_y + (t - 1) * H * V,
                                    o_v < tl.minimum(t, 1) * V, PRECISION, FAST_TANH, NONLINEAR, Y_ATOMIC)
                b_q_prev = b_q
        m_y_last = m_v
    else:
        # the same steps, 8 at a time: q, k, v, f of 8 steps loaded as one tile each, so one layout change per
        # tile instead of one per step and input. The next tile is loaded while this one is computed (left to
        # Triton's pipeliner, this forward was 6-17% slower with the device's Triton 3.6: notes_kernel.md, v12).
        # Steps past S (the last tile of a ragged S) read f = 1 and k = v = q = 0: H passes through them
        # unchanged, and their read-outs are not stored.
        n_q, n_k, n_v, n_f = _load_tile8(p_q, p_k, p_v, p_f, 0, S, stride_qs, stride_ks, stride_vs, stride_fs, m_kv, V)
        for i_c in range(NC):
            if not EVERY_STEP:
                tl.store(p_ckpt + i_c * K * V, b_h.to(CKPT.dtype.element_ty), mask=m_kv)  # as above
            for j in range(0, tl.minimum(C, S - i_c * C), 8):
                t = i_c * C + j
                # this tile, and the next one loaded now, 8 steps ahead of its use
                t_q, t_k, t_v, t_f = n_q, n_k, n_v, n_f
                n_q, n_k, n_v, n_f = _load_tile8(p_q, p_k, p_v, p_f, t + 8, S, stride_qs, stride_ks, stride_vs,
                                                 stride_fs, m_kv, V)
                qs, ks, vs, fs = (_unstack8(t_q.to(tl.float32), BK), _unstack8(t_k.to(tl.float32), BK),
                                  _unstack8(t_v.to(tl.float32), V), _unstack8(t_f.to(tl.float32), V))
                p_y_prev = p_y + (t - 1) * H * V
                for s in tl.static_range(8):  # unrolled: s is a constant in each copy
                    # step t + s stores y_{t+s-1} if that step exists: none before step 0, none past S - 1
                    if s == 0:
                        m_y_prev = o_v < tl.minimum(t, 1) * V
                    else:
                        m_y_prev = o_v < (t + s <= S) * V
                    if EVERY_STEP:  # none past S
                        _store_state(p_states + (t + s) * SLOT, b_h, o_private < (t + s < S) * BK * V)
                    b_h = _forward_step(b_h, b_q_prev, b_w, ks[s], vs[s], fs[s][None, :], p_y_prev + s * H * V,
                                        m_y_prev, PRECISION, FAST_TANH, NONLINEAR, Y_ATOMIC)
                    b_q_prev = qs[s]
        # y_{S-1} was stored inside the last tile unless that tile was full
        m_y_last = o_v < (S % 8 == 0) * V
    # the last step's read-out, once per program, as a full sum: through _sum_rows_into, ptxas scheduled the loops
    # above 10 instructions a step longer (Triton 3.9's SASS)
    b_y = tl.sum(b_q_prev[:, None] * b_h, axis=0)
    _store_or_add(p_y + (S - 1) * H * V, b_y, m_y_last, Y_ATOMIC)
    tl.store(HT + o_state, b_h, mask=m_kv)
    if EVERY_STEP:
        _store_state(p_states + S * SLOT, b_h)  # H_{S-1}, for dq_{S-1}


@triton.jit
def _backward_inputs(src, t):
    """Inputs of step t as float32: q, k (BK,), v, dy (V,), f (scalar). src: pointers to step 0's q, k, v, f, dy,
    their strides over steps, and the mask of the program's rows."""
    p_q, p_k, p_v, p_f, p_dy, stride_qs, stride_ks, stride_vs, stride_fs, stride_dys, m_k = src
    b_q, b_k, b_v, b_f = _load_step(p_q, p_k, p_v, p_f, t, stride_qs, stride_ks, stride_vs, stride_fs, m_k)
    return b_q, b_k, b_v, b_f, tl.load(p_dy + t * stride_dys).to(tl.float32)


@triton.jit
def _recompute_step(b_h, nxt, j, t0, n_t, src, b_w, p_scr_c, p_dq, m_k, DQ_STEP: tl.constexpr,
                    Q_ATOMIC: tl.constexpr, RECOMPUTE_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
                    NONLINEAR: tl.constexpr):
    """Step t = t0 + j of the recompute pass of the chunk t0 .. t0+n_t−1, whose inputs (nxt) were loaded during
    the step before; loads the next step's for the step after (the chunk's last again at its end). Stores H_{t-1}
    in the scratch and returns H_t, as the forward did, with those inputs; and adds dq_t = H_t dy_t, which needs
    no gradient from later steps, so it is done here, where H_t is at hand."""
    STEP: tl.constexpr = b_h.shape[0] * b_h.shape[1]
    ins, nxt = nxt, _backward_inputs(src, t0 + tl.minimum(j + 1, n_t - 1))
    _, b_k, b_v, b_f, b_dy = ins
    p_scr_j, p_dq_t = p_scr_c + j * STEP, p_dq + (t0 + j) * DQ_STEP
    b_hs = b_h.to(p_scr_j.dtype.element_ty)  # H_{t-1} as stored: Z comes from it here and in the reverse walk
    b_z = _candidate(b_hs, b_w, b_k, b_v, RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
    tl.store(p_scr_j, _to_private(b_hs))
    b_h = b_f * b_h + (1.0 - b_f) * b_z  # H_t
    _store_or_add(p_dq_t, tl.sum(b_h * b_dy[None, :], axis=1), m_k, Q_ATOMIC)  # dq_t = H_t dy_t   (BK,)
    return b_h, nxt


@triton.jit
def _load_state(p, V: tl.constexpr):
    """A (BK,V) state H_{t-1} stored in _to_private's order (p: its _private_offsets), in the accumulator layout."""
    return _from_private(tl.load(p), V)


@triton.jit
def _reverse_step(b_g, b_dw, nxt, j, t0, src, b_w, p_scr_c, clip, p_dk, p_dv, p_df, p_dq, m_k, m_v, SLOT: tl.constexpr,
                  DK_STEP: tl.constexpr, DV_STEP: tl.constexpr, DF_STEP: tl.constexpr, DQ_STEP: tl.constexpr,
                  CLIP: tl.constexpr, K_ATOMIC: tl.constexpr, V_ATOMIC: tl.constexpr, F_ATOMIC: tl.constexpr,
                  Q_ATOMIC: tl.constexpr, STORED: tl.constexpr, PRECISION: tl.constexpr,
                  DW_PRECISION: tl.constexpr, RECOMPUTE_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
                  NONLINEAR: tl.constexpr):
    """Step t = t0 + j of the reverse walk (spec §3) over the chunk from t0, whose inputs and H_{t-1} from the
    scratch (nxt) were loaded during the step after; loads the step before's (t0's again at the chunk's start).
    b_g: the gradient reaching H_t from later steps. Returns the gradient reaching H_{t-1}, dW with this step's
    term and the loaded inputs; stores dk_t, dv_t, df_t (their addresses are formed here, at the stores: formed
    by the caller, they held ~7 more registers across the step, which pushed the capped 400M backward into
    spills on Triton 3.6). STORED: the states come from the forward, and the step also adds dq_t = H_t dy_t,
    with the H_t it loaded one step before (as H_{t-1} of step t + 1): nxt then carries it as a third entry."""
    V: tl.constexpr = b_g.shape[1]
    t, j_n = t0 + j, tl.maximum(j - 1, 0)
    if STORED:
        cur, nxt = nxt, (_backward_inputs(src, t0 + j_n), _load_state(p_scr_c + j_n * SLOT, V), nxt[1])
        ins, b_hp, b_hn = cur
        _store_or_add(p_dq + t * DQ_STEP, tl.sum(b_hn.to(tl.float32) * ins[4][None, :], axis=1), m_k, Q_ATOMIC)
    else:
        cur, nxt = nxt, (_backward_inputs(src, t0 + j_n), _load_state(p_scr_c + j_n * SLOT, V))  # H_{t-2}, next
        ins, b_hp = cur
    b_q, b_k, b_v, b_f, b_dy = ins
    # Z_t again from H_{t-1}: off the chain through G, and half the scratch traffic of storing it
    b_z = _candidate(b_hp, b_w, b_k, b_v, RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
    b_hp = b_hp.to(tl.float32)
    # G_t = G + q_t dy_tᵀ: everything that reaches H_t, then clipped (spec §3)
    b_g = b_g + b_q[:, None] * b_dy[None, :]
    if CLIP:
        b_g = tl.minimum(tl.maximum(b_g, -clip), clip)
    b_da = (1.0 - b_f) * b_g  # dA_t: gradient at the tanh input
    if NONLINEAR:
        b_da = b_da * (1.0 - b_z * b_z)
    b_df = tl.sum(tl.sum(b_g * (b_hp - b_z), axis=1), axis=0)  # df_t = Σ G_t ⊙ (H_{t-1} − Z_t)
    # G = f_t G_t + dA_t Wᵀ flows on to H_{t-1}: the dependency chain of the backward
    b_g = b_f * b_g + _matmul(b_da, tl.trans(b_w), PRECISION)
    b_dw += _matmul(tl.trans(b_hp), b_da, DW_PRECISION)  # dW += H_{t-1}ᵀ dA_t
    b_dk = tl.sum(b_da * b_v[None, :], axis=1)  # dk_t = dA_t v_t       (BK,)
    _store_or_add(p_dk + t * DK_STEP, b_dk, m_k, K_ATOMIC)
    _sum_rows_into(p_dv + t * DV_STEP, b_k, b_da, m_v, V_ATOMIC)  # dv_t = dA_tᵀ k_t      (V,)
    _store_or_add(p_df + t * DF_STEP, b_df, None, F_ATOMIC)
    return b_g, b_dw, nxt


@triton.jit
def _recompute_chunk(p_ckpt_c, m_kv, t0, n_t, p_scr_c, src, p_dq, m_k, b_w, DQ_STEP: tl.constexpr,
                     Q_ATOMIC: tl.constexpr, RECOMPUTE_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr,
                     NONLINEAR: tl.constexpr):
    """Steps t0 .. t0+n_t−1 again from their checkpoint: H_{t-1} of each into the scratch p_scr_c, dq added."""
    b_h = tl.load(p_ckpt_c, mask=m_kv, other=0.0).to(tl.float32)
    nxt = _backward_inputs(src, t0)
    for j in range(n_t):
        b_h, nxt = _recompute_step(b_h, nxt, j, t0, n_t, src, b_w, p_scr_c, p_dq, m_k, DQ_STEP, Q_ATOMIC,
                                   RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)


@triton.jit
def _walk_chunk(b_g, b_dw, t0, n_t, p_scr_c, src, p_dk, p_dv, p_df, p_dq, m_k, m_v, b_w, clip, SLOT: tl.constexpr,
                DK_STEP: tl.constexpr, DV_STEP: tl.constexpr, DF_STEP: tl.constexpr, DQ_STEP: tl.constexpr,
                CLIP: tl.constexpr, K_ATOMIC: tl.constexpr, V_ATOMIC: tl.constexpr, F_ATOMIC: tl.constexpr,
                Q_ATOMIC: tl.constexpr, STORED: tl.constexpr, PRECISION: tl.constexpr, DW_PRECISION: tl.constexpr,
                RECOMPUTE_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr, NONLINEAR: tl.constexpr):
    """Steps t0+n_t−1 down to t0 backward, H_{t-1} of step t from p_scr_c + (t − t0)·SLOT: returns G and dW.
    STORED: from the forward's states, where H_t follows in the next slot (dq_t is added on the way)."""
    V: tl.constexpr = b_g.shape[1]
    nxt = _backward_inputs(src, t0 + n_t - 1), _load_state(p_scr_c + (n_t - 1) * SLOT, V)
    if STORED:
        nxt = nxt[0], nxt[1], _load_state(p_scr_c + n_t * SLOT, V)
    for j_r in range(n_t):
        b_g, b_dw, nxt = _reverse_step(b_g, b_dw, nxt, n_t - 1 - j_r, t0, src, b_w, p_scr_c, clip, p_dk, p_dv, p_df,
                                       p_dq, m_k, m_v, SLOT, DK_STEP, DV_STEP, DF_STEP, DQ_STEP, CLIP, K_ATOMIC,
                                       V_ATOMIC, F_ATOMIC, Q_ATOMIC, STORED, PRECISION, DW_PRECISION,
                                       RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
    return b_g, b_dw


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
    HW: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, NB: tl.constexpr,
    C: tl.constexpr, HAS_DHT: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
    DW_PRECISION: tl.constexpr, RECOMPUTE_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr, NONLINEAR: tl.constexpr,
    INTERLEAVED: tl.constexpr, STORED: tl.constexpr, KP: tl.constexpr, Q_ATOMIC: tl.constexpr,
    K_ATOMIC: tl.constexpr, V_ATOMIC: tl.constexpr, F_ATOMIC: tl.constexpr,
):
    """Reverse walk of spec §3 over the rows [i_k·BK, (i_k+1)·BK) of one (batch, head), chunk by chunk from the
    last: recompute the chunk's states from its checkpoint into a scratch, then walk them backward.
    dq, dk are per row, so they are added over the heads sharing q, k; dv, df sum over rows,
    so they are added over row blocks too (X_ATOMIC: _summed's answer). dW is written per (batch, head, row block) and
    summed on the host (deterministic, and small: B·H·NB·V·V numbers).
    INTERLEAVED (S a multiple of C; a scratch of two chunks, chunk c in half c % 2): chunk c is walked backward
    while chunk c − 1 is recomputed, a step of each per iteration: two independent chains for the warp."""
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, V)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None]

    p_q = Q + i_b * stride_qb + (i_h // (H // HQ)) * stride_qh + o_k * stride_qk
    p_k = Kt + i_b * stride_kb + (i_h // (H // HK)) * stride_kh + o_k * stride_kk
    p_v = Vt + i_b * stride_vb + (i_h // (H // HV)) * stride_vh + o_v * stride_vv
    p_f = F + i_b * stride_fb + (i_h // (H // HF)) * stride_fh
    # gradient buffers are contiguous, with the layout of their input
    p_dq = DQ + (i_b * S * HQ + i_h // (H // HQ)) * K + o_k
    p_dk = DK + (i_b * S * HK + i_h // (H // HK)) * K + o_k
    p_dv = DV + (i_b * S * HV + i_h // (H // HV)) * V + o_v
    p_df = DF + i_b * S * HF + i_h // (H // HF)
    p_dy = DY + (i_b * S * H + i_h) * V + o_v
    o_state = (i_bh * K + o_k[:, None]) * V + o_v[None, :]
    o_tile = o_k[:, None] * V + o_v[None, :]  # offsets in one (K,V) state
    p_ckpt = CKPT + i_bh * NC * K * V + o_tile
    # this program's scratch: recomputed states H_{t-1}, each a (BK,V) block; C of them, or 2·C if INTERLEAVED
    STEP: tl.constexpr = BK * V
    o_private = _private_offsets(CKPT, BK, V)  # the scratch has CKPT's dtype
    p_scr = SCRATCH + (i_bh * NB + i_k) * (2 if INTERLEAVED else 1) * C * STEP + o_private

    b_w = tl.load(W + (i_h // (H // HW)) * V * V + o_v[:, None] * V + o_v[None, :])  # (V,V)
    if HAS_DHT:
        b_g = tl.load(DHT + o_state, mask=m_kv, other=0.0)  # dL/dH_S from the returned state
    else:
        b_g = tl.zeros([BK, V], dtype=tl.float32)
    b_dw = tl.zeros([V, V], dtype=tl.float32)

    # what _backward_inputs reads a step's inputs from: pointers to step 0's q, k, v, f, dy; their strides over
    # steps (dy is contiguous: H·V); the mask of the rows
    src = (p_q, p_k, p_v, p_f, p_dy, stride_qs, stride_ks, stride_vs, stride_fs, H * V, m_k)
    if STORED:
        # the forward stored every state (slot t: H_{t-1}; slot S: H_{S-1}): no recompute, one walk over all S steps
        p_states = _stored_states(CKPT, i_bh, i_k, S, o_private, KP, BK, V)
        b_g, b_dw = _walk_chunk(b_g, b_dw, 0, S, p_states, src, p_dk, p_dv, p_df, p_dq,
                                m_k, m_v, b_w, clip, KP * V, HK * K, HV * V, HF, HQ * K, CLIP, K_ATOMIC, V_ATOMIC,
                                F_ATOMIC, Q_ATOMIC, STORED=True, PRECISION=PRECISION, DW_PRECISION=DW_PRECISION,
                                RECOMPUTE_PRECISION=RECOMPUTE_PRECISION, FAST_TANH=FAST_TANH, NONLINEAR=NONLINEAR)
    elif INTERLEAVED:
        # chunk NC − 1's states first, alone; then each iteration walks chunk i_c beside chunk i_c − 1's recompute
        _recompute_chunk(p_ckpt + (NC - 1) * K * V, m_kv, (NC - 1) * C, C, p_scr + ((NC - 1) % 2) * C * STEP, src,
                         p_dq, m_k, b_w, HQ * K, Q_ATOMIC, RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
        tl.debug_barrier()  # scratch written by some threads is read by others below
        for i_r in range(NC - 1):
            i_c = NC - 1 - i_r  # walked; chunk i_c − 1 recomputed beside it, into the other half of the scratch
            t0, t_r = i_c * C, (i_c - 1) * C
            p_scr_walk, p_scr_r = p_scr + (i_c % 2) * C * STEP, p_scr + ((i_c - 1) % 2) * C * STEP
            # the first inputs of each, as _recompute_chunk and _walk_chunk load them
            b_h = tl.load(p_ckpt + (i_c - 1) * K * V, mask=m_kv, other=0.0).to(tl.float32)
            r_nxt = _backward_inputs(src, t_r)
            w_nxt = _backward_inputs(src, t0 + C - 1), _load_state(p_scr_walk + (C - 1) * STEP, V)
            for i in range(C):  # recompute step t_r + i, then reverse step t0 + C − 1 − i
                b_h, r_nxt = _recompute_step(b_h, r_nxt, i, t_r, C, src, b_w, p_scr_r, p_dq, m_k, HQ * K, Q_ATOMIC,
                                             RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
                b_g, b_dw, w_nxt = _reverse_step(b_g, b_dw, w_nxt, C - 1 - i, t0, src, b_w, p_scr_walk, clip, p_dk,
                                                 p_dv, p_df, p_dq, m_k, m_v, STEP, HK * K, HV * V, HF, HQ * K, CLIP,
                                                 K_ATOMIC, V_ATOMIC, F_ATOMIC, Q_ATOMIC, STORED=False,
                                                 PRECISION=PRECISION, DW_PRECISION=DW_PRECISION,
                                                 RECOMPUTE_PRECISION=RECOMPUTE_PRECISION, FAST_TANH=FAST_TANH,
                                                 NONLINEAR=NONLINEAR)
            tl.debug_barrier()  # the next iteration overwrites the half these threads just read
        b_g, b_dw = _walk_chunk(b_g, b_dw, 0, C, p_scr, src, p_dk, p_dv, p_df, p_dq, m_k, m_v, b_w, clip, STEP, HK * K,
                                HV * V, HF, HQ * K, CLIP, K_ATOMIC, V_ATOMIC, F_ATOMIC, Q_ATOMIC, STORED=False,
                                PRECISION=PRECISION, DW_PRECISION=DW_PRECISION, RECOMPUTE_PRECISION=RECOMPUTE_PRECISION,
                                FAST_TANH=FAST_TANH, NONLINEAR=NONLINEAR)
    else:
        for i_r in range(NC):
            i_c = NC - 1 - i_r
            t0 = i_c * C
            n_t = tl.minimum(C, S - t0)
            _recompute_chunk(p_ckpt + i_c * K * V, m_kv, t0, n_t, p_scr, src, p_dq, m_k, b_w, HQ * K, Q_ATOMIC,
                             RECOMPUTE_PRECISION, FAST_TANH, NONLINEAR)
            tl.debug_barrier()  # scratch written by some threads is read by others below
            b_g, b_dw = _walk_chunk(b_g, b_dw, t0, n_t, p_scr, src, p_dk, p_dv, p_df, p_dq, m_k, m_v, b_w, clip, STEP,
                                    HK * K, HV * V, HF, HQ * K, CLIP, K_ATOMIC, V_ATOMIC, F_ATOMIC, Q_ATOMIC,
                                    STORED=False, PRECISION=PRECISION, DW_PRECISION=DW_PRECISION,
                                    RECOMPUTE_PRECISION=RECOMPUTE_PRECISION, FAST_TANH=FAST_TANH, NONLINEAR=NONLINEAR)
            tl.debug_barrier()  # the next chunk overwrites the scratch these threads just read
    tl.store(DH0 + o_state, b_g, mask=m_kv)
    tl.store(DW + ((i_bh * NB + i_k) * V + o_v[:, None]) * V + o_v[None, :], b_dw)


# -----------------------------------------------------------------------------
# host side: launchers


def _heads(q, k, v, W, f):
    counts = dict(HQ=q.shape[2], HK=k.shape[2], HV=v.shape[2], HF=f.shape[2], HW=W.shape[0])
    return max(counts.values()), counts


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _row_block(K):
    """Rows per program before the launch rules halve them for small grids: 32, or 16 for K <= 16."""
    return max(16, min(triton.next_power_of_2(K), 32))


def _stored_rows(K):
    """Rows of each state stored with store_states: K padded to whole row blocks of either size (32 or 16)."""
    return triton.cdiv(K, _row_block(K)) * _row_block(K)


def _warps(V):
    """Warps per program: one for V = 16 and 32 (one warp of 32 rows was the best accurate choice of the sweep in
    notes_kernel.md, at V = 16), one per 32 columns of the state above. With bf16 inputs, warps that held 64 or
    more columns (V = 64 in one warp, V = 128 in two) returned NaN or gradients 49% off in most calls once an earlier
    launch had left NaN in the multiprocessor's memory (H200, Triton 3.6; a fresh process's first calls find
    zeros there and pass): a read of on-chip memory before it is written, not located; with V/32 warps no call
    did, in bf16 or fp32 (notes_kernel.md, 14th session)."""
    return max(1, V // 32)


def _launch_config(K, V, dtype):
    """Rows per program (BK), warps, tanh flavour, and the precisions of the matmuls on the
    recurrence's chain and of dW's sum. bf16 inputs take the approximations whose error their own rounding
    hides; fp32 inputs take exact arithmetic."""
    BK, num_warps = _row_block(K), _warps(V)
    if dtype == torch.float32:
        return dict(BK=BK, num_warps=num_warps, FAST_TANH=0, PRECISION="ieee")
    if _interpreting():  # no inline PTX there, and its bf16 tl.dot is wrong
        return dict(BK=BK, num_warps=num_warps, FAST_TANH=0, PRECISION="bf16x3-emulated")
    return dict(BK=BK, num_warps=num_warps, FAST_TANH=1, PRECISION="bf16x3")


def _dw_precision(precision):
    """dW = Σ_t H_{t-1}ᵀ dA_t sums B·S terms whose rounding errors average out: one bf16 product
    per term is enough where the chain itself needs bf16x3."""
    return {"bf16x3": "bf16", "bf16x3-emulated": "bf16-emulated"}.get(precision, precision)


def _recompute_precision(precision):
    """The backward's recomputed states are stored in float16 for bf16 inputs: Z_t is computed from
    that stored H_{t-1} as it is, with W in two float16 parts, in the recompute and the reverse walk alike."""
    return {"bf16x3": "f16-state", "bf16x3-emulated": "f16-state-emulated"}.get(precision, precision)


def _state_copy_dtype(dtype):
    """The stored copies of the state: the forward's checkpoints (or every state, with store_states) and
    the backward's scratch of recomputed H_{t-1}. With bf16 inputs they are float16, which halves their memory
    and traffic (the scratch's traffic dominates the backward, notes_kernel.md): H_t, a running convex mix of
    Z's (|Z| < 1) and h0, stays within max(|h0|, 1), where float16 has 11 significant bits to bf16's
    8; measured at S=4096, the gradients' error against float64 did not move. fp32 inputs
    keep float32."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def _empty(*shape, device, dtype):
    """Every buffer the kernels must fill completely; tests replace this to poison them with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _output(shape, like, atomic):
    """Added into by several programs: float32 zeros; else written once, in the input's dtype. The ops return
    the float32 ones as they are, and their callers cast them to the input's dtype outside the op, where
    torch.compile fuses the cast into the next kernel instead of running one of its own (notes_throughput.md)."""
    if atomic:
        return torch.zeros(shape, device=like.device, dtype=torch.float32)
    return _empty(*shape, device=like.device, dtype=like.dtype)


def _summed(H, heads, row_blocks):
    """Which outputs several programs add into (atomically, in float32), for a launch whose programs split the rows
    into row_blocks: y, dv and df, which sum over rows, where row_blocks > 1; dq, dk, dv, df where heads share the
    input. The launches, the backward kernel's constexprs and the ops' fakes (_summed_outputs) all ask here."""
    split = row_blocks > 1
    return dict(y=split, dq=heads["HQ"] < H, dk=heads["HK"] < H, dv=heads["HV"] < H or split,
                df=heads["HF"] < H or split)


def _summed_outputs(q, k, v, W, f, chunk):
    """_summed for the row blocks the forward and the backward launches will pick: the ops' fake implementations
    need the outputs' dtypes."""
    B, _, _, K = q.shape
    H, heads = _heads(q, k, v, W, f)
    BK, sms = _launch_config(K, v.shape[-1], q.dtype)["BK"], _sm_count(q)
    forward_blocks = triton.cdiv(K, _forward_rows_per_program(B, H, K, BK, chunk, sms, q.dtype))
    backward_blocks = triton.cdiv(K, _backward_rows_per_program(B, H, K, BK, sms))
    return {**_summed(H, heads, backward_blocks), "y": _summed(H, heads, forward_blocks)["y"]}


# One-warp programs resident per SM at up to 255 registers a thread (64K registers / (256 · 32)). The kernels'
# register-hungry forms (the forward's 8-step tiles, ~200 against ~110; the interleaved backward, ~220) are used
# only where the whole grid fits in that many, or under the cap below. These rules were measured at V = 16 and count
# one-warp programs; the V/32-warp programs of wider states (_warps) fit fewer per SM than they assume.
_PROGRAMS_PER_SM_UNCAPPED = 8
# Registers are split among an SM's 4 schedulers, 16K each, and a program (one warp) lives on one. At most
# 168 a thread (5,376 a warp), 3 programs fit per scheduler: 12 per SM, more than the 10.2 that the 400M
# shape needs. Left to itself the compiler took 166-199 for the backward (by H and Triton version), and from
# 169 on only 8 fit: the last programs then ran as a second wave (400M: 12.1 vs 9.8 ms; hybrid: 3.1 vs 2.5;
# notes_kernel.md, v8).
_MAX_REGISTERS = 168
_PROGRAMS_PER_SM_CAPPED = 12  # one-warp programs resident at once under that cap


def _all_resident(programs, per_sm, sms):
    """Whether `programs` one-warp programs all run at once on `sms` multiprocessors (0: not a GPU), `per_sm` each:
    the question behind every launch rule below, since a grid that does not fit runs a second wave."""
    return programs <= per_sm * sms


def _fits_at_once(programs, sms, capped_form_fits):
    """Whether a register-hungry form (the forward's tiles, the interleaved backward) runs all `programs` at once:
    at 8 per SM without a cap, or, where that form keeps its speed under the register cap (capped_form_fits), at
    12 per SM under it. The launchers cap the registers exactly when the first does not hold."""
    return (_all_resident(programs, _PROGRAMS_PER_SM_UNCAPPED, sms)
            or capped_form_fits and _all_resident(programs, _PROGRAMS_PER_SM_CAPPED, sms))


def _forward_tiled(B, H, NB, BK, chunk, sms, dtype):
    """Whether the forward loads its inputs as tiles of 8 steps: where the chunk is a multiple of 8 and the
    B·H·NB programs of BK rows all fit at once, at 8 per SM, or, with bf16 inputs, at 12 per SM under the register
    cap. Measured (notes_kernel.md): faster where the grid fits (v10, B=1: 1.78 -> 1.34 ms; 7B, exactly 8 per SM:
    2.04 -> 1.93), slower where it does not (400M, 8 per SM: 2.66 -> 3.19); under the cap 32-row tiles spill ~20
    registers and since v17 still gain (v18, 400M: 2.44 -> 2.30 ms; config/hybrid.py's layer: equal); fp32 tiles
    spill more (102 bytes at 32 rows uncapped, v15) and are not used under the cap (untimed there)."""
    return chunk % 8 == 0 and _fits_at_once(B * H * NB, sms, capped_form_fits=dtype != torch.float32)


def _forward_rows_per_program(B, H, K, BK, chunk, sms, dtype):
    """Half the rows per program, so twice the programs, where those run in tiles (_forward_tiled). A small grid
    leaves each scheduler waiting on its few programs' chains, and more programs fill the waits; a 16-row
    program issues ~20% more instructions per row with tiles (its loads and layout changes are per warp), and
    ~35% more without, which lost everywhere (B=1: 1.06 -> 1.66 ms). Measured (notes_kernel.md, v15; same-run
    A/B), forward ms: B=1 1.06 -> 0.72, B=4 1.67 -> 1.42, B=2 S=16384 4.47 -> 4.04, fp32 B=1 5.34 -> 2.59; a grid
    over 12 per SM lost even at 16 per SM under 128 registers (7B, 2,112 programs: 1.69 -> 1.93)."""
    if BK > 16 and _forward_tiled(B, H, triton.cdiv(K, BK // 2), BK // 2, chunk, sms, dtype):
        return BK // 2
    return BK


def _sm_count(x):
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0


def _m2rnn_forward_launch(q, k, v, W, f, h0, chunk, nonlinear, store_states=False):
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, heads = _heads(q, k, v, W, f)
    NC = triton.cdiv(S, chunk)
    config = _launch_config(K, V, q.dtype)
    sms = _sm_count(q)
    BK = config["BK"] = _forward_rows_per_program(B, H, K, config["BK"], chunk, sms, q.dtype)
    NB = triton.cdiv(K, BK)
    tiled = _forward_tiled(B, H, NB, BK, chunk, sms, q.dtype)
    uncapped = not tiled or _all_resident(B * H * NB, _PROGRAMS_PER_SM_UNCAPPED, sms)
    y_atomic = _summed(H, heads, NB)["y"]
    y = _output((B, S, H, V), q, atomic=y_atomic)
    h_last = _empty(B, H, K, V, device=q.device, dtype=torch.float32)
    ckpt = _empty(B, H, *((S + 1, _stored_rows(K)) if store_states else (NC, K)), V, device=q.device,
                  dtype=_state_copy_dtype(q.dtype))
    if store_states and NB * BK < ckpt.shape[3]:
        # whole 16-row blocks no program of this forward covers (16-row programs, K mod 32 in 1..16), which a
        # backward of 32-row programs reads: zeros, as the padding rows the programs cover hold
        ckpt[:, :, :, NB * BK:].zero_()
    h0 = h0.float().contiguous() if h0 is not None else h_last  # dummy pointer when absent
    _m2rnn_fwd_kernel[(B * H, NB)](
        q, k, v, W.float().contiguous(), f, h0, y, h_last, ckpt,
        *q.stride(), *k.stride(), *v.stride(), *f.stride(), S, NC,
        H=H, **heads, K=K, V=V, C=chunk, HAS_H0=h0 is not h_last, Y_ATOMIC=y_atomic, NONLINEAR=nonlinear,
        TILE8=tiled, EVERY_STEP=store_states, KP=_stored_rows(K), **config,
        maxnreg=None if uncapped else _MAX_REGISTERS,
    )
    return y, h_last, ckpt  # y in float32 where summed (_output)


def _backward_rows_per_program(B, H, K, BK, sms):
    """Half the rows per program, so twice the programs, where all of them still run at once on `sms`
    multiprocessors (0: not a GPU). A small grid (B = 1 to 4 at the 400M shape's H) leaves the schedulers idle
    while each program waits on its chain, and more programs fill those waits (B=1: 4.9 → 3.9 ms;
    notes_kernel.md, v9). A grid that would not fit runs a second wave, which costs more than the extra
    programs gain (400M: 9.7 → 12.1 ms)."""
    if BK > 16 and _all_resident(B * H * triton.cdiv(K, BK // 2), _PROGRAMS_PER_SM_CAPPED, sms):
        return BK // 2
    return BK


def _backward_interleaved(B, H, NB, BK, S, chunk, sms, dtype):
    """Whether the backward walks chunk c while it recomputes chunk c − 1 (INTERLEAVED): where S is a multiple of
    the chunk and the B·H·NB programs of BK rows all fit at once: at 8 per SM, or, 16-row programs with bf16 inputs,
    at 12 per SM under the register cap (32-row ones and fp32 ones spill there and lose: 400M 8.61 -> 8.98 ms, B=3
    H=132 fp32 +2%; notes_kernel.md, v14). In a grid that small each warp waits on its own chain most of the time
    (v13): a second chain fills that. Measured (v14): B=4 at H=84, 1,344 16-row programs, 5.60 -> 5.12 ms."""
    return S % chunk == 0 and _fits_at_once(B * H * NB, sms, capped_form_fits=BK == 16 and dtype != torch.float32)


def _m2rnn_backward_launch(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk, nonlinear, store_states=False):
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, heads = _heads(q, k, v, W, f)
    NC = triton.cdiv(S, chunk)
    saved = (B, H, S + 1, _stored_rows(K), V) if store_states else (B, H, NC, K, V)
    if tuple(ckpt.shape) != saved:
        raise ValueError(f"m2rnn backward: the forward's saved states are {tuple(ckpt.shape)}, expected {saved} "
                         f"for store_states={store_states}, chunk={chunk}")
    config = _launch_config(K, V, q.dtype)
    sms = _sm_count(q)
    BK = config["BK"] = _backward_rows_per_program(B, H, K, config["BK"], sms)
    NB = triton.cdiv(K, BK)
    summed = _summed(H, heads, NB)
    dq, dk = _output(q.shape, q, summed["dq"]), _output(k.shape, k, summed["dk"])
    dv, df = _output(v.shape, v, summed["dv"]), _output(f.shape, f, summed["df"])
    dw = _empty(B, H, NB, V, V, device=q.device, dtype=torch.float32)
    dh0 = _empty(B, H, K, V, device=q.device, dtype=torch.float32)
    interleaved = not store_states and _backward_interleaved(B, H, NB, BK, S, chunk, sms, q.dtype)
    uncapped = interleaved and _all_resident(B * H * NB, _PROGRAMS_PER_SM_UNCAPPED, sms)
    scratch = _empty(0 if store_states else B * H * NB, 2 if interleaved else 1, chunk, BK, V, device=q.device,
                     dtype=_state_copy_dtype(q.dtype))
    dht = dh_last.float().contiguous() if dh_last is not None else dh0  # dummy when absent
    _m2rnn_bwd_kernel[(B * H, NB)](
        q, k, v, W.float().contiguous(), f, ckpt, dy.contiguous(), dht,
        dq, dk, dv, df, dw, dh0, scratch,
        *q.stride(), *k.stride(), *v.stride(), *f.stride(), S, NC, float(grad_clip or 0.0),
        H=H, **heads, K=K, V=V, NB=NB, C=chunk, HAS_DHT=dh_last is not None, CLIP=grad_clip is not None,
        DW_PRECISION=_dw_precision(config["PRECISION"]), RECOMPUTE_PRECISION=_recompute_precision(config["PRECISION"]),
        NONLINEAR=nonlinear, INTERLEAVED=interleaved, STORED=store_states, KP=_stored_rows(K), **config,
        Q_ATOMIC=summed["dq"], K_ATOMIC=summed["dk"], V_ATOMIC=summed["dv"], F_ATOMIC=summed["df"],
        maxnreg=None if uncapped else _MAX_REGISTERS,
    )
    del scratch  # before the casts below allocate
    # dW: sum over batch and row blocks, then over the heads that share one W
    dW = dw.sum(dim=(0, 2)).view(heads["HW"], H // heads["HW"], V, V).sum(1)
    return dq, dk, dv, dW.to(W.dtype), df, dh0  # float32 where summed (_output)


# -----------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake (shape) implementations and autograd.
# grad_clip changes only the backward; it rides along the forward op so autograd can see it.


@torch.library.custom_op("m2rnn::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, f: torch.Tensor,
                h0: Optional[torch.Tensor], grad_clip: Optional[float], chunk: int, nonlinear: bool,
                store_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _m2rnn_forward_launch(q, k, v, W, f, h0, chunk, nonlinear, store_states)


@_forward_op.register_fake
def _(q, k, v, W, f, h0, grad_clip, chunk, nonlinear, store_states):
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, _ = _heads(q, k, v, W, f)
    saved = (S + 1, _stored_rows(K)) if store_states else ((S + chunk - 1) // chunk, K)
    y_dtype = torch.float32 if _summed_outputs(q, k, v, W, f, chunk)["y"] else q.dtype
    return (q.new_empty(B, S, H, V, dtype=y_dtype), q.new_empty(B, H, K, V, dtype=torch.float32),
            q.new_empty(B, H, *saved, V, dtype=_state_copy_dtype(q.dtype)))


@torch.library.custom_op("m2rnn::backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, f: torch.Tensor,
                 ckpt: torch.Tensor, dy: torch.Tensor, dh_last: Optional[torch.Tensor],
                 grad_clip: Optional[float], chunk: int, nonlinear: bool, store_states: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _m2rnn_backward_launch(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk, nonlinear, store_states)


@_backward_op.register_fake
def _(q, k, v, W, f, ckpt, dy, dh_last, grad_clip, chunk, nonlinear, store_states):
    B, H = ckpt.shape[:2]  # gradients come back contiguous, whatever the inputs' strides
    summed = _summed_outputs(q, k, v, W, f, chunk)
    grad = lambda x, name: x.new_empty(x.shape, dtype=torch.float32 if summed[name] else x.dtype)
    return (grad(q, "dq"), grad(k, "dk"), grad(v, "dv"), W.new_empty(W.shape), grad(f, "df"),
            q.new_empty(B, H, q.shape[-1], v.shape[-1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, W, f, h0, grad_clip, chunk, nonlinear, store_states = inputs
    ctx.save_for_backward(q, k, v, W, f, output[2])  # checkpoints, or every state with store_states
    ctx.has_h0, ctx.grad_clip, ctx.chunk, ctx.nonlinear = h0 is not None, grad_clip, chunk, nonlinear
    ctx.store_states = store_states
    ctx.y_shape = output[0].shape
    # outputs without a gradient (the checkpoints always; the last state, usually) reach the
    # backward as None, not as zeros the size of the checkpoints (+0.16 GiB at the 400M shape)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh_last, _dckpt):
    q, k, v, W, f, ckpt = ctx.saved_tensors
    if dy is None:  # only the last state was used
        dy = q.new_zeros(ctx.y_shape)
    dq, dk, dv, dW, df, dh0 = _backward_op(q, k, v, W, f, ckpt, dy, dh_last, ctx.grad_clip, ctx.chunk,
                                           ctx.nonlinear, ctx.store_states)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dW, df.to(f.dtype), (dh0 if ctx.has_h0 else None),
            None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# the public function


def m2rnn(q, k, v, W, f, h0=None, grad_clip=None, impl="auto", chunk=DEFAULT_CHUNK, nonlinear=True,
          store_states=False):
    """M²RNN recurrence over a whole sequence, equations (1)-(3).

    q (B,S,Hq,K), k (B,S,Hk,K), v (B,S,Hv,V), W (Hw,V,V), f (B,S,Hf) in (0,1),
    h0 (B,H,K,V) or None (zeros). Returns y (B,S,H,V) in q's dtype and the last state
    (B,H,K,V) in float32. grad_clip=c clamps the gradient reaching every state to [-c, c]
    (spec §3). impl: "triton" (the chunked kernel), "torch" (the reference loop) or "auto"
    (Triton on CUDA tensors, the reference elsewhere, and everywhere without the triton package,
    as on macOS and Windows). nonlinear=False drops the tanh of (1):
    with W = 0 that is the linear ablation, a gated linear-attention layer. store_states=True trades memory
    for time: the forward keeps every state for the backward (B·(S+1)·H·KP·V numbers, KP = K padded to whole
    row blocks; 1.5 GiB a layer at config/hybrid.py's shape with bf16 inputs, instead of a checkpoint every
    `chunk` steps), which then walks them without recomputing (forward+backward 5-16% faster over
    bench_kernel.py's shapes; notes_kernel.md, v19); the reference keeps every state anyway and ignores it.
    With bf16 inputs the kernel keeps its stored copies of the state in float16 (_state_copy_dtype): h0 must
    stay within float16's range (|h0| < 65504; every later state is then bounded by max(|h0|, 1)).
    Outputs summed with float32 atomics from more than two terms take them in a run-dependent order, so
    they can differ in the last bits from run to run: y and, in the backward, dv and df whenever the rows
    are split over programs (K > 32, or K > 16 where the launch rules pick 16-row programs for a small
    grid on a GPU), and the gradients of inputs shared by heads (dq and dk in the paper's configuration).
    dW is summed on the host and does not vary.
    """
    _check_inputs(q, k, v, W, f, h0)
    if impl == "auto":
        impl = "triton" if q.is_cuda and HAVE_TRITON else "torch"
    if impl == "torch":
        return m2rnn_reference(q, k, v, W, f, h0, grad_clip, nonlinear)
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton; there is no wheel for "
                           "macOS): use impl='torch', the reference loop")
    V = v.shape[-1]
    if V < 16 or V & (V - 1):  # a (BK,V) block and the tensor cores' V×V product
        raise ValueError(f"m2rnn: the Triton kernel needs V (the state's columns) a power of 2, at least 16; got "
                         f"V={V}: use impl='torch', the reference loop")
    # states are stored for a backward only: not in inference (no_grad, or no input that needs a gradient)
    store_states = store_states and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, W, f, h0))
    _check_32bit_offsets(q, k, v, W, f, chunk, store_states)
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                           "importing triton) to run on the CPU; use impl='torch' for the reference")
    if q.shape[1] == 0:  # nothing to launch: no steps, the state stays h0
        return m2rnn_reference(q, k, v, W, f, h0, grad_clip, nonlinear)
    y, h_last, _ = _forward_op(q, k, v, W, f, h0, None if grad_clip is None else float(grad_clip), int(chunk),
                               bool(nonlinear), bool(store_states))
    return y.to(q.dtype), h_last


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
    if not all(x.is_floating_point() for x in (q, k, v, W, f) + (() if h0 is None else (h0,))):
        fail(f"inputs must be floating point, got {[x.dtype for x in (q, k, v, W, f)]}")


_MAX_OFFSET = 2**31 - 1  # the kernels compute offsets from a tensor's start in int32


def _span(x):
    """Elements from x's first to its last addressed one: what a kernel's offsets from x's data pointer reach."""
    return 0 if x.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride()))


def _check_32bit_offsets(q, k, v, W, f, chunk, store_states):
    """The recurrence kernels address each tensor with int32 offsets: past 2^31 elements they would read and write
    the wrong places, silently. Every tensor they touch, inputs and the buffers they fill, must span fewer."""
    B, S, _, K = q.shape
    V = v.shape[-1]
    H, _ = _heads(q, k, v, W, f)
    KP = _stored_rows(K)  # rows padded to whole row blocks (programs of half as many rows pad no further)
    spans = dict(q=_span(q), k=_span(k), v=_span(v), f=_span(f), y=B * S * H * V, dq=B * S * q.shape[2] * K,
                 dk=B * S * k.shape[2] * K)
    if store_states:  # the states of one head (their offset from the head's first is an int32)
        spans["states of one head"] = (S + 1) * KP * V
    else:  # the checkpoints, and the backward's recomputed states (two chunks at most)
        spans.update(checkpoints=B * H * triton.cdiv(S, chunk) * K * V, scratch=B * H * 2 * chunk * KP * V)
    for name, n in spans.items():
        if n > _MAX_OFFSET:
            raise ValueError(f"m2rnn: the Triton kernel addresses its tensors with 32-bit offsets, and {name} spans "
                             f"{n:,} elements (at most {_MAX_OFFSET:,}): run the batch in parts, or use impl='torch'")


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


# -----------------------------------------------------------------------------
# The causal conv + SiLU in front of the recurrence (spec §2), per channel of x (B,S,Ch), with ks = 4 taps
# (shorter convs are padded with zero taps at the oldest end):
#
#     z_t = w_0 x_{t-3} + w_1 x_{t-2} + w_2 x_{t-1} + w_3 x_t   (zeros before t = 0)      out_t = silu(z_t)
#     dz_t = dout_t · silu'(z_t),   silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
#     dx_t = w_3 dz_t + w_2 dz_{t+1} + w_1 dz_{t+2} + w_0 dz_{t+3}   (zeros past the end)
#     dw_j = Σ_{b,t} x_{t-3+j} · dz_t
#
# Memory-bound: each kernel passes over (B,S,Ch) once. A forward program computes a tile of BT steps x BC channels
# from four shifted tiles of x (three of them overlap, and come from the cache). A backward program owns BC channels
# (one a thread) and walks its BT steps one at a time, from the last to the first, with the last inputs and dz's in
# registers, so that z and dz are computed once a step; the walk is unrolled, so all of its loads can be in flight
# at once. torch.compile's own backward of the shifted-sum form wrote the float32 pre-activation and read it back at
# every tap. Measured at config/hybrid.py's shape (notes_throughput.md): forward 78 -> 25 us, backward ~200 -> 57 us.

CONV_TAPS = 4  # ks the kernels take: the paper's (config m2rnn_conv_size)
CONV_TILE = dict(BT=32, BC=128, num_warps=4)  # steps and channels of one program


@triton.jit
def _conv_mask(t, S, m_c):
    """The channel mask m_c where step(s) t lie in 0 <= t < S (t and m_c broadcast against each other)."""
    t_c = t + tl.zeros_like(m_c.to(tl.int32))  # a vector even for one step: a scalar mask fails in the interpreter
    return m_c & (t_c >= 0) & (t_c < S)


@triton.jit
def _conv_load(p, t, stride_s, S, m_c):
    """x or dout at step(s) t of the program's channels (p broadcast against t), as float32; zeros outside the
    sequence."""
    return tl.load(p + t * stride_s, mask=_conv_mask(t, S, m_c), other=0.0).to(tl.float32)


@triton.jit
def _conv_store(p, t, stride_s, S, m_c, value):
    tl.store(p + t * stride_s, value, mask=_conv_mask(t, S, m_c))


@triton.jit
def _conv_fwd_kernel(X, W, OUT, stride_xb, stride_xs, stride_xc, S, CH, BT: tl.constexpr, BC: tl.constexpr):
    """A tile of BT steps x BC channels: z from the four shifted tiles of x that its taps read (three of them
    overlap the next one, and come from the cache)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = (i_t * BT + tl.arange(0, BT))[:, None]
    c = i_c * BC + tl.arange(0, BC)
    m_c = (c < CH)[None, :]
    p_x = (X + i_b.to(tl.int64) * stride_xb + c * stride_xc)[None, :]
    z = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(4):
        w_j = tl.load(W + c * 4 + j, mask=c < CH, other=0.0)[None, :]
        z += w_j * _conv_load(p_x, t - 3 + j, stride_xs, S, m_c)
    _conv_store((OUT + i_b.to(tl.int64) * S * CH + c)[None, :], t, CH, S, m_c, z * tl.sigmoid(z))


@triton.jit
def _conv_bwd_kernel(X, W, DOUT, DX, DW, stride_xb, stride_xs, stride_xc, stride_db, stride_ds, stride_dc, S, CH,
                     BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = i_c * BC + tl.arange(0, BC)
    m_c = c < CH
    p_x = X + i_b.to(tl.int64) * stride_xb + c * stride_xc
    p_dout = DOUT + i_b.to(tl.int64) * stride_db + c * stride_dc
    p_dx = DX + i_b.to(tl.int64) * S * CH + c
    w0, w1 = tl.load(W + c * 4, mask=m_c, other=0.0), tl.load(W + c * 4 + 1, mask=m_c, other=0.0)
    w2, w3 = tl.load(W + c * 4 + 2, mask=m_c, other=0.0), tl.load(W + c * 4 + 3, mask=m_c, other=0.0)
    # walk t = t0+BT+2 down to t0: the first 3 steps are the next block's, whose dz this block's dx needs
    t0 = i_t * BT
    x_0 = _conv_load(p_x, t0 + BT + 2, stride_xs, S, m_c)  # x_t, x_{t-1}, x_{t-2} for the first t
    x_1 = _conv_load(p_x, t0 + BT + 1, stride_xs, S, m_c)
    x_2 = _conv_load(p_x, t0 + BT, stride_xs, S, m_c)
    dz1 = tl.zeros((BC,), dtype=tl.float32)  # dz_{t+1}, dz_{t+2}, dz_{t+3}
    dz2 = tl.zeros((BC,), dtype=tl.float32)
    dz3 = tl.zeros((BC,), dtype=tl.float32)
    dw0 = tl.zeros((BC,), dtype=tl.float32)
    dw1 = tl.zeros((BC,), dtype=tl.float32)
    dw2 = tl.zeros((BC,), dtype=tl.float32)
    dw3 = tl.zeros((BC,), dtype=tl.float32)
    for i in tl.static_range(BT + 3):
        t = t0 + BT + 2 - i
        x_3 = _conv_load(p_x, t - 3, stride_xs, S, m_c)
        z = w0 * x_3 + w1 * x_2 + w2 * x_1 + w3 * x_0
        sig = tl.sigmoid(z)
        dz = _conv_load(p_dout, t, stride_ds, S, m_c) * sig * (1 + z * (1 - sig))  # 0 past the end
        if i >= 3:  # t < t0 + BT: the block's own steps
            _conv_store(p_dx, t, CH, S, m_c, w3 * dz + w2 * dz1 + w1 * dz2 + w0 * dz3)
            dw0 += x_3 * dz
            dw1 += x_2 * dz
            dw2 += x_1 * dz
            dw3 += x_0 * dz
        dz3, dz2, dz1 = dz2, dz1, dz
        x_0, x_1, x_2 = x_1, x_2, x_3
    # this block's share of dw; _conv_backward sums the blocks'
    p_dw = DW + (i_b * tl.num_programs(0) + i_t).to(tl.int64) * CH * 4 + c * 4
    tl.store(p_dw, dw0, mask=m_c)
    tl.store(p_dw + 1, dw1, mask=m_c)
    tl.store(p_dw + 2, dw2, mask=m_c)
    tl.store(p_dw + 3, dw3, mask=m_c)


def _four_taps(weight):
    """weight (Ch,ks), ks <= 4, as the kernels' (Ch,4) float32: zero taps in front reach back past the conv."""
    return torch.nn.functional.pad(weight.float(), (CONV_TAPS - weight.shape[1], 0)).contiguous()


def _conv_grid(x):
    B, S, CH = x.shape
    return triton.cdiv(S, CONV_TILE["BT"]), triton.cdiv(CH, CONV_TILE["BC"]), B


def _conv_dw_blocks_shape(x):
    """The backward's shares of dw: one (Ch, 4) block per (batch, block of steps) of the grid."""
    n_t, _, B = _conv_grid(x)
    return B * n_t, x.shape[2], CONV_TAPS


@torch.library.custom_op("m2rnn::conv_forward", mutates_args=())
def _conv_forward_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = _empty(*x.shape, device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[_conv_grid(x)](x, _four_taps(weight), out, *x.stride(), x.shape[1], x.shape[2], **CONV_TILE)
    return out


@_conv_forward_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape)


@torch.library.custom_op("m2rnn::conv_backward", mutates_args=())
def _conv_backward_op(x: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if dout.shape[0] and _span(dout[0]) > _MAX_OFFSET:  # strides past the 32-bit offsets: a dense copy fits, as x
        dout = dout.contiguous()
    dx = _empty(*x.shape, device=x.device, dtype=x.dtype)
    dw_blocks = _empty(*_conv_dw_blocks_shape(x), device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[_conv_grid(x)](x, _four_taps(weight), dout, dx, dw_blocks, *x.stride(), *dout.stride(),
                                    x.shape[1], x.shape[2], **CONV_TILE)
    return dx, dw_blocks


@_conv_backward_op.register_fake
def _(x, weight, dout):
    return x.new_empty(x.shape), x.new_empty(_conv_dw_blocks_shape(x), dtype=torch.float32)


def _conv_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x and weight: z is recomputed


def _conv_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dx, dw_blocks = _conv_backward_op(x, weight, dout)
    # the blocks' shares of dw summed here, outside the op, where torch.compile fuses the sum
    return dx, dw_blocks.sum(dim=0)[:, CONV_TAPS - weight.shape[1]:].to(weight.dtype)


_conv_forward_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv_silu(x, weight, impl="auto"):
    """silu(causal depthwise conv of x): x (B,S,Ch), weight (Ch,ks); output t reads inputs t-ks+1 .. t (zeros
    before the sequence). Returns (B,S,Ch) in x's dtype, computed in float32. impl as m2rnn's: "triton" (the
    kernels above), "torch" (the reference), "auto" (Triton on CUDA tensors)."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv_silu: expected x (B,S,Ch) and weight (Ch,ks), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    # within a sequence the kernels' offsets are int32 (the batch's are int64): x's and the output's must fit
    offsets_fit = x.shape[0] == 0 or max(_span(x[0]), x.shape[1] * x.shape[2]) <= _MAX_OFFSET
    if impl == "auto":  # float64 (the tests' references) stays with the reference: the kernels compute in float32
        impl = "triton" if (x.is_cuda and HAVE_TRITON and x.dtype != torch.float64
                            and weight.shape[1] <= CONV_TAPS and offsets_fit) else "torch"
    if impl == "torch" or x.shape[1] == 0:
        return causal_conv_silu_reference(x, weight)
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if weight.shape[1] > CONV_TAPS:
        raise ValueError(f"the Triton conv takes up to {CONV_TAPS} taps, got {weight.shape[1]}: use impl='torch'")
    if not offsets_fit:
        raise ValueError(f"the Triton conv addresses one sequence with 32-bit offsets, and x's {tuple(x.shape[1:])} "
                         f"per sequence spans more than {_MAX_OFFSET:,} elements: use impl='torch'")
    if not HAVE_TRITON or not (x.is_cuda or _interpreting()):
        raise RuntimeError("the Triton conv needs the triton package and CUDA tensors (or TRITON_INTERPRET=1): "
                           "use impl='torch'")
    return _conv_forward_op(x, weight)


def causal_conv_silu_reference(x, weight):
    """The same as a sum of ks shifted products, in float32 at least; autograd differentiates it."""
    S, ks = x.shape[1], weight.shape[1]
    padded = torch.nn.functional.pad(x, (0, 0, ks - 1, 0))  # (B,ks-1+S,Ch): zeros before the sequence
    acc = torch.promote_types(x.dtype, torch.float32)
    z = sum(padded[:, j:j + S].to(acc) * weight[:, j].to(acc) for j in range(ks))
    return torch.nn.functional.silu(z).to(x.dtype)
