"""Backward of attention's primal output O = softmax(Q K^T * scale) V in Triton (FlashAttention-2).

Reuses the LSE saved by the JVP forward (rcm_math.md section 9), so P = exp(S - LSE) is rebuilt
tile by tile with no second online softmax:

    Delta = rowsum(dO * O) - dLSE      (dLSE: incoming gradient of LSE; zero when LSE is unused)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dK = dS^T Q * scale,  dQ = dS K * scale

Two kernels, no atomics: ``_attn_bwd_dkdv`` owns a key block and streams the queries (four
products per tile); ``_attn_bwd_dq`` owns a query block and streams the keys (three products).
Tensors are addressed through (batch, head, sequence, feature) strides, as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_rcm.kernels.attention_jvp_fwd import (
    INTERPRET,
    _dot,
    _load_kv,
    _load_tile,
    _store_tile,
    block_dim,
    dot_precision,
    tma_block_hook,
    tma_descriptors,
    upcast_dots,
)


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    seqlen_q, num_heads,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dLSE, float32 [B, H, Sq]."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    rows_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row0 = (start_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    o = _load_tile(Out + off_b * stride_ob + off_h * stride_oh + row0 * stride_os
                   + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od,
                   rows_m, seqlen_q, offs_dv, HEAD_DV, True, BLOCK_DV != HEAD_DV)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_dos
                    + offs_m[:, None] * stride_dos + offs_dv[None, :] * stride_dod,
                    rows_m, seqlen_q, offs_dv, HEAD_DV, True, BLOCK_DV != HEAD_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs = off_bh.to(tl.int64) * seqlen_q + rows_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs, mask=rows_m < seqlen_q, other=0.0)
    tl.store(DELTA + offs, delta, mask=rows_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_tile(
    dk, dv, k, v, q_desc, do_desc, q_ptrs, do_ptrs, off_b, off_h, start_m, LSE, DELTA, rows_m, seqlen_q,
    offs_dqk, offs_dv, qk_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query tile for a key block: dV += P^T dO, dK += dS^T Q (scale applied by the caller)."""
    q = _load_kv(q_desc, q_ptrs, off_b, off_h, start_m, rows_m, seqlen_q, offs_dqk, HEAD_DQK, BLOCK_M, BLOCK_DQK,
                 MASK_M, USE_TMA)
    do = _load_kv(do_desc, do_ptrs, off_b, off_h, start_m, rows_m, seqlen_q, offs_dv, HEAD_DV, BLOCK_M, BLOCK_DV,
                  MASK_M, USE_TMA)
    if MASK_M:
        lse = tl.load(LSE + rows_m, mask=rows_m < seqlen_q, other=0.0)
        delta = tl.load(DELTA + rows_m, mask=rows_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(LSE + rows_m)
        delta = tl.load(DELTA + rows_m)
    # -- P^T = exp(S^T - LSE), rebuilt from the saved log-sum-exp (log2 domain)
    qk_t = _dot(k, tl.trans(q), None, UPCAST, PRECISION)
    p_t = tl.math.exp2(qk_t * qk_scale - (lse * 1.4426950408889634)[None, :])
    if MASK_M:
        p_t = tl.where((rows_m < seqlen_q)[None, :], p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)
    # -- dS^T = P^T * (dP^T - Delta), dP^T = V dO^T
    dp_t = _dot(v, tl.trans(do), None, UPCAST, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dq_tile(
    dq, q, do, lse2, delta, k_desc, v_desc, k_ptrs, v_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dqk,
    offs_dv, qk_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile for a query block: dQ += dS K (scale applied by the caller)."""
    k = _load_kv(k_desc, k_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dqk, HEAD_DQK, BLOCK_N, BLOCK_DQK,
                 MASK_N, USE_TMA)
    v = _load_kv(v_desc, v_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dv, HEAD_DV, BLOCK_N, BLOCK_DV,
                 MASK_N, USE_TMA)
    qk = _dot(q, tl.trans(k), None, UPCAST, PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where((rows_n < seqlen_kv)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), None, UPCAST, PRECISION)
    ds = p * (dp - delta[:, None])
    dq = _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)
    return dq


def _bwd_configs(rows, cols, pre_hook):
    """rows: the block a program owns; cols: the block it streams (by TMA where pre_hook's descriptors allow)."""
    if INTERPRET:
        return [triton.Config({rows: 16, cols: 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({rows: br, cols: bc}, num_warps=w, num_stages=s, pre_hook=pre_hook)
        for br in (64, 128)
        for bc in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _make_prune(rows, cols, n_acc_dims):
    def prune(configs, named_args, **kwargs):
        """Keep configs whose fp32 accumulators and score tiles fit the registers."""
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}
        dqk, dv = args["BLOCK_DQK"], args["BLOCK_DV"]
        acc_cols = dqk + (dv if n_acc_dims == 2 else 0)

        def regs(c):  # fp32 accumulators [rows, acc_cols] + two score tiles [rows, cols], per thread
            br, bc = c.kwargs[rows], c.kwargs[cols]
            return (br * acc_cols + 2 * br * bc) / (32 * c.num_warps)

        def smem(c):
            br, bc = c.kwargs[rows], c.kwargs[cols]
            return (c.num_stages * bc + br) * (dqk + dv) * 2

        fits = [c for c in configs if smem(c) <= 200 * 1024]
        kept = [
            c for c in fits
            if regs(c) <= 192
            and (c.num_warps == 4 or c.kwargs[rows] == 128)
            and not (c.kwargs[cols] == 32 and dqk <= 64)  # 32-wide tiles only pay off for wide heads
        ]
        return kept or [min(fits or configs, key=regs)]

    return prune


_BWD_KEY = ["HEAD_DQK", "HEAD_DV", "SEQ_BUCKET_Q", "SEQ_BUCKET_KV"]


@triton.autotune(
    configs=_bwd_configs("BLOCK_N", "BLOCK_M",
                         tma_block_hook("BLOCK_M", (("Q_DESC", "BLOCK_DQK"), ("DO_DESC", "BLOCK_DV")))),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _make_prune("BLOCK_N", "BLOCK_M", 2)},
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_DESC, DO_DESC,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    seqlen_q, seqlen_kv, num_heads, softmax_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SEQ_BUCKET_Q, SEQ_BUCKET_KV,  # autotune key only: powers of two, so they do not recompile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    row0 = (start_n * BLOCK_N).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_n = start_n * BLOCK_N + offs_n

    # -- prologue: this key block's K and V stay on chip
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh + row0 * stride_ks
              + offs_n[:, None] * stride_ks + offs_dqk[None, :] * stride_kd)
    v_ptrs = (V + off_b * stride_vb + off_h * stride_vh + row0 * stride_vs
              + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd)
    k = _load_tile(k_ptrs, rows_n, seqlen_kv, offs_dqk, HEAD_DQK, True, BLOCK_DQK != HEAD_DQK)
    v = _load_tile(v_ptrs, rows_n, seqlen_kv, offs_dv, HEAD_DV, True, BLOCK_DV != HEAD_DV)
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qs + offs_dqk[None, :] * stride_qd)
    do_ptrs = (DO + off_b * stride_dob + off_h * stride_doh
               + offs_m[:, None] * stride_dos + offs_dv[None, :] * stride_dod)
    LSE += off_bh.to(tl.int64) * seqlen_q
    DELTA += off_bh.to(tl.int64) * seqlen_q
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e)

    # -- main loop over full query tiles, then the masked tail tile
    m_full = (seqlen_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_tile(
            dk, dv, k, v, Q_DESC, DO_DESC, q_ptrs, do_ptrs, off_b, off_h, start_m, LSE, DELTA, start_m + offs_m,
            seqlen_q, offs_dqk, offs_dv, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, False, USE_TMA,
            UPCAST, PRECISION,
        )
        if not USE_TMA:
            q_ptrs += BLOCK_M * stride_qs
            do_ptrs += BLOCK_M * stride_dos
    if m_full < seqlen_q:
        dk, dv = _attn_bwd_dkdv_tile(
            dk, dv, k, v, Q_DESC, DO_DESC, q_ptrs, do_ptrs, off_b, off_h, m_full, LSE, DELTA, m_full + offs_m,
            seqlen_q, offs_dqk, offs_dv, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, True, USE_TMA,
            UPCAST, PRECISION,
        )

    # -- epilogue: dK carries the softmax scale of S
    dk *= softmax_scale
    dk_ptrs = (DK + off_b * stride_dkb + off_h * stride_dkh + row0 * stride_dks
               + offs_n[:, None] * stride_dks + offs_dqk[None, :] * stride_dkd)
    dv_ptrs = (DV + off_b * stride_dvb + off_h * stride_dvh + row0 * stride_dvs
               + offs_n[:, None] * stride_dvs + offs_dv[None, :] * stride_dvd)
    _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), rows_n, seqlen_kv, offs_dqk, HEAD_DQK,
                BLOCK_DQK != HEAD_DQK)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), rows_n, seqlen_kv, offs_dv, HEAD_DV,
                BLOCK_DV != HEAD_DV)


