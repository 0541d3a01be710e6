"""
Benchmark of the M²RNN Triton kernel on a CUDA GPU: forward and forward+backward times
(medians of triton.testing.do_bench), peak extra memory, the fraction of the tanh floor
reached, and the speed-up over the plain PyTorch reference at a small shape — in one run. The
last two columns: forward+backward and memory again with store_states=True (every state kept for
the backward instead of a checkpoint every 64 steps).

    python bench_kernel.py                 # every shape below, bf16
    python bench_kernel.py --shapes=400M   # one shape (comma-separated names)

The floor (M2RNN_SPEC.md §4): a forward evaluates B·S·H·K·V tanh, and the special-function
unit evaluates 16 per clock per SM; the backward recomputes them once more. On an H200
(132 SMs at 1.98 GHz) that is 0.67 ms per forward at the 400M shape.
"""
import sys

import torch
from triton.testing import do_bench

from m2rnn_kernel import m2rnn, m2rnn_reference

SHAPES = {  # name: (B, S, H, K, V), Hq = Hk = 1 as in the paper
    "400M": (8, 4096, 84, 64, 16),
    "7B": (4, 4096, 132, 64, 16),
    "B1-S4096": (1, 4096, 84, 64, 16),
    "B4-S4096": (4, 4096, 84, 64, 16),  # 16-row backward programs, interleaved under the register cap
    "B2-S16384": (2, 16384, 84, 64, 16),
    "hybrid-124M": (12, 1024, 64, 64, 16),  # config/hybrid.py: batch 12 × 1024 tokens per GPU
}
TANH_PER_CLOCK_PER_SM = 16
SM_CLOCK_HZ = {"H200": 1.98e9, "H100": 1.98e9, "A100": 1.41e9}


def make_inputs(B, S, H, K, V, dtype=torch.bfloat16):
    dev = "cuda"
    q = (torch.randn(B, S, 1, K, device=dev) / K**0.5).to(dtype)
    k = (torch.randn(B, S, 1, K, device=dev) / K**0.5).to(dtype)
    v = torch.randn(B, S, H, V, device=dev).to(dtype)
    W = torch.eye(V, device=dev).repeat(H, 1, 1) + 0.1 * torch.randn(H, V, V, device=dev)
    f = torch.rand(B, S, H, device=dev) * 0.5 + 0.45
    return [x.requires_grad_() for x in (q, k, v, W, f)]


def tanh_floor_ms(B, S, H, K, V):
    name = torch.cuda.get_device_name()
    clock = next((hz for key, hz in SM_CLOCK_HZ.items() if key in name), None)
    if clock is None:
        return float("nan")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return B * S * H * K * V / (TANH_PER_CLOCK_PER_SM * sms * clock) * 1e3


def fwd_bwd(inputs, impl, grads=None, store_states=False):
    """One forward+backward; grads = (dy, dh) made beforehand, so that memory measurements
    count only what the recurrence allocates."""
    y, h = m2rnn(*inputs, grad_clip=1.0, impl=impl, store_states=store_states)
    dy, dh = grads if grads is not None else (torch.ones_like(y), torch.ones_like(h))
    torch.autograd.backward((y, h), (dy, dh))


def forward_backward_ms_and_gib(inputs, shape, store_states):
    """Median forward+backward time, and the peak memory it allocates beyond the inputs and output gradients."""
    t_fb = do_bench(lambda: fwd_bwd(inputs, "triton", store_states=store_states), warmup=50, rep=500,
                    grad_to_none=inputs, return_mode="median")
    for x in inputs:
        x.grad = None
    B, S, H, K, V = shape
    grads = (torch.randn(B, S, H, V, device="cuda", dtype=inputs[0].dtype), torch.randn(B, H, K, V, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # inputs and output gradients present; outputs and grads counted
    fwd_bwd(inputs, "triton", grads, store_states)
    torch.cuda.synchronize()
    return t_fb, (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_shape(B, S, H, K, V):
    torch.cuda.empty_cache()  # each shape from a fresh allocator: the stored states of the shape before are large
    inputs = make_inputs(B, S, H, K, V)
    with torch.no_grad():
        t_fwd = do_bench(lambda: m2rnn(*inputs, impl="triton"), warmup=50, rep=300, return_mode="median")
    t_fb, extra_gib = forward_backward_ms_and_gib(inputs, (B, S, H, K, V), store_states=False)
    t_fb_stored, stored_gib = forward_backward_ms_and_gib(inputs, (B, S, H, K, V), store_states=True)
    floor = tanh_floor_ms(B, S, H, K, V)
    return t_fwd, t_fb, extra_gib, floor / t_fwd, 2 * floor / t_fb, t_fb_stored, stored_gib


def reference_speedup():
    """Kernel vs the PyTorch reference loop, forward+backward, at a shape the loop can do."""
    inputs = make_inputs(4, 512, 16, 64, 16)
    t_ref = do_bench(lambda: fwd_bwd(inputs, "torch"), warmup=1, rep=2000, grad_to_none=inputs,
                     return_mode="median")
    t_ker = do_bench(lambda: fwd_bwd(inputs, "triton"), warmup=20, rep=200, grad_to_none=inputs,
                     return_mode="median")
    return t_ref, t_ker


def main():
    names = list(SHAPES)
    for arg in sys.argv[1:]:
        if not arg.startswith("--shapes="):
            sys.exit(f"unknown argument {arg!r}; usage: python bench_kernel.py [--shapes=NAME,...] "
                     f"with NAME in {', '.join(SHAPES)}")
        names = arg.split("=", 1)[1].split(",")
        for n in names:
            if n not in SHAPES:
                sys.exit(f"unknown shape {n!r}; choose from {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, grad_clip=1.0")
    print(f"{'':<35} {'':>8} {'':>11} {'':>10} {'':>10} {'':>10} {'store_states=True':>22}")
    print(f"{'shape':<12} {'B,S,H,K,V':<22} {'fwd ms':>8} {'fwd+bwd ms':>11} {'extra GiB':>10} "
          f"{'fwd/floor':>10} {'f+b/floor':>10} {'fwd+bwd ms':>11} {'extra GiB':>10}")
    for name in names:
        shape = SHAPES[name]
        t_fwd, t_fb, gib, frac_f, frac_fb, t_fb_stored, gib_stored = bench_shape(*shape)
        print(f"{name:<12} {str(shape):<22} {t_fwd:8.3f} {t_fb:11.3f} {gib:10.3f} {frac_f:10.1%} {frac_fb:10.1%} "
              f"{t_fb_stored:11.3f} {gib_stored:10.3f}", flush=True)
    t_ref, t_ker = reference_speedup()
    print(f"PyTorch reference vs kernel, fwd+bwd at B=4 S=512 H=16 K=64 V=16: "
          f"{t_ref:.1f} ms vs {t_ker:.3f} ms = {t_ref / t_ker:.0f}x")


if __name__ == "__main__":
    main()
