"""Micro-benchmark: the ring's chunked attention against one full-length call, on ONE GPU, no communication.

    python tools/bench_cp_chunks.py                                 (1.3B shapes: 31,200 tokens, 12 heads, d 128)
    python tools/bench_cp_chunks.py --device cpu --tokens 96 --heads 2 --head-dim 16 --iters 1   (smoke test)

Ring context parallelism at CP = c splits the S queries and keys into c shards; CP rank r computes its s = S / c
queries against the c key chunks (``KernelChunkOps.forward`` per chunk, folded by ``PartialSum``) and, in the
backward, the per-chunk FlashAttention-2 backward with the global (o, lse). Here every rank's share runs in
sequence on one GPU, so the sum over the c ranks does the same FLOPs as one full-length call and

    overhead = t(all ranks' chunked work) / t(one full-length call)

isolates what chunking costs (more, shorter kernel launches, the LSE merges, the float32 accumulators, the
copies), the part of the CP step that communication overlap cannot hide. Modes:

* ``jvp``: forward with tangents (the JVP kernel with LSE and dLSE; the Gluon kernel on Hopper);
* ``primal``: forward without tangents (the SDPA kernel ``F.scaled_dot_product_attention`` picks, with LSE);
* ``bwd``: the backward given o, lse and dO (cuDNN's attention backward on Hopper, else Triton).

Implementations: ``full`` (one call over all keys), ``ring`` (this codebase's chunk path) and, for the
forward modes, ``ring_legacy`` (the chunk path before 2026-12: FlashAttention-2 for primal chunks, float32
copies of every chunk's o and t_o, pairwise ``merge_partials``), so the gain is measured in the same run.
One JSON line per result on stdout (``{"bench": "cp_chunks", ...}``); the ring results also carry their
error against ``full`` (max |a - b| / max |b| over o, t_o or dq, dk, dv).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rcm.ops.attention_chunks import (  # noqa: E402
    KernelChunkOps,
    Partial,
    PartialSum,
    chunk_ops,
    merge_partials,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=31200)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--modes", nargs="+", default=["jvp", "primal", "bwd"], choices=["jvp", "primal", "bwd"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args(argv)


def _timed(fn, device, warmup, iters) -> float:
    """Median seconds of ``fn()`` (CUDA events on CUDA, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _legacy_forward(ops, q, k, v, t_q, t_k, t_v, scale) -> Partial:
    """One chunk as the ring computed it before: FlashAttention-2 for primal chunks, float32 copies of o, t_o."""
    if t_q is None and isinstance(ops, KernelChunkOps):
        bhsd = lambda x: x.permute(1, 2, 0, 3)
        out = torch.ops.aten._scaled_dot_product_flash_attention(bhsd(q), bhsd(k), bhsd(v), 0.0, False, False,
                                                                 scale=scale)
        return Partial(out[0].permute(2, 0, 1, 3).float(), None, out[1].float(), None)
    p = ops.forward(q, k, v, t_q, t_k, t_v, scale)
    return Partial(p.o.float(), None if p.t_o is None else p.t_o.float(), p.lse, p.t_lse)


def ring_forward(ops, q, k, v, t_q, t_k, t_v, scale, cp: int, legacy: bool = False):
    """Every CP rank's ring forward, one after the other: [(o, t_o, lse)] per rank, o and t_o in q's dtype."""
    s = q.shape[0] // cp
    out = []
    for r in range(cp):
        rows = slice(r * s, (r + 1) * s)
        acc = None if legacy else PartialSum()
        for j in range(cp):
            c = slice(j * s, (j + 1) * s)
            args = (q[rows], k[c], v[c], None if t_q is None else t_q[rows], None if t_k is None else t_k[c],
                    None if t_v is None else t_v[c], scale)
            if legacy:
                part = _legacy_forward(ops, *args)
                acc = part if acc is None else merge_partials(acc, part)
            else:
                acc.add(ops.forward(*args))
        res = acc if legacy else acc.result()
        out.append((res.o.to(q.dtype), None if res.t_o is None else res.t_o.to(q.dtype), res.lse))
    return out


def ring_backward(ops, q, k, v, o, lse, do, scale, cp: int):
    """Every CP rank's ring backward (the local work of ``_RingAttention.backward``, no communication):
    dq of each rank's rows and dk, dv of each key chunk, summed over the ranks."""
    s = q.shape[0] // cp
    fp = torch.float32 if q.dtype != torch.float64 else q.dtype
    dq = torch.empty(q.shape, dtype=fp, device=q.device)
    dkv = torch.zeros((2, *k.shape), dtype=fp, device=q.device)
    for r in range(cp):
        rows = slice(r * s, (r + 1) * s)
        dq_r = torch.zeros_like(q[rows], dtype=fp)
        for j in range(cp):
            c = slice(j * s, (j + 1) * s)
            part = torch.zeros((2, s, *k.shape[1:]), dtype=fp, device=q.device)
            dq_j, dk_j, dv_j = ops.backward(q[rows], k[c], v[c], o[rows], lse[..., rows], do[rows], scale)
            dq_r += dq_j
            part[0], part[1] = dk_j, dv_j
            dkv[:, c] += part  # what the ring adds to the chunk's travelling dk, dv
        dq[rows] = dq_r
    return dq, dkv[0], dkv[1]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cp_chunks.py: --device cuda but CUDA is not available (use --device cpu)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for cp in args.cp:
        if args.tokens % cp:
            raise SystemExit(f"bench_cp_chunks.py: --tokens {args.tokens} is not divisible by --cp {cp}")
    S, B, N, d = args.tokens, args.batch, args.heads, args.head_dim
    g = torch.Generator(device).manual_seed(0)
    q, k, v, t_q, t_k, t_v, do = (torch.randn(S, B, N, d, generator=g, device=device, dtype=dtype) for _ in range(7))
    ops = chunk_ops("auto", device)
    scale = d**-0.5
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    base = {"bench": "cp_chunks", "tokens": S, "batch": B, "heads": N, "head_dim": d, "dtype": str(dtype),
            "device": name, "chunk_ops": type(ops).__name__, "torch": torch.__version__}
    results = []

    def emit(**row):
        row = base | row
        results.append(row)
        print(json.dumps(row), flush=True)

    timed = lambda fn: _timed(fn, device, args.warmup, args.iters)
    with torch.no_grad():
        for mode in args.modes:
            tangents = (t_q, t_k, t_v) if mode == "jvp" else (None, None, None)
            full = ops.forward(q, k, v, *tangents, scale)
            if mode == "bwd":
                o, lse = full.o.to(dtype), full.lse
                t_full = timed(functools.partial(ops.backward, q, k, v, o, lse, do, scale))
                want = ops.backward(q, k, v, o, lse, do, scale)
                emit(mode=mode, impl="full", cp=1, ms=t_full * 1e3)
                for cp in args.cp:
                    run = functools.partial(ring_backward, ops, q, k, v, o, lse, do, scale, cp)
                    t = timed(run)
                    got = run()
                    err = max(_err(a, b) for a, b in zip(got, want))
                    emit(mode=mode, impl="ring", cp=cp, ms=t * 1e3, overhead=t / t_full, max_rel_err=err)
                continue
            t_full = timed(functools.partial(ops.forward, q, k, v, *tangents, scale))
            emit(mode=mode, impl="full", cp=1, ms=t_full * 1e3)
            for cp in args.cp:
                for impl in ("ring", "ring_legacy"):
                    run = functools.partial(ring_forward, ops, q, k, v, *tangents, scale, cp,
                                            legacy=impl == "ring_legacy")
                    t = timed(run)
                    got = run()
                    o = torch.cat([x[0] for x in got])
                    err = _err(o, full.o)
                    if mode == "jvp":
                        err = max(err, _err(torch.cat([x[1] for x in got]), full.t_o))
                    emit(mode=mode, impl=impl, cp=cp, ms=t * 1e3, overhead=t / t_full, max_rel_err=err)
    return results


if __name__ == "__main__":
    main()
