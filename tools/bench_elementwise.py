"""Fused vs unfused elementwise chains of the Wan block (``ops/elementwise.py``): forward (primal + tangent)
and backward (primal) times and achieved bandwidth, one JSON line per (model, chain, impl, pass).

    python tools/bench_elementwise.py                  # 1.3B and 14B shapes, 31,200 tokens, bf16, CUDA
    python tools/bench_elementwise.py --tokens 4096 --models 1.3b

GB/s counts the bytes a fused kernel must move at least (bf16 activations: each [S, D] input and output
once; [B, D] and [D] parameters and the float32 row statistics neglected), for both implementations, so
the two numbers compare like for like:
    forward (primal + tangent)                         backward
    modulated / affine LN: x, t_x -> y, t_y   (4 SD)   x, g -> dx              (3 SD)
    gated residual: x, y, t_x, t_y -> o, t_o  (6 SD)   g, y -> dx(=g), dy      (3 SD)
    RoPE: q, k, t_q, t_k -> 4 outputs         (8 SD)   g_q, g_k -> dq, dk      (4 SD)
    q/k RMSNorm: x, t_x -> y, t_y             (4 SD)   x, g -> dx              (3 SD)
    GELU-tanh: x, t_x -> y, t_y               (4 SF)   x, g -> dx              (3 SF)  (F: FFN width)
times 2 bytes per element.

Bias variants (``+bias``: the linear's ``skip_bias_add`` bias [D] handed to the chain) run three ways:
``unfused`` (the reference: y + b, then the PyTorch chain), ``fused_add`` (y + b by PyTorch's broadcast add,
then the fused kernel: the code before the bias fusion) and ``fused`` (the bias added inside the kernel and
its gradient reduced by the kernel's backward). GB/s counts the same bytes as the bias-free chain (the [D]
bias neglected), so the extra add / reduction shows as lost bandwidth.
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_rcm.training.phases import cuda_time_ms

MODELS = {"1.3b": dict(D=1536, N=12, F=8960), "14b": dict(D=5120, N=40, F=13824)}


class _AddThenFused:
    """The fused kernel after PyTorch's broadcast y + b (the path before the bias fusion)."""

    fused = True

    def __init__(self, impl):
        self.impl = impl

    def gated_residual(self, x, t_x, y, t_y, gate, t_gate, bias):
        return self.impl.gated_residual(x, t_x, y + bias, t_y, gate, t_gate)

    def rms_norm(self, x, t_x, weight, eps, hidden_size, bias):
        return self.impl.rms_norm(x + bias, t_x, weight, eps, hidden_size)

    def gelu_tanh(self, x, t_x, bias):
        return self.impl.gelu_tanh(x + bias, t_x)


def _chains(S: int, D: int, N: int, F: int):
    """(name, forward-args builder, method, grad positions, fwd bytes, bwd bytes) per chain, bf16 on CUDA."""
    from megatron_rcm.models.wan.rope import rope_cos_sin

    bf, dev = torch.bfloat16, "cuda"
    act = lambda *shape: torch.randn(*shape, device=dev, dtype=bf)
    vec = lambda *shape: torch.randn(*shape, device=dev)  # float32 [B, D] modulation / gate
    d = D // N
    f = max(1, round(S / (30 * 52)))  # any (f, h, w) grid with f * h * w = S works for timing
    cos, sin = rope_cos_sin((f, 30, S // (30 * f)), (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)), 1e4, dev,
                            torch.float32)
    S_r = cos.shape[0]
    SD, SF = 2 * S * D, 2 * S * F
    return [
        ("modulated_layer_norm", lambda: (act(S, 1, D), act(S, 1, D), 1e-6, vec(1, D), vec(1, D), vec(1, D) * 0.1,
                                          vec(1, D)), (0, 3, 5), 4 * SD, 3 * SD),
        ("affine_layer_norm", lambda: (act(S, 1, D), act(S, 1, D), 1e-6, act(D), act(D)), (0, 3, 4), 4 * SD, 3 * SD),
        ("gated_residual", lambda: (act(S, 1, D), act(S, 1, D), act(S, 1, D), act(S, 1, D), vec(1, D), vec(1, D)),
         (0, 2, 4), 6 * SD, 3 * SD),
        ("rope", lambda: (act(S_r, 1, N, d), act(S_r, 1, N, d), act(S_r, 1, N, d), act(S_r, 1, N, d), cos, sin),
         (0, 1), 8 * 2 * S_r * D, 4 * 2 * S_r * D),
        ("rms_norm", lambda: (act(S, 1, D), act(S, 1, D), act(D), 1e-6, D), (0, 2), 4 * SD, 3 * SD),
        ("gelu_tanh", lambda: (act(S, 1, F), act(S, 1, F)), (0,), 4 * SF, 3 * SF),
        ("gated_residual+bias", lambda: (act(S, 1, D), act(S, 1, D), act(S, 1, D), act(S, 1, D), vec(1, D),
                                         vec(1, D), act(D)), (0, 2, 4, 6), 6 * SD, 3 * SD),
        ("rms_norm+bias", lambda: (act(S, 1, D), act(S, 1, D), act(D), 1e-6, D, act(D)), (0, 2, 5), 4 * SD, 3 * SD),
        ("gelu_tanh+bias", lambda: (act(S, 1, F), act(S, 1, F), act(F)), (0, 2), 4 * SF, 3 * SF),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=31200, help="tokens per sample (480p 77 frames: 31,200)")
    ap.add_argument("--models", default="1.3b,14b", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--chains", default="", help="comma list of chain names (default: all), e.g. gelu_tanh+bias")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_elementwise.py needs a CUDA GPU")
    from megatron_rcm.ops.elementwise import FusedElementwise, TorchElementwise
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    impls = {"unfused": TorchElementwise(), "fused": FusedElementwise(always=True)}
    impls_bias = {**impls, "fused_add": _AddThenFused(impls["fused"])}
    wanted = set(filter(None, args.chains.split(",")))
    for model in args.models.split(","):
        shapes = MODELS[model]
        for name, build, grads, fwd_bytes, bwd_bytes in _chains(args.tokens, **shapes):
            if wanted and name not in wanted:
                continue
            base = build()
            for impl_name, impl in (impls_bias if name.endswith("+bias") else impls).items():
                fn = getattr(impl, name.removesuffix("+bias"))
                leaves = [x.detach().clone().requires_grad_(i in grads) if torch.is_tensor(x) else x
                          for i, x in enumerate(base)]
                fwd_ms = cuda_time_ms(lambda: fn(*leaves), 3, args.iters)  # noqa: B023  (with grad: the primal keeps its graph)
                out = fn(*leaves)
                primals = [o for o in out if o is not None and o.requires_grad]
                gs = [torch.randn_like(p) for p in primals]
                targets = [leaves[i] for i in grads]
                bwd_ms = cuda_time_ms(lambda: torch.autograd.grad(primals, targets, gs, retain_graph=True), 3,  # noqa: B023
                                  args.iters)
                for pass_, ms, nbytes in (("forward_jvp", fwd_ms, fwd_bytes), ("backward", bwd_ms, bwd_bytes)):
                    print(json.dumps({"bench": "elementwise", "model": model, "tokens": args.tokens, "chain": name,
                                      "impl": impl_name, "pass": pass_, "ms": round(ms, 4),
                                      "gb_per_s": round(nbytes / ms / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
