"""GELU (tanh approximation) with its tangent in one kernel, and its backward (the Wan FFN activation).

    y = 0.5 x (1 + tanh(u)),   u = c (x + 0.044715 x^3),   c = sqrt(2 / pi)
    y'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) c (1 + 3 * 0.044715 x^2)     (models/jvp.py)
    t_y = y'(x) t_x;   backward dx = y'(x) g
With the fc1 bias b [F] fused (the linear's ``skip_bias_add`` output, Megatron's bias-GELU fusion): x is
replaced by x + b (added in float32 in registers), the bias has no tangent, and the backward also returns
db = sum_rows dx (float32 partials per row chunk, summed once: deterministic).
Math in float32 registers, out in x's dtype; tanh from exp (no libdevice call, portable across Triton
versions): tanh(u) = 1 - 2 / (exp(2u) + 1), exact at both saturations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_rcm.kernels.elementwise_common import (
    INTERPRET,
    check_bias,
    check_device,
    check_same_shape,
    contiguous,
    row_chunks,
)

__all__ = ["GeluTanhJVPFunction", "gelu_tanh_jvp_fused"]

BLOCK = 1024


@triton.jit
def _gelu_parts(x):
    """(y, dy/dx) in float32."""
    c: tl.constexpr = 0.7978845608028654
    u = c * (x + 0.044715 * x * x * x)
    th = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    y = 0.5 * x * (1.0 + th)
    dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x)
    return y, dy


@triton.jit
def _gelu_jvp_fwd(X, TX, BIAS, Y, TY, n, F, BLOCK: tl.constexpr, HAS_TX: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # x [rows, F] flat: column offs % F
        x += tl.load(BIAS + offs % F, mask=mask, other=0.0).to(tl.float32)
    y, dy = _gelu_parts(x)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_TX:
        t_x = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(TY + offs, (dy * t_x).to(TY.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd(X, G, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    _, dy = _gelu_parts(x)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * g).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bias_bwd(X, BIAS, G, DX, P, ROWS, F, ROWS_PER, BLOCK_F: tl.constexpr):
    """Program (c, j): rows [c * ROWS_PER, (c+1) * ROWS_PER), columns block j; db partials to P [chunks, F]."""
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for i in range(c * ROWS_PER, tl.minimum((c + 1) * ROWS_PER, ROWS)):
        offs = (c * 0 + i).to(tl.int64) * F + cols
        _, dy = _gelu_parts(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + bias)
        dx = dy * tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        acc += dx
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(P + c.to(tl.int64) * F + cols, acc, mask=mask)


class GeluTanhJVPFunction(torch.autograd.Function):
    """(y, t_y); gradients flow from y to x (and the bias). x, t_x contiguous; bias [F] (F = x's last dim)
    or None."""

    @staticmethod
    def forward(ctx, x, t_x, bias):
        n, F = x.numel(), x.shape[-1]
        y = torch.empty_like(x)
        t_y = None if t_x is None else torch.empty_like(t_x)
        nw = 1 if INTERPRET else 4
        _gelu_jvp_fwd[(triton.cdiv(n, BLOCK),)](x, t_x, bias, y, t_y, n, F, BLOCK=BLOCK, HAS_TX=t_x is not None,
                                                HAS_BIAS=bias is not None, num_warps=nw)
        ctx.save_for_backward(x, bias)
        if t_y is not None:
            ctx.mark_non_differentiable(t_y)
        return y, t_y

    @staticmethod
    def backward(ctx, g, _g_t_y):
        x, bias = ctx.saved_tensors
        dx = torch.empty_like(x)
        n, F = x.numel(), x.shape[-1]
        nw = 1 if INTERPRET else 4
        if bias is None:
            _gelu_bwd[(triton.cdiv(n, BLOCK),)](x, g.contiguous(), dx, n, BLOCK=BLOCK, num_warps=nw)
            return dx, None, None
        rows = n // F
        per, chunks = row_chunks(rows)
        p = torch.empty(chunks, F, device=x.device, dtype=torch.float32)
        _gelu_bias_bwd[(chunks, triton.cdiv(F, BLOCK))](x, bias, g.contiguous(), dx, p, rows, F, per, BLOCK_F=BLOCK,
                                                        num_warps=nw)
        return dx, None, p.sum(0).to(bias.dtype)


def gelu_tanh_jvp_fused(x, t_x, bias=None):
    """GELU-tanh of x (+ bias [F] over the last dim) and its tangent (t_y in t_x's dtype, None without a
    tangent)."""
    name = "gelu_tanh_jvp_fused"
    check_device(name, x, bias)
    check_same_shape(name, x, t_x=t_x)
    check_bias(name, x, bias)
    return GeluTanhJVPFunction.apply(contiguous(x), contiguous(t_x), contiguous(bias))