@triton.autotune(
    configs=_bwd_configs("BLOCK_M", "BLOCK_N",
                         tma_block_hook("BLOCK_N", (("K_DESC", "BLOCK_DQK"), ("V_DESC", "BLOCK_DV")))),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _make_prune("BLOCK_M", "BLOCK_N", 1)},
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    seqlen_q, seqlen_kv, num_heads, softmax_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SEQ_BUCKET_Q, SEQ_BUCKET_KV,  # autotune key only: powers of two, so they do not recompile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    row0 = (start_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_m = start_m * BLOCK_M + offs_m

    # -- prologue: this query block's Q, dO, LSE and Delta stay on chip
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qs
                   + offs_m[:, None] * stride_qs + offs_dqk[None, :] * stride_qd,
                   rows_m, seqlen_q, offs_dqk, HEAD_DQK, True, BLOCK_DQK != HEAD_DQK)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_dos
                    + offs_m[:, None] * stride_dos + offs_dv[None, :] * stride_dod,
                    rows_m, seqlen_q, offs_dv, HEAD_DV, True, BLOCK_DV != HEAD_DV)
    stat_offs = off_bh.to(tl.int64) * seqlen_q + rows_m
    lse2 = tl.load(LSE + stat_offs, mask=rows_m < seqlen_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_offs, mask=rows_m < seqlen_q, other=0.0)
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh
              + offs_n[:, None] * stride_ks + offs_dqk[None, :] * stride_kd)
    v_ptrs = (V + off_b * stride_vb + off_h * stride_vh
              + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e)

    # -- main loop over full key tiles, then the masked tail tile
    n_full = (seqlen_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_tile(
            dq, q, do, lse2, delta, K_DESC, V_DESC, k_ptrs, v_ptrs, off_b, off_h, start_n, start_n + offs_n,
            seqlen_kv, offs_dqk, offs_dv, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, False, USE_TMA,
            UPCAST, PRECISION,
        )
        if not USE_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    if n_full < seqlen_kv:
        dq = _attn_bwd_dq_tile(
            dq, q, do, lse2, delta, K_DESC, V_DESC, k_ptrs, v_ptrs, off_b, off_h, n_full, n_full + offs_n,
            seqlen_kv, offs_dqk, offs_dv, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, True, USE_TMA,
            UPCAST, PRECISION,
        )

    # -- epilogue: dQ carries the softmax scale of S
    dq *= softmax_scale
    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqs
               + offs_m[:, None] * stride_dqs + offs_dqk[None, :] * stride_dqd)
    _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), rows_m, seqlen_q, offs_dqk, HEAD_DQK,
                BLOCK_DQK != HEAD_DQK)


