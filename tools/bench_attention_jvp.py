"""Benchmark the attention JVP kernels against torch SDPA (its default dispatch), measured in the same run.

    python tools/bench_attention_jvp.py            # the full table (an H100 takes a few minutes)
    python tools/bench_attention_jvp.py --quick    # smaller shapes, for a smoke run

FLOP formulas (B batch, H heads, Sq/Skv lengths, Dqk/Dv head dims; 2 FLOPs per multiply-add):
    attention forward  2 B H Sq Skv (Dqk + Dv)          S = Q K^T, O = P V
    JVP forward        2 B H Sq Skv (3 Dqk + 3 Dv)      + dQ K^T, Q dK^T, P dV, H~ V  (rcm_math.md sec. 9)
    JVP fast path      2 B H Sq Skv (2 Dqk + 2 Dv)      dK = dV = 0: S, dQ K^T, P V, H~ V
    attention backward 2 B H Sq Skv (3 Dqk + 2 Dv)      FlashAttention-2 convention (5 products; the
                                                        Triton two-kernel backward recomputes 2 more)
JVP rows: "auto" is attention_jvp's default (the Gluon kernel attention_jvp_fwd_sm90.py on Hopper when K and
V have tangents, the Triton kernel otherwise), "triton" forces the Triton kernel. Backward rows: "auto" is
attention_jvp's default (cuDNN's fused backward fed our O and LSE on Hopper), "triton" the Triton kernels.
Times are the median of triton.testing.do_bench (CUDA events, L2 flushed between runs).
Memory is the allocator's peak during one call minus the inputs already resident and the outputs.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_rcm.kernels.attention_bwd_cudnn import cudnn_bwd_supported
from megatron_rcm.kernels.attention_jvp import attention_jvp
from megatron_rcm.kernels.attention_jvp_bwd import _attn_bwd_dkdv, _attn_bwd_dq
from megatron_rcm.kernels.attention_jvp_fwd import _attn_jvp_fwd
from megatron_rcm.kernels.attention_jvp_fwd_sm90 import GLUON_OK
from megatron_rcm.kernels.attention_jvp_reference import check_inputs


def flops_fwd(b, h, sq, skv, dqk, dv):
    return 2.0 * b * h * sq * skv * (dqk + dv)


def flops_jvp(b, h, sq, skv, dqk, dv, fast):
    return 2.0 * b * h * sq * skv * ((2 if fast else 3) * (dqk + dv))


def flops_bwd(b, h, sq, skv, dqk, dv):
    return 2.0 * b * h * sq * skv * (3 * dqk + 2 * dv)


def bench(fn, rep=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def make(b, h, sq, skv, d, dtype=torch.bfloat16, grad=False):
    """sbhd inputs (Megatron's layout) and unit-variance tangents."""
    dev = "cuda"
    q = torch.randn(sq, b, h, d, device=dev, dtype=dtype, requires_grad=grad)
    k = torch.randn(skv, b, h, d, device=dev, dtype=dtype, requires_grad=grad)
    v = torch.randn(skv, b, h, d, device=dev, dtype=dtype, requires_grad=grad)
    t = [torch.randn_like(x).detach() for x in (q, k, v)]
    return q, k, v, t


def sdpa(q, k, v, backend=None):
    """torch SDPA on the same sbhd storage viewed as [b, h, s, d]: the default dispatch (backend None; on
    an H100 with torch 2.11 that is cuDNN) or one named backend."""
    args = [x.permute(1, 2, 0, 3) for x in (q, k, v)]
    if backend is None:
        return F.scaled_dot_product_attention(*args)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(*args)


def sdpa_backend_ms(fn):
    """Time a one-backend SDPA call for context; None where that backend refuses the shape."""
    try:
        fn()
        return bench(fn)
    except RuntimeError:
        return None


def flash_backward_ms(q, k, v, g):
    try:
        o = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
    except RuntimeError:
        return None
    return sdpa_backend_ms(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def row(name, shape, ms, flops, base_ms, target, flash_ms):
    tflops = flops / ms * 1e-9
    ratio = ms / base_ms
    ok = "met" if ratio <= target else "MISSED"
    flash = f"{flash_ms:.3f} | {ms / flash_ms:.2f}x" if flash_ms else "n/a | n/a"
    return (f"| {name} | {shape} | {ms:.3f} | {tflops:.0f} | {base_ms:.3f} | {ratio:.2f}x | <= {target}x {ok} "
            f"| {flash} |")


def forward_row(b, h, sq, skv, d, fast, target, impl="auto"):
    """attention_jvp's forward: "auto" (the Gluon Hopper kernel where it applies) or "triton"."""
    q, k, v, (tq, tk, tv) = make(b, h, sq, skv, d)
    if fast:
        tk = tv = None
    o, _ = attention_jvp(q, k, v, tq, tk, tv, forward=impl)
    err = rel(o.permute(1, 2, 0, 3), sdpa(q, k, v))
    base = bench(lambda: sdpa(q, k, v))
    flash = sdpa_backend_ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    ms = bench(lambda: attention_jvp(q, k, v, tq, tk, tv, forward=impl))
    name = ("JVP fwd, dK=dV=0" if fast else "JVP fwd") + f", {impl}"
    line = row(name, f"B{b} H{h} Sq{sq} Skv{skv} D{d}", ms, flops_jvp(b, h, sq, skv, d, d, fast), base, target,
               flash)
    gluon = impl == "auto" and not fast and GLUON_OK and torch.cuda.get_device_capability()[0] == 9
    config = "Gluon sm90, warp-specialized, 128 x 64 tiles" if gluon else getattr(_attn_jvp_fwd, "best_config", None)
    print(line, f"(config {config}; |o - sdpa|/|sdpa| = {err:.1e})", flush=True)
    if not gluon:
        print_tuning(_attn_jvp_fwd)
    return line


def print_tuning(kernel, top=6):
    """The autotuner's fastest configs of its last tuning run (median ms), for the notes."""
    timings = getattr(kernel, "configs_timings", None) or {}
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1])
    for config, ms in ranked[:top]:
        print(f"    tuned {ms[0] if isinstance(ms, list) else ms:8.3f} ms  {config}")


