"""Attention JVP: input validation and the pure-PyTorch reference path (rcm_math.md section 9).

Shape legend (layout "sbhd", Megatron's order; "bshd" swaps the first two axes):
    q, t_q: [Sq, B, H, Dqk]    k, t_k: [Skv, B, H, Dqk]    v, t_v: [Skv, B, H, Dv]
    o, t_o: [Sq, B, H, Dv]     lse, t_lse: [B, H, Sq] float32

This module needs no Triton: it is the one PyTorch reference attention. The model's PyTorch path
(``megatron_rcm/ops/attention.py``) calls ``attention_jvp_torch``, ring attention's PyTorch chunks
(``megatron_rcm/ops/attention_chunks.py``) call ``attention_jvp_bhsd``, and the Triton path
(``attention_jvp.py``) shares its checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LAYOUTS = ("sbhd", "bshd")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class AttnDims(NamedTuple):
    batch: int
    heads: int
    seqlen_q: int
    seqlen_kv: int
    head_dim_qk: int
    head_dim_v: int
    softmax_scale: float
    has_t_kv: bool


def _bshd(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, S, H, D) of a tensor given in ``layout``."""
    if layout == "sbhd":
        s, b, h, d = x.shape
    else:
        b, s, h, d = x.shape
    return b, s, h, d


def check_inputs(q, k, v, t_q, t_k, t_v, softmax_scale, layout, dtypes=DTYPES) -> AttnDims:
    """Validate shapes, dtypes, devices and layout; raise ValueError naming what does not match."""
    if layout not in LAYOUTS:
        raise ValueError(f"attention_jvp: layout must be one of {LAYOUTS}, got {layout!r}")
    if (t_k is None) != (t_v is None):
        raise ValueError(
            "attention_jvp: t_k and t_v must be both None (constant K/V, the fast path) or both tensors; "
            f"got t_k={'None' if t_k is None else 'tensor'}, t_v={'None' if t_v is None else 'tensor'}"
        )
    named = {"q": q, "k": k, "v": v, "t_q": t_q}
    if t_k is not None:
        named.update(t_k=t_k, t_v=t_v)
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"attention_jvp: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"attention_jvp: {name} must be 4-D in layout {layout!r}, got shape {tuple(x.shape)}"
            )
        if x.dtype != q.dtype:
            raise ValueError(f"attention_jvp: {name} has dtype {x.dtype}, q has {q.dtype}; all must match")
        if x.device != q.device:
            raise ValueError(f"attention_jvp: {name} is on {x.device}, q is on {q.device}")
    if q.dtype not in dtypes:
        raise ValueError(f"attention_jvp: dtype must be one of {dtypes}, got {q.dtype}")
    b, sq, h, dqk = _bshd(q, layout)
    bk, skv, hk, dk = _bshd(k, layout)
    bv, sv, hv, dv = _bshd(v, layout)
    if (bk, hk, dk) != (b, h, dqk) or (bv, sv, hv) != (bk, skv, hk):
        raise ValueError(
            f"attention_jvp: shapes do not match in layout {layout!r}: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)} (need the same batch and heads, k with q's head dim, "
            "v with k's sequence length)"
        )
    if t_q.shape != q.shape:
        raise ValueError(f"attention_jvp: t_q has shape {tuple(t_q.shape)}, q has {tuple(q.shape)}")
    if t_k is not None and (t_k.shape != k.shape or t_v.shape != v.shape):
        raise ValueError(
            f"attention_jvp: tangent shapes t_k {tuple(t_k.shape)}, t_v {tuple(t_v.shape)} must equal "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if min(b, h, sq, skv, dqk, dv) == 0:
        raise ValueError(
            f"attention_jvp: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dqk)
    softmax_scale = float(softmax_scale)
    if not (softmax_scale > 0.0 and math.isfinite(softmax_scale)):
        raise ValueError(f"attention_jvp: softmax_scale must be a positive finite number, got {softmax_scale}")
    return AttnDims(b, h, sq, skv, dqk, dv, softmax_scale, t_k is not None)


def _to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(1, 2, 0, 3) if layout == "sbhd" else x.permute(0, 2, 1, 3)


def _from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(2, 0, 1, 3) if layout == "sbhd" else x.permute(0, 2, 1, 3)


def attention_jvp_bhsd(q, k, v, t_q, t_k, t_v, scale: float):
    """The reference math on [B, H, S, d] tensors already in the compute dtype (rcm_math.md section 9).

    Returns (o, t_o, lse, t_lse) in that dtype and layout: o and lse with autograd (differentiable w.r.t.
    q, k, v), t_o and t_lse with no graph; t_q None: no tangent (t_o = t_lse = None). t_k = t_v = None
    with t_q given: constant keys and values.
    """
    # Primal with a graph: S = Q K^T * scale, P = softmax(S), O = P V.
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v)
    lse = torch.logsumexp(s, dim=-1)
    if t_q is None:
        return o, None, lse, None

    # Tangent with no graph: dS = (dQ K^T + Q dK^T) * scale, dLSE = sum_j p_j dS_j.
    with torch.no_grad():
        p_ = p.detach()
        t_s = torch.matmul(t_q, k.detach().transpose(-1, -2))
        if t_k is not None:
            t_s = t_s + torch.matmul(q.detach(), t_k.transpose(-1, -2))
        t_s = t_s * scale
        t_lse = (p_ * t_s).sum(-1)
        t_o = torch.matmul(p_ * (t_s - t_lse[..., None]), v.detach())
        if t_v is not None:
            t_o = t_o + torch.matmul(p_, t_v)
    return o, t_o, lse, t_lse


def attention_jvp_torch(q, k, v, t_q, t_k=None, t_v=None, softmax_scale=None, layout="sbhd", return_lse=False):
    """Reference attention JVP in PyTorch, materializing the softmax (O(Sq * Skv) memory).

    Same signature and outputs as ``attention_jvp``. Computes in float32 for 16-bit inputs (float64
    stays float64), O with autograd (differentiable w.r.t. q, k, v), the tangent t_o, lse and t_lse
    with no graph (rcm_math.md section 9: dO = sum_j p_j (dS_j - dLSE) v_j + sum_j p_j dv_j).
    ``t_q=None`` (with ``t_k = t_v = None``) computes the primal only: t_o and t_lse are None.
    """
    # The checks need a query tangent; with none, q stands in for it (no tangent is computed).
    t_q_checked = q if t_q is None else t_q
    if t_q is None and t_k is not None:
        raise ValueError("attention_jvp_torch: t_k and t_v need t_q (no query tangent means no tangent at all)")
    scale = check_inputs(
        q, k, v, t_q_checked, t_k, t_v, softmax_scale, layout, DTYPES + (torch.float64,)
    ).softmax_scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    to_c = lambda x: None if x is None else _to_bhsd(x, layout).to(cdt)
    o, t_o, lse, t_lse = attention_jvp_bhsd(to_c(q), to_c(k), to_c(v), to_c(t_q), to_c(t_k), to_c(t_v), scale)
    o = _from_bhsd(o, layout).to(q.dtype)
    t_o = None if t_o is None else _from_bhsd(t_o, layout).to(q.dtype)
    if return_lse:
        return o, t_o, lse, t_lse  # float32 (float64 for float64 inputs)
    return o, t_o
