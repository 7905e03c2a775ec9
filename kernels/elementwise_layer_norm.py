"""LayerNorm with adaLN modulation (or an affine), primal and tangent in one kernel (rcm_math.md section 8).

Chains of the Wan block (``models/wan/block.py``):
    modulated (norm1, norm2):  y = LN(x) * (1 + scale) + shift,   scale, shift [B, D] per sample
    affine (norm3):            y = LN(x) * w + b
LN(x) = x_hat = (x - mean) * rstd, rstd = rsqrt(var + eps), no affine of its own. Tangent (models/jvp.py
``layer_norm_jvp`` then ``modulate_jvp``):
    t_x_hat = rstd * (t_c - x_hat * mean(x_hat * t_c)),   t_c = t_x - mean(t_x)
    t_y = t_x_hat * (1 + scale) + x_hat * t_scale + t_shift      (modulated)
    t_y = t_x_hat * w                                             (affine)
Any tangent may be None (zero). Backward (primal only), g = dL/dy:
    g_hat = g * (1 + scale)  or  g * w;    dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))
    dscale[b] = sum_s g * x_hat,  dshift[b] = sum_s g      (modulated, per sample)
    dw = sum_rows g * x_hat,      db = sum_rows g          (affine)

Legend: x [s, B, D] (rows r = s * B + b, so a row's sample is r % B); mean, rstd [s * B] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_rcm.kernels.elementwise_common import (
    block_d,
    check_device,
    check_same_shape,
    contiguous,
    num_warps_for,
    row_chunks,
)

__all__ = ["LayerNormJVPFunction", "layer_norm_jvp_fused"]


# --------------------------------------------------------------------------- forward: primal + tangent
@triton.jit
def _ln_jvp_fwd(X, TX, W, BIAS, SCALE, SHIFT, T_SCALE, T_SHIFT, Y, TY, MEAN, RSTD, B, D, eps,
                BLOCK_D: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr, HAS_TX: tl.constexpr,
                HAS_TSCALE: tl.constexpr, HAS_TSHIFT: tl.constexpr, HAS_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # -- statistics (float32 in registers)
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    x_hat = xc * rstd
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    # -- primal
    if AFFINE:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y_hat = x_hat * w + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        y_hat = x_hat
    if MODULATE:
        one_plus_scale = 1.0 + tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = y_hat * one_plus_scale + tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        y = y_hat
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    # -- tangent
    if HAS_T:
        t_y = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_TX:
            t_x = tl.load(TX + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            t_c = tl.where(mask, t_x - tl.sum(t_x, axis=0) / D, 0.0)
            t_y = rstd * (t_c - x_hat * (tl.sum(x_hat * t_c, axis=0) / D))
            if AFFINE:
                t_y = t_y * w
            if MODULATE:
                t_y = t_y * one_plus_scale
        if HAS_TSCALE:
            t_y += y_hat * tl.load(T_SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_TSHIFT:
            t_y += tl.load(T_SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(TY + row * D + cols, t_y.to(TY.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward: primal only
@triton.jit
def _ln_bwd(X, G, W, SCALE, MEAN, RSTD, DX, P1, P2, S, B, D, ROWS_PER,
            BLOCK_D: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr):
    """Program (c, b): tokens [c * ROWS_PER, (c+1) * ROWS_PER) of sample b; partial parameter gradients
    (dscale/dshift or dw/db) accumulate in registers and land in P1, P2 [chunks, B, D] float32."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if AFFINE:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if MODULATE:
        one_plus_scale = 1.0 + tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum g * x_hat
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum g
    for s in range(c * ROWS_PER, tl.minimum((c + 1) * ROWS_PER, S)):
        row = (s * B + b).to(tl.int64)
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        acc1 += g * x_hat
        acc2 += g
        g_hat = g
        if AFFINE:
            g_hat = g * w
        if MODULATE:
            g_hat = g * one_plus_scale
        dx = rstd * (g_hat - tl.sum(g_hat, axis=0) / D - x_hat * (tl.sum(g_hat * x_hat, axis=0) / D))
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
    out = (c * B + b).to(tl.int64) * D + cols
    tl.store(P1 + out, acc1, mask=mask)
    tl.store(P2 + out, acc2, mask=mask)


