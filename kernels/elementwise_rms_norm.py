"""RMSNorm with weight (Wan's q/k norm across heads), primal and tangent in one kernel.

    y = x * r * w,   r = rsqrt(sum_tp(sum x^2) / D + eps)           (D: the full hidden size)
    t_y = (t_x * r + x * t_r) * w,   t_r = -r^3 * sum_tp(sum x t_x) / D
Under tensor parallelism each rank holds a head shard x [..., D_tp] of a row and the two row sums are
all-reduced over the TP group (``models/wan/layers.py`` ``TPRMSNorm``): a statistics kernel writes both sums
per row ([R, 2], one all-reduce for the pair), then the apply kernel reads them. With TP = 1 one kernel
does everything. Backward (primal only), g = dL/dy, c = sum_tp(sum g * w * x):
    dx = r * w * g - x * r^3 * c / D,   dw = sum_rows g * x * r     (c all-reduced too under TP)
With the q/k linear's bias b [D_tp] fused (``skip_bias_add``), x is replaced by x + b everywhere above
(float32, in registers, also in the TP statistics; b has no tangent) and db = sum_rows dx (float32 partials
per row chunk, one sum: deterministic).

Legend: x [R, D_tp] rows (R = S * B tokens); stats, r [R] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_rcm.kernels.elementwise_common import (
    block_d,
    check_bias,
    check_device,
    check_same_shape,
    contiguous,
    num_warps_for,
    row_chunks,
)

__all__ = ["RMSNormJVPFunction", "rms_norm_jvp_fused"]


# --------------------------------------------------------------------------- TP statistics
@triton.jit
def _row_sums(A, Bt, W, BIAS, OUT, N, OUT_STRIDE, OUT_COL, BLOCK_D: tl.constexpr, SQUARE_ONLY: tl.constexpr,
              HAS_W: tl.constexpr, BIAS_ON: tl.constexpr):
    """OUT[row, OUT_COL] = sum a * b [* w] over the row (a * a when SQUARE_ONLY); BIAS added to a
    (BIAS_ON = 1) or to b (BIAS_ON = 2), none for 0."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < N
    a = tl.load(A + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if BIAS_ON == 1:
        a += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if SQUARE_ONLY:
        tl.store(OUT + row * OUT_STRIDE + OUT_COL, tl.sum(a * a, axis=0))
    else:
        b = tl.load(Bt + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if BIAS_ON == 2:
            b += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            b = b * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * OUT_STRIDE + OUT_COL, tl.sum(a * b, axis=0))


# --------------------------------------------------------------------------- forward: primal + tangent
@triton.jit
def _rms_jvp_fwd(X, TX, W, BIAS, STATS, Y, TY, R_OUT, N, inv_D, eps, BLOCK_D: tl.constexpr, HAS_TX: tl.constexpr,
                 HAS_STATS: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_STATS:  # all-reduced over TP: (sum x^2, sum x t_x)
        ss = tl.load(STATS + row * 2)
    else:
        ss = tl.sum(x * x, axis=0)
    r = 1.0 / tl.sqrt(ss * inv_D + eps)
    tl.store(R_OUT + row, r)
    tl.store(Y + row * N + cols, (x * r * w).to(Y.dtype.element_ty), mask=mask)
    if HAS_TX:
        t_x = tl.load(TX + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_STATS:
            sxt = tl.load(STATS + row * 2 + 1)
        else:
            sxt = tl.sum(x * t_x, axis=0)
        t_r = -r * r * r * sxt * inv_D
        tl.store(TY + row * N + cols, ((t_x * r + x * t_r) * w).to(TY.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward: primal only
@triton.jit
def _rms_bwd(X, G, W, BIAS, R_IN, C, DX, PW, PB, ROWS, N, inv_D, ROWS_PER, BLOCK_D: tl.constexpr,
             HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program c: rows [c * ROWS_PER, (c+1) * ROWS_PER); dw (and db) partials to PW (PB) [chunks, N] float32."""
    c = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(c * ROWS_PER, tl.minimum((c + 1) * ROWS_PER, ROWS)):
        row = (c * 0 + i).to(tl.int64)
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32) + bias
        g = tl.load(G + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R_IN + row)
        if HAS_C:
            cc = tl.load(C + row)
        else:
            cc = tl.sum(g * w * x, axis=0)
        acc += g * x * r
        dx = r * w * g - x * (r * r * r * cc * inv_D)
        acc_b += dx
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(PW + c.to(tl.int64) * N + cols, acc, mask=mask)
    if HAS_BIAS:
        tl.store(PB + c.to(tl.int64) * N + cols, acc_b, mask=mask)


# --------------------------------------------------------------------------- autograd wrapper
class RMSNormJVPFunction(torch.autograd.Function):
    """(y, t_y); gradients flow from y to x, w (and the bias). x [R, N] contiguous, bias [N] or None;
    ``all_reduce`` sums a float32 tensor over the TP group in place (None: TP = 1, the single-kernel path);
    ``D`` the full hidden size."""

    @staticmethod
    def forward(ctx, x, t_x, weight, eps: float, D: int, all_reduce, bias=None):
        R, N = x.shape
        BLOCK = block_d(N)
        nw = num_warps_for(BLOCK)
        stats = None
        if all_reduce is not None:
            stats = torch.empty(R, 2, device=x.device, dtype=torch.float32)
            on = 0 if bias is None else 1
            _row_sums[(R,)](x, x, None, bias, stats, N, 2, 0, BLOCK_D=BLOCK, SQUARE_ONLY=True, HAS_W=False,
                            BIAS_ON=on, num_warps=nw)
            if t_x is not None:
                _row_sums[(R,)](x, t_x, None, bias, stats, N, 2, 1, BLOCK_D=BLOCK, SQUARE_ONLY=False, HAS_W=False,
                                BIAS_ON=on, num_warps=nw)
            all_reduce(stats)
        y = torch.empty_like(x)
        t_y = None if t_x is None else torch.empty_like(x)
        r = torch.empty(R, device=x.device, dtype=torch.float32)
        _rms_jvp_fwd[(R,)](x, t_x, weight, bias, stats, y, t_y, r, N, 1.0 / D, eps, BLOCK_D=BLOCK,
                           HAS_TX=t_x is not None, HAS_STATS=stats is not None, HAS_BIAS=bias is not None,
                           num_warps=nw)
        ctx.save_for_backward(x, weight, r, bias)
        ctx.D, ctx.all_reduce = D, all_reduce
        if t_y is not None:
            ctx.mark_non_differentiable(t_y)
        return y, t_y

    @staticmethod
    def backward(ctx, g, _g_t_y):
        x, weight, r, bias = ctx.saved_tensors
        R, N = x.shape
        g = g.contiguous()
        BLOCK = block_d(N)
        nw = num_warps_for(BLOCK)
        cc = None
        if ctx.all_reduce is not None:
            cc = torch.empty(R, 1, device=x.device, dtype=torch.float32)
            _row_sums[(R,)](g, x, weight, bias, cc, N, 1, 0, BLOCK_D=BLOCK, SQUARE_ONLY=False, HAS_W=True,
                            BIAS_ON=0 if bias is None else 2, num_warps=nw)
            ctx.all_reduce(cc)
        per, chunks = row_chunks(R)
        dx = torch.empty_like(x)
        pw = torch.empty(chunks, N, device=x.device, dtype=torch.float32)
        pb = None if bias is None else torch.empty_like(pw)
        _rms_bwd[(chunks,)](x, g, weight, bias, r, cc, dx, pw, pb, R, N, 1.0 / ctx.D, per, BLOCK_D=BLOCK,
                            HAS_C=cc is not None, HAS_BIAS=bias is not None, num_warps=nw)
        db = None if bias is None else pb.sum(0).to(bias.dtype)
        return dx, None, pw.sum(0).to(weight.dtype), None, None, None, db


def rms_norm_jvp_fused(x, t_x, weight, eps: float, hidden_size: int | None = None, all_reduce=None, bias=None):
    """(x [+ bias]) * r * w and its tangent over the last dim, out in x's dtype. Under TP pass the full
    ``hidden_size`` and ``all_reduce`` (in-place float32 sum over the TP group)."""
    name = "rms_norm_jvp_fused"
    check_device(name, x, bias)
    check_same_shape(name, x, t_x=t_x)
    check_bias(name, x, bias)
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({N},)")
    D = N if hidden_size is None else hidden_size
    if all_reduce is None and D != N:
        raise ValueError(f"{name}: hidden_size {D} != last dim {N} needs the TP all_reduce")
    y, t_y = RMSNormJVPFunction.apply(
        contiguous(x).view(-1, N), None if t_x is None else contiguous(t_x.to(x.dtype)).view(-1, N),
        contiguous(weight), float(eps), D, all_reduce, contiguous(bias),
    )
    return y.view(x.shape), None if t_y is None else t_y.view(x.shape)
