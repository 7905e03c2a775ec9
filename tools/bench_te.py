"""Transformer Engine benchmark: local BF16 vs TE BF16 vs TE FP8 (current scaling), one GPU, one run.

    python tools/bench_te.py                       # (a) GEMMs and (b) the student step
    python tools/bench_te.py --only gemm --tokens 31200

(a) The primal + tangent GEMMs of one Wan 14B block (D = 5120, FFN 13824: q, k, v, o of D x D, fc1 D -> FFN,
    fc2 FFN -> D) at ``--tokens`` tokens, each implementation's linears built from the model's spec: the
    forward of the sCM JVP pass (primal with autograd, tangent under no_grad, as ``models.jvp.linear_jvp``
    runs them) and the primal's backward (dgrad + wgrad). FLOPs: forward 2 x 2 T (4 D^2 + 2 D FFN), backward
    2 x 2 T (4 D^2 + 2 D FFN).
(b) The whole rCM student step (``tools/bench_step.py``, mock data, the trainer) with the 14B preset reduced to
    ``--layers`` layers at 480p (latent 16 x 20 x 60 x 104, 31,200 tokens) for each implementation,
    each in its own process, ratios against local BF16 from this run.

Every result is one JSON line on stdout (``{"bench": "te_gemm" | "te_step", ...}``) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megatron_rcm.training.phases import cuda_time_ms

IMPLS = (("local_bf16", "local", None), ("te_bf16", "transformer_engine", None),
         ("te_fp8", "transformer_engine", "current"))
"""(name, model.transformer_impl, model.fp8)."""

LATENT_480P = "[16,20,60,104]"
"""480p, 77 frames: 20 x 30 x 52 = 31,200 tokens (a multiple of 16, as FP8 GEMMs over tokens need; the
14B example config's 81 frames give 32,760, which is not)."""


def _block_linears(impl: str, fp8: str | None, D: int, FFN: int):
    from megatron_rcm.models.te_support import fp8_mode_fields
    from megatron_rcm.models.tp_linears import column_linear, row_linear
    from megatron_rcm.models.wan import wan_config
    from megatron_rcm.models.wan.spec import get_wan_block_spec

    cfg = wan_config("wan2.1-t2v-14b", num_layers=1, hidden_size=D, ffn_hidden_size=FFN, transformer_impl=impl,
                     params_dtype=torch.bfloat16, use_cpu_initialization=False, **fp8_mode_fields(fp8))
    spec = get_wan_block_spec(impl)
    lins = [column_linear(spec, cfg, D, D) for _ in range(3)] + [row_linear(spec, cfg, D, D)]
    lins += [column_linear(spec, cfg, D, FFN), row_linear(spec, cfg, FFN, D)]
    return cfg, [m.cuda() for m in lins]


def bench_gemms(tokens: int, D: int, FFN: int, warmup: int, iters: int) -> list[dict]:
    from megatron_rcm.models.jvp import linear_jvp
    from megatron_rcm.models.te_support import fp8_autocast
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    flops_fwd = 2 * 2 * tokens * (4 * D * D + 2 * D * FFN)  # primal + tangent
    flops_bwd = 2 * 2 * tokens * (4 * D * D + 2 * D * FFN)  # dgrad + wgrad of the primal
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 1, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t_x = torch.randn(tokens, 1, D, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-2
    h = torch.randn(tokens, 1, FFN, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t_h = torch.randn(tokens, 1, FFN, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-2
    rows = []
    for name, impl, fp8 in IMPLS:
        cfg, lins = _block_linears(impl, fp8, D, FFN)
        inputs = [(x, t_x)] * 5 + [(h, t_h)]  # q k v o fc1 take D; fc2 takes FFN

        def forward(cfg=cfg, lins=lins, inputs=inputs):
            with fp8_autocast(cfg):
                return [linear_jvp(m, a, t) for m, (a, t) in zip(lins, inputs)]

        def forward_backward(forward=forward):
            outs = forward()
            torch.autograd.backward([y for y, _ in outs], [torch.ones_like(y) for y, _ in outs])

        t_fwd = cuda_time_ms(forward, warmup, iters)
        t_all = cuda_time_ms(forward_backward, warmup, iters)
        t_bwd = max(t_all - t_fwd, 1e-9)
        rows.append({"bench": "te_gemm", "impl": name, "tokens": tokens, "D": D, "FFN": FFN,
                     "fwd_primal_tangent_ms": t_fwd, "bwd_primal_ms": t_bwd,
                     "fwd_tflops": flops_fwd / t_fwd / 1e9, "bwd_tflops": flops_bwd / t_bwd / 1e9,
                     "total_tflops": (flops_fwd + flops_bwd) / t_all / 1e9})
        torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        for k in ("fwd_tflops", "bwd_tflops", "total_tflops"):
            r[f"{k}_vs_local_bf16"] = r[k] / base[k]
    return rows


def bench_steps(config: str, layers: int, warmup: int, iters: int) -> list[dict]:
    rows = []
    root = Path(__file__).resolve().parents[1]
    for name, impl, fp8 in IMPLS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.json"
            cmd = [sys.executable, str(root / "tools" / "bench_step.py"), "--config", config, "--kinds", "student",
                   "--warmup", str(warmup), "--iters", str(iters), "--json", str(out),
                   "--set", f"model.overrides.num_layers={layers}", "--set", "parallel.tensor_parallel=1",
                   "--set", f"model.transformer_impl={impl}", "--set", f"model.fp8={fp8 or 'null'}",
                   "--set", f"data.latent_shape={LATENT_480P}"]
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"bench_step.py for {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads(out.read_text())["kinds"]["student"]
        rows.append({"bench": "te_step", "impl": name, "config": config, "layers": layers,
                     "step_time_s": res["step_time_s"], "tflops_per_gpu": res["tflops_per_gpu"],
                     "peak_memory_gib": res["peak_memory_gib"]})
    for r in rows:
        r["speedup_vs_local_bf16"] = rows[0]["step_time_s"] / r["step_time_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("gemm", "step"), default=None)
    ap.add_argument("--tokens", type=int, default=31200)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--config", default="examples/configs/wan2.1_t2v_14b.yaml")
    ap.add_argument("--layers", type=int, default=2, help="blocks of the 14B preset in the step benchmark")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_te.py needs a CUDA GPU (Transformer Engine)")
    if args.tokens % 16:
        raise SystemExit(f"--tokens {args.tokens}: FP8 GEMMs need a multiple of 16")
    rows = []
    if args.only in (None, "gemm"):
        rows += bench_gemms(args.tokens, args.hidden, args.ffn, args.warmup, args.iters)
    if args.only in (None, "step"):
        rows += bench_steps(args.config, args.layers, 1, 2)
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
