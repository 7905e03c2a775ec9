"""Gated residual, primal and tangent in one kernel (the adaLN gate of the Wan block).

    x_out = x + gate * y                              gate [B, D] per sample, x, y [s, B, D]
    t_out = t_x + t_gate * y + gate * t_y             (product rule; any tangent may be None = zero)
Backward (primal only), g = dL/dx_out:  dx = g,  dy = g * gate,  dgate[b] = sum_s g * y.
Math in float32 registers (as the block's ``(x.to(f32) + y.to(f32) * gate).to(bf16)``), out in x's dtype.
With the bias b [D] of the linear before it fused (attention out / fc2, ``skip_bias_add``: Megatron's
bias-dropout-add fusion without dropout), y is replaced by y + b (float32, in registers; b has no tangent):
    x_out = x + gate * (y + b),   t_out = t_x + t_gate * (y + b) + gate * t_y
    dgate[b] = sum_s g * (y + b),   db = sum_rows g * gate   (float32 partials per (chunk, sample), one sum)

Legend: rows r = s * B + b of the [s * B, D] view; a row's sample is r % B.
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

__all__ = ["GatedResidualJVPFunction", "gated_residual_jvp_fused"]


# --------------------------------------------------------------------------- forward: primal + tangent
@triton.jit
def _gate_jvp_fwd(X, Y, GATE, BIAS, TX, TY, T_GATE, OUT, T_OUT, B, D, BLOCK_D: tl.constexpr, HAS_TX: tl.constexpr,
                  HAS_TY: tl.constexpr, HAS_TGATE: tl.constexpr, HAS_T: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + gate * y
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    if HAS_T:
        t_out = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_TX:
            t_out += tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_TGATE:
            t_out += tl.load(T_GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32) * y
        if HAS_TY:
            t_out += gate * tl.load(TY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(T_OUT + offs, t_out.to(T_OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward: primal only
@triton.jit
def _gate_bwd(G, Y, GATE, BIAS, DY, P, PB, S, B, D, ROWS_PER, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (c, b): tokens [c * ROWS_PER, (c+1) * ROWS_PER) of sample b; dgate partials to P [chunks, B, D],
    with a bias its db partials to PB [chunks, B, D]."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(c * ROWS_PER, tl.minimum((c + 1) * ROWS_PER, S)):
        offs = (s * B + b).to(tl.int64) * D + cols
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * (tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32) + bias)
        dy = g * gate
        acc_b += dy
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)
    tl.store(P + (c * B + b).to(tl.int64) * D + cols, acc, mask=mask)
    if HAS_BIAS:
        tl.store(PB + (c * B + b).to(tl.int64) * D + cols, acc_b, mask=mask)


# --------------------------------------------------------------------------- autograd wrapper
class GatedResidualJVPFunction(torch.autograd.Function):
    """(x_out, t_out); gradients flow from x_out to x, y, gate (and the bias). x, y [R, D] contiguous, gate
    [B, D], bias [D] or None."""

    @staticmethod
    def forward(ctx, x, y, gate, t_x, t_y, t_gate, B: int, bias=None):
        R, D = x.shape
        out = torch.empty_like(x)
        has_t = t_x is not None or t_y is not None or t_gate is not None
        t_out = torch.empty_like(x) if has_t else None
        BLOCK = block_d(D)
        _gate_jvp_fwd[(R,)](
            x, y, gate, bias, t_x, t_y, t_gate, out, t_out, B, D, BLOCK_D=BLOCK, HAS_TX=t_x is not None,
            HAS_TY=t_y is not None, HAS_TGATE=t_gate is not None, HAS_T=has_t, HAS_BIAS=bias is not None,
            num_warps=num_warps_for(BLOCK),
        )
        ctx.save_for_backward(y, gate, bias)
        ctx.B, ctx.x_dtype = B, x.dtype
        if t_out is not None:
            ctx.mark_non_differentiable(t_out)
        return out, t_out

    @staticmethod
    def backward(ctx, g, _g_t_out):
        y, gate, bias = ctx.saved_tensors
        B = ctx.B
        R, D = y.shape
        per, chunks = row_chunks(R // B)
        g = g.contiguous()
        dy = torch.empty_like(y)
        p = torch.empty(chunks, B, D, device=y.device, dtype=torch.float32)
        BLOCK = block_d(D)
        pb = None if bias is None else torch.empty_like(p)
        _gate_bwd[(chunks, B)](g, y, gate, bias, dy, p, pb, R // B, B, D, per, BLOCK_D=BLOCK,
                               HAS_BIAS=bias is not None, num_warps=num_warps_for(BLOCK))
        db = None if bias is None else pb.sum((0, 1)).to(bias.dtype)
        return g.to(ctx.x_dtype), dy, p.sum(0).to(gate.dtype), None, None, None, None, db


def gated_residual_jvp_fused(x, t_x, y, t_y, gate_BD, t_gate_BD, bias=None):
    """x + gate * (y [+ bias]) and its tangent, x, y [s, B, D], gate [B, D], bias [D]; out in x's dtype (t_out
    None when every tangent is None)."""
    name = "gated_residual_jvp_fused"
    check_device(name, x, y, gate_BD, bias)
    check_same_shape(name, x, y=y, t_x=t_x, t_y=t_y)
    check_bias(name, x, bias)
    if x.dim() != 3 or gate_BD.shape != (x.shape[1], x.shape[2]):
        raise ValueError(
            f"{name}: expected x [s, B, D] and gate [B, D]; got x {tuple(x.shape)}, gate {tuple(gate_BD.shape)}"
        )
    check_same_shape(name, gate_BD, t_gate=t_gate_BD)
    D, B = x.shape[-1], x.shape[1]
    flat = lambda t: None if t is None else contiguous(t).view(-1, D)
    out, t_out = GatedResidualJVPFunction.apply(
        flat(x), flat(y), contiguous(gate_BD), flat(t_x), flat(t_y), contiguous(t_gate_BD), B, contiguous(bias)
    )
    return out.view(x.shape), None if t_out is None else t_out.view(x.shape)
