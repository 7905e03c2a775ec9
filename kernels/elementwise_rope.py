"""Wan's 3D RoPE on q and k with their tangents, one kernel (``models/wan/rope.py``).

Interleaved channel pairs (x0, x1) = (x[2j], x[2j+1]) rotate by the per-token angle a[s, j]:
    (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a)
The map is linear in x, so the tangent is rotated by the same cos/sin (t_q, t_k in the same program).
Backward (primal only): the transpose of a rotation is the rotation by -a, the same kernel with sin negated.
Math in float32 registers (cos/sin tables float32, as ``apply_rope``), out in the activation dtype.

Legend: q, k [S, B, N, d] (Megatron order), viewed as rows [S * B * N, d] read whole (contiguous, vectorized) and
split into their pairs in registers; cos, sin [S, d/2].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_rcm.kernels.elementwise_common import INTERPRET, check_device, check_same_shape, contiguous

__all__ = ["RopeJVPFunction", "rope_jvp_fused"]


@triton.jit
def _rotate(X, Y, offs, mask, cos, sin, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate a [BLOCK_R, 2 * BLOCK_H] tile of interleaved pairs, read and written as contiguous rows."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_H, 2)))
    y = tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos)
    tl.store(Y + offs, tl.reshape(y, (BLOCK_R, 2 * BLOCK_H)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_jvp(Q, K, TQ, TK, OQ, OK, OTQ, OTK, COS, SIN, ROWS, BN, H, SIGN: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, HAS_T: tl.constexpr):
    """Program i: rows [i * BLOCK_R, (i+1) * BLOCK_R) of the [S * B * N, d] view (row r is token r // BN), all
    d = 2H channels of each row, so every load and store is a contiguous row segment."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = r // BN
    j = tl.arange(0, BLOCK_H)  # pair index
    c = tl.arange(0, 2 * BLOCK_H)  # channel index
    pair_mask = (r[:, None] < ROWS) & (j[None, :] < H)
    cos = tl.load(COS + s[:, None] * H + j[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    sin = SIGN * tl.load(SIN + s[:, None] * H + j[None, :], mask=pair_mask, other=0.0).to(tl.float32)
    offs = r[:, None] * (2 * H) + c[None, :]
    mask = (r[:, None] < ROWS) & (c[None, :] < 2 * H)
    # -- primal q, k
    _rotate(Q, OQ, offs, mask, cos, sin, BLOCK_R, BLOCK_H)
    _rotate(K, OK, offs, mask, cos, sin, BLOCK_R, BLOCK_H)
    # -- tangent, same rotation
    if HAS_T:
        _rotate(TQ, OTQ, offs, mask, cos, sin, BLOCK_R, BLOCK_H)
        _rotate(TK, OTK, offs, mask, cos, sin, BLOCK_R, BLOCK_H)


def _launch(q, k, t_q, t_k, cos, sin, sign: float):
    S, B, N, d = q.shape
    H = d // 2
    BLOCK_H = triton.next_power_of_2(H)
    rows = S * B * N
    BLOCK_R = min(triton.next_power_of_2(rows), max(1, 4096 // (2 * BLOCK_H)))
    outs = [torch.empty_like(q), torch.empty_like(k)]
    outs += [torch.empty_like(q), torch.empty_like(k)] if t_q is not None else [None, None]
    _rope_jvp[(triton.cdiv(rows, BLOCK_R),)](
        q, k, t_q, t_k, *outs, cos, sin, rows, B * N, H, SIGN=sign, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H,
        HAS_T=t_q is not None, num_warps=1 if INTERPRET else 8,
    )
    return outs


class RopeJVPFunction(torch.autograd.Function):
    """(q', k', t_q', t_k'); gradients flow from q', k' to q, k. Inputs contiguous, cos/sin [S, d/2] float32."""

    @staticmethod
    def forward(ctx, q, k, t_q, t_k, cos, sin):
        oq, ok, otq, otk = _launch(q, k, t_q, t_k, cos, sin, 1.0)
        ctx.save_for_backward(cos, sin)
        if otq is not None:
            ctx.mark_non_differentiable(otq, otk)
        return oq, ok, otq, otk

    @staticmethod
    def backward(ctx, g_q, g_k, _g_tq, _g_tk):
        cos, sin = ctx.saved_tensors
        g_q = torch.zeros_like(g_k) if g_q is None else g_q.contiguous()
        g_k = torch.zeros_like(g_q) if g_k is None else g_k.contiguous()
        dq, dk, _, _ = _launch(g_q, g_k, None, None, cos, sin, -1.0)
        return dq, dk, None, None, None, None


def rope_jvp_fused(q_SBNd, k_SBNd, t_q, t_k, cos, sin):
    """RoPE of q and k (and of their tangents, both given or both None) by cos/sin [S, 1, 1, d/2] (or
    [S, d/2]); returns (q, k, t_q, t_k) in q's dtype."""
    name = "rope_jvp_fused"
    check_device(name, q_SBNd, k_SBNd)
    check_same_shape(name, q_SBNd, k=k_SBNd, t_q=t_q, t_k=t_k)
    if (t_q is None) != (t_k is None):
        raise ValueError(f"{name}: t_q and t_k must both be given or both be None")
    if q_SBNd.dim() != 4 or q_SBNd.shape[-1] % 2:
        raise ValueError(f"{name}: expected q, k [S, B, N, d] with even d, got {tuple(q_SBNd.shape)}")
    S, d = q_SBNd.shape[0], q_SBNd.shape[-1]
    if cos.numel() != S * d // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"{name}: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not hold [S={S}, d/2={d // 2}] angles"
        )
    c = contiguous
    cos, sin = (c(t.reshape(S, d // 2).to(torch.float32)) for t in (cos, sin))
    return RopeJVPFunction.apply(c(q_SBNd), c(k_SBNd), c(t_q), c(t_k), cos, sin)
