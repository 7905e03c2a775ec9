"""Fused vs unfused QKV projection: one Wan self-attention (forward with tangent + backward, bf16, TP=1) per
setting, one JSON line per result (for docs/benchmarks.md).

    python tools/bench_fused_qkv.py --preset wan2.1-t2v-1.3b --grid 21,30,52 --batch 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def bench(preset: str, fused: bool, grid: tuple[int, int, int], batch: int, iters: int) -> dict:
    from megatron_rcm.models.wan import wan_config
    from megatron_rcm.models.wan.attention import WanSelfAttention
    from megatron_rcm.models.wan.rope import rope_cos_sin
    from megatron_rcm.models.wan.spec import get_wan_block_spec

    cfg = wan_config(preset, params_dtype=torch.bfloat16, fused_qkv=fused, num_layers=1)
    attn = WanSelfAttention(cfg, get_wan_block_spec("local")).to("cuda", torch.bfloat16)
    D, tokens = cfg.hidden_size, grid[0] * grid[1] * grid[2]
    x = torch.randn(tokens, batch, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t_x = torch.randn_like(x).detach()
    cos, sin = rope_cos_sin(grid, cfg.rope_dims, cfg.rope_theta, "cuda", torch.float32)
    dy = torch.randn_like(x).detach()

    def step():
        y, t_y, b = attn.forward_split(x, t_x, cos, sin)
        (y * dy).sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / iters * 1e3
    return dict(bench="fused_qkv", preset=preset, fused_qkv=fused, tokens=tokens, batch=batch, dtype="bf16",
                tp=1, ms_fwd_jvp_bwd=round(ms, 3), gpu=torch.cuda.get_device_name())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--grid", default="21,30,52", help="latent tokens (frames, rows, cols) after patching")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    for fused in (False, True):
        print(json.dumps(bench(a.preset, fused, tuple(int(n) for n in a.grid.split(",")), a.batch, a.iters)), flush=True)


if __name__ == "__main__":
    main()
