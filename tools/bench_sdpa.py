"""Benchmark: PyTorch SDPA for attention without a tangent (teacher, rollouts, critic) with cuDNN's kernel
tried first vs FlashAttention-2 (PyTorch's own first choice here), forward and forward + backward, in the
Megatron layout the models use ([S, B, N, d] views, ``ops/attention._sdpa``). One JSON line per result.

    python tools/bench_sdpa.py                      # Wan 1.3B at 480p: 31,200 tokens, 12 heads, d 128
    python tools/bench_sdpa.py --tokens 75600 --heads 40
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_rcm.ops import attention
from megatron_rcm.training.phases import cuda_time_ms


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    keys = ("attn", "sdpa", "flash", "cudnn")
    return sorted({e.name[:80] for e in prof.events()
                   if e.device_type.name == "CUDA" and any(key in e.name.lower() for key in keys)})


def bench(tokens: int, heads: int, head_dim: int, iters: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(tokens, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    g = torch.randn_like(q)
    flops_fwd = 4 * tokens * tokens * heads * head_dim
    rows = []
    for pref in attention.SDPA_PREFERENCES:
        attention.set_sdpa_preference(pref)
        fwd = lambda: attention._sdpa(q, k, v, None)  # noqa: E731

        def fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            attention._sdpa(qq, kk, vv, None).backward(g)

        t_fwd = cuda_time_ms(fwd, iters=iters)
        t_all = cuda_time_ms(fwd_bwd, iters=iters)
        rows.append({"bench": "sdpa", "prefer": pref, "tokens": tokens, "heads": heads, "head_dim": head_dim,
                     "fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "fwd_tflops": flops_fwd / t_fwd / 1e9,
                     "fwd_bwd_tflops": 3.5 * flops_fwd / t_all / 1e9, "kernels": _kernel_names(fwd),
                     "device": torch.cuda.get_device_name()})
    attention.set_sdpa_preference("cudnn")
    base = rows[-1]  # flash
    for r in rows:
        r["fwd_speedup_vs_flash"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_flash"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=31200)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("the SDPA kernels compared here need a GPU")
    for row in bench(args.tokens, args.heads, args.head_dim, args.iters):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