# --------------------------------------------------------------------------- autograd wrapper
class LayerNormJVPFunction(torch.autograd.Function):
    """(y, t_y) = fused LayerNorm (+ affine or + modulation) and its tangent; gradients flow from y to
    x and the affine or modulation parameters. Arguments are contiguous; x is [R, D] with R = S * B."""

    @staticmethod
    def forward(ctx, x, t_x, weight, bias, scale, shift, t_scale, t_shift, eps: float, B: int):
        R, D = x.shape
        y = torch.empty_like(x)
        has_t = t_x is not None or t_scale is not None or t_shift is not None
        t_y = torch.empty_like(x) if has_t else None
        mean = torch.empty(R, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        BLOCK = block_d(D)
        _ln_jvp_fwd[(R,)](
            x, t_x, weight, bias, scale, shift, t_scale, t_shift, y, t_y, mean, rstd, B, D, eps,
            BLOCK_D=BLOCK, AFFINE=weight is not None, MODULATE=scale is not None, HAS_TX=t_x is not None,
            HAS_TSCALE=t_scale is not None, HAS_TSHIFT=t_shift is not None, HAS_T=has_t,
            num_warps=num_warps_for(BLOCK),
        )
        ctx.save_for_backward(x, weight, scale, mean, rstd)
        ctx.B = B
        if t_y is not None:
            ctx.mark_non_differentiable(t_y)
        return y, t_y

    @staticmethod
    def backward(ctx, g, _g_t_y):
        x, weight, scale, mean, rstd = ctx.saved_tensors
        B = ctx.B
        R, D = x.shape
        S = R // B
        per, chunks = row_chunks(S)
        dx = torch.empty_like(x)
        p1 = torch.empty(chunks, B, D, device=x.device, dtype=torch.float32)
        p2 = torch.empty_like(p1)
        BLOCK = block_d(D)
        _ln_bwd[(chunks, B)](
            x, g.contiguous(), weight, scale, mean, rstd, dx, p1, p2, S, B, D, per,
            BLOCK_D=BLOCK, AFFINE=weight is not None, MODULATE=scale is not None, num_warps=num_warps_for(BLOCK),
        )
        dw = db = dscale = dshift = None
        if weight is not None:
            dw, db = p1.sum((0, 1)).to(weight.dtype), p2.sum((0, 1)).to(weight.dtype)
        if scale is not None:
            dscale, dshift = p1.sum(0).to(scale.dtype), p2.sum(0).to(scale.dtype)
        return dx, None, dw, db, dscale, dshift, None, None, None, None


def layer_norm_jvp_fused(x, t_x, eps: float, weight=None, bias=None, scale_BD=None, shift_BD=None,
                         t_scale_BD=None, t_shift_BD=None):
    """LN(x) [* w + b] [* (1 + scale) + shift] and its tangent, out in x's dtype ([..., D]; with modulation
    x is [s, B, D] and scale/shift [B, D]). ``t_y`` is None when every tangent is None."""
    name = "layer_norm_jvp_fused"
    check_device(name, x)
    check_same_shape(name, x, t_x=t_x)
    D = x.shape[-1]
    if (weight is None) != (bias is None) or (scale_BD is None) != (shift_BD is None):
        raise ValueError(f"{name}: weight and bias (and scale and shift) go together")
    if weight is not None and scale_BD is not None:
        raise ValueError(f"{name}: an affine and a modulation together are not a Wan chain; pass one")
    if weight is not None and (weight.shape != (D,) or bias.shape != (D,)):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)}, expected ({D},)")
    B = 1
    if scale_BD is not None:
        B = scale_BD.shape[0]
        if x.dim() != 3 or x.shape[1] != B or scale_BD.shape != (B, D):
            raise ValueError(
                f"{name}: modulation needs x [s, B, D] and scale/shift [B, D]; got x {tuple(x.shape)}, "
                f"scale {tuple(scale_BD.shape)}"
            )
        for key, t in (("shift", shift_BD), ("t_scale", t_scale_BD), ("t_shift", t_shift_BD)):
            if t is not None and t.shape != (B, D):
                raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, expected ({B}, {D})")
    elif t_scale_BD is not None or t_shift_BD is not None:
        raise ValueError(f"{name}: t_scale/t_shift without scale/shift")
    c = contiguous
    y, t_y = LayerNormJVPFunction.apply(
        c(x).view(-1, D), None if t_x is None else c(t_x.to(x.dtype)).view(-1, D), c(weight), c(bias),
        c(scale_BD), c(shift_BD), c(t_scale_BD), c(t_shift_BD), float(eps), B,
    )
    return y.view(x.shape), None if t_y is None else t_y.view(x.shape)