def attn_bwd_launch(q, k, v, o, do, lse, dlse, dq, dk, dv, dims, strides):
    """Launch the backward. ``strides`` maps each tensor name to its (batch, head, seq, feature) strides."""
    bh = dims.batch * dims.heads
    delta = torch.empty_like(lse)
    pre_block = 16 if INTERPRET else 64
    block_dqk, block_dv = block_dim(dims.head_dim_qk), block_dim(dims.head_dim_v)
    _attn_bwd_preprocess[(triton.cdiv(dims.seqlen_q, pre_block), bh)](
        o, do, dlse if dlse is not None else lse, delta, *strides["o"], *strides["do"],
        dims.seqlen_q, dims.heads,
        HEAD_DV=dims.head_dim_v, BLOCK_DV=block_dv, HAS_DLSE=dlse is not None, BLOCK_M=pre_block,
    )
    meta = dict(
        HEAD_DQK=dims.head_dim_qk, HEAD_DV=dims.head_dim_v, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        UPCAST=upcast_dots(q), PRECISION=dot_precision(q),
        SEQ_BUCKET_Q=triton.next_power_of_2(dims.seqlen_q),
        SEQ_BUCKET_KV=triton.next_power_of_2(dims.seqlen_kv),
    )
    sizes = (dims.seqlen_q, dims.seqlen_kv, dims.heads, dims.softmax_scale)
    # the streamed tiles by TMA where every one of them allows it
    qdo, tma_q = tma_descriptors(((q, strides["q"], dims.head_dim_qk), (do, strides["do"], dims.head_dim_v)),
                                 dims.batch, dims.heads, dims.seqlen_q)
    _attn_bwd_dkdv[lambda m: (triton.cdiv(dims.seqlen_kv, m["BLOCK_N"]), bh)](
        q, k, v, do, lse, delta, dk, dv, *qdo,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"], *strides["dk"], *strides["dv"],
        *sizes, USE_TMA=tma_q, **meta,
    )
    kv, tma_kv = tma_descriptors(((k, strides["k"], dims.head_dim_qk), (v, strides["v"], dims.head_dim_v)),
                                 dims.batch, dims.heads, dims.seqlen_kv)
    _attn_bwd_dq[lambda m: (triton.cdiv(dims.seqlen_q, m["BLOCK_M"]), bh)](
        q, k, v, do, lse, delta, dq, *kv,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"], *strides["dq"],
        *sizes, USE_TMA=tma_kv, **meta,
    )