def backward_row(b, h, sq, skv, d, target, impl):
    """Backward of O through attention_jvp's default ("auto": cuDNN's backward fed our O and LSE where it
    applies) or its Triton kernels ("triton"), against SDPA's own forward + backward."""
    q, k, v, (tq, tk, tv) = make(b, h, sq, skv, d, grad=True)
    g = torch.randn(sq, b, h, d, device="cuda", dtype=q.dtype)
    o_ref = sdpa(q, k, v)
    g_ref = g.permute(1, 2, 0, 3)
    base = bench(lambda: torch.autograd.grad(o_ref, (q, k, v), g_ref, retain_graph=True))
    flash = flash_backward_ms(q, k, v, g_ref)
    o, _ = attention_jvp(q, k, v, tq, tk, tv, backward=impl)
    ms = bench(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
    ours = torch.autograd.grad(o, (q, k, v), g, retain_graph=True)
    ref = torch.autograd.grad(o_ref, (q, k, v), g_ref, retain_graph=True)
    errs = ", ".join(f"{n} {rel(a, r):.1e}" for n, a, r in zip("qkv", ours, ref))
    line = row(f"backward (dQ, dK, dV), {impl}", f"B{b} H{h} Sq{sq} Skv{skv} D{d}", ms,
               flops_bwd(b, h, sq, skv, d, d), base, target, flash)
    cudnn = impl == "auto" and cudnn_bwd_supported(q, check_inputs(q, k, v, tq, tk, tv, None, "sbhd"), False)
    configs = ("cuDNN" if cudnn else
               f"dkdv {getattr(_attn_bwd_dkdv, 'best_config', None)}, dq {getattr(_attn_bwd_dq, 'best_config', None)}")
    print(line, f"({configs}; grad rel. diff. to SDPA: {errs})", flush=True)
    return line


def math_jvp(q, k, v, tq, tk, tv):
    """torch.func.jvp over math attention, [b, h, s, d] views, as an eager user would write it."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    f = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    view = lambda x: x.permute(1, 2, 0, 3)
    return torch.func.jvp(f, tuple(map(view, (q, k, v))), tuple(map(view, (tq, tk, tv))))


def peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    out_bytes = sum(x.numel() * x.element_size() for x in out)
    return (torch.cuda.max_memory_allocated() - base - out_bytes) / 2**20


def memory_row(s):
    q, k, v, (tq, tk, tv) = make(1, 12, s, s, 128)
    with torch.no_grad():
        attention_jvp(q, k, v, tq, tk, tv)  # autotune and compile outside the measured peak
        ours = peak_extra_mib(lambda: attention_jvp(q, k, v, tq, tk, tv))
        ms_ours = bench(lambda: attention_jvp(q, k, v, tq, tk, tv), rep=100)
        try:
            ref = peak_extra_mib(lambda: math_jvp(q, k, v, tq, tk, tv))
            ms_ref = bench(lambda: math_jvp(q, k, v, tq, tk, tv), rep=100)
            ref_s = f"{ref:.0f} MiB, {ms_ref:.2f} ms"
        except torch.OutOfMemoryError:
            ref_s = "out of memory"
    line = f"| B1 H12 S{s} D128 | {ours:.1f} MiB, {ms_ours:.2f} ms | {ref_s} |"
    print(line, flush=True)
    return line


def backend_priority() -> list[str]:
    """SDPA's backend order for the default dispatch, by name."""
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    return [names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    parser.add_argument("--only", choices=["fwd", "bwd", "mem"], action="append",
                        help="run only these sections (repeatable; default all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    prop = torch.cuda.get_device_properties(0)
    print(f"device: {prop.name}, {prop.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; {datetime.date.today()}; SDPA backend priority "
          f"{backend_priority()}", flush=True)
    if args.quick:
        self_shapes = [(1, 4, 4096, 4096, 128)]
        cross_shapes = [(1, 4, 4096, 512, 128)]
        mem_seqlens = [2048]
    else:
        self_shapes = [(1, 12, 32760, 32760, 128), (1, 40, 8192, 8192, 128)]
        cross_shapes = [(1, 12, 32760, 512, 128), (1, 40, 32760, 512, 128)]
        mem_seqlens = [4096, 8192]

    header = ("| kernel | shape | ms | TFLOP/s | SDPA ms | ratio | target | SDPA flash ms "
              "| ratio |\n|---|---|---|---|---|---|---|---|---|")
    only = set(args.only or ["fwd", "bwd", "mem"])
    rows, mem = [], []
    if "fwd" in only:
        rows += [forward_row(*shape, fast=False, target=3.2, impl=impl) for impl in ("auto", "triton")
                 for shape in self_shapes]
        rows += [forward_row(*shape, fast=True, target=2.5) for shape in cross_shapes]
    if "bwd" in only:
        rows += [backward_row(*shape, target=1.2, impl=impl) for impl in ("auto", "triton") for shape in self_shapes]
    if "mem" in only:
        mem = [memory_row(s) for s in mem_seqlens]

    print("\nSDPA columns: torch SDPA's default dispatch (the target's baseline) and its flash backend; forward "
          "for JVP rows, backward for backward rows.")
    print(header)
    print("\n".join(rows))
    print("\n| memory beyond inputs/outputs | attention_jvp (default dispatch) | torch.func.jvp over math attention |")
    print("|---|---|---|")
    print("\n".join(mem))


if __name__ == "__main__":
    main()
