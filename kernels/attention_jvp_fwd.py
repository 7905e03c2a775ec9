"""Attention JVP forward in Triton: O, its tangent dO, LSE and dLSE in one FlashAttention-2 pass.

The math is rcm_math.md section 9. Per query block, the kernel streams key/value tiles and keeps
the online-softmax state of FlashAttention-2 plus the tangent state:

    S = Q K^T * scale,  dS = (dQ K^T + Q dK^T) * scale,  P~ = exp(S - m),  H~ = P~ * dS
    l = sum P~,  acc = sum P~ V (O~),  t_acc = sum P~ dV + H~ V (A~ + B~),  r = sum H~

each rescaled by exp(m_old - m_new) when the running row maximum m grows. Epilogue:
O = acc / l, dLSE = r / l, dO = t_acc / l - dLSE * O, LSE = m + log l.

Online centering (same function, better rounding): the kernel forms H~ = P~ * (dS - c) with c
the running P~-weighted mean of dS, i.e. the running dLSE. Then r = 0 by construction and
dLSE = c; when c moves from c_old to c_new, the accumulated B~ is re-centred exactly in float32
by t_acc += (c_old - c_new) * acc, since sum P~ (dS - c) V shifts by the same multiple of O~.
Formed naively, B~ / l and dLSE * O are large and nearly equal whenever dS has a large common
part (keys with a large mean: dQ . mean(K)) or one key dominates a row (large logits), and the
bf16 rounding of H~ survives their difference. Measured in a float64 emulation of the bf16
kernel (4096 keys, D = 128): the tangent's relative error is 1.6e-3 for plain random inputs with
or without centering, but 8.5e-3 -> 1.2e-3 with q scaled by 30 and 4.3e-3 -> 1.6e-3 with keys
offset by 3 standard deviations.

Six products per tile; with constant K/V (HAS_T_KV=False) dK = dV = 0, so A~ = 0 and
dS = dQ K^T: four products, and the softmax scale of dS moves to the epilogue.

On Hopper the key/value tiles arrive by TMA (host-side tensor descriptors over the
(batch, head, seq, feature) view) where the strides allow it; otherwise, and in the interpreter,
by pointer loads.

Shape legend: every tensor is addressed through (batch, head, sequence, feature) strides, so the
"sbhd" ([s, b, h, d], Megatron) and "bshd" layouts run without copies.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this matches the kernels below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32.

    UPCAST: the Triton interpreter (CPU) multiplies the raw bit patterns of bf16 operands, so bf16
    operands are widened to float32 there; compiled kernels never set it.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr):
    """Load a [rows, cols] tile, zero-filling rows >= n_rows and cols >= N_COLS where asked."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows, n_rows, cols, N_COLS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Store a [rows, cols] tile, skipping rows >= n_rows (and cols >= N_COLS where asked)."""
    if CHECK_COLS:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))
    else:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)


@triton.jit
def _load_kv(desc, ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, cols, HEAD_D: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of a streamed tensor at rows start_n..: TMA (zero-filled past the end) or masked
    pointer loads."""
    if USE_TMA:
        tile = desc.load([off_b.to(tl.int32), off_h.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        tile = _load_tile(ptrs, rows_n, seqlen_kv, cols, HEAD_D, MASK_N, BLOCK_D != HEAD_D)
    return tile


@triton.jit
def _attn_jvp_fwd_tile(
    acc, t_acc, m_i, l_i, c_i, q, t_q,
    k_desc, v_desc, t_k_desc, t_v_desc, k_ptrs, v_ptrs, t_k_ptrs, t_v_ptrs, off_b, off_h, start_n, seqlen_kv,
    offs_n, offs_dqk, offs_dv, softmax_scale, qk_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_T_KV: tl.constexpr, MASK_N: tl.constexpr, USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key/value tile of the JVP forward (rcm_math.md section 9); returns the updated state."""
    rows_n = start_n + offs_n
    k = _load_kv(k_desc, k_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dqk, HEAD_DQK, BLOCK_N, BLOCK_DQK,
                 MASK_N, USE_TMA)
    v = _load_kv(v_desc, v_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dv, HEAD_DV, BLOCK_N, BLOCK_DV,
                 MASK_N, USE_TMA)
    k_t = tl.trans(k)

    # -- scores and their tangent: S = Q K^T, dS = dQ K^T + Q dK^T (both unscaled here)
    s = _dot(q, k_t, None, UPCAST, PRECISION)
    ds = _dot(t_q, k_t, None, UPCAST, PRECISION)
    if HAS_T_KV:
        t_k = _load_kv(t_k_desc, t_k_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dqk, HEAD_DQK, BLOCK_N,
                       BLOCK_DQK, MASK_N, USE_TMA)
        ds = _dot(q, tl.trans(t_k), ds, UPCAST, PRECISION)
    if MASK_N:
        s = tl.where((rows_n < seqlen_kv)[None, :], s, float("-inf"))

    # -- online softmax in the log2 domain: P~ = exp2(S * scale * log2(e) - m); the state so far
    #    is rescaled by alpha = exp2(m_old - m_new)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha
    acc = acc * alpha[:, None]
    t_acc = t_acc * alpha[:, None]
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_new = l_i + tl.sum(p, 1)
    # -- online centering: c = running P~-weighted mean of dS (the running dLSE)
    pd = p * ds
    if HAS_T_KV:  # the scale stays in the loop: P~ dV shares the accumulator
        c_new = (c_i * l_i + tl.sum(pd, 1) * softmax_scale) / l_new
        h = pd * softmax_scale - p * c_new[:, None]  # H~ = P~ * (dS - c)
    else:  # the fast path keeps dS unscaled and applies the scale in the epilogue
        c_new = (c_i * l_i + tl.sum(pd, 1)) / l_new
        h = pd - p * c_new[:, None]
    # -- re-centre B~ from c_old to c_new
    t_acc = t_acc + (c_i - c_new)[:, None] * acc

    # -- O~ += P~ V, A~ + B~ += P~ dV + H~ V
    p_lo = p.to(v.dtype)
    acc = _dot(p_lo, v, acc, UPCAST, PRECISION)
    if HAS_T_KV:
        t_v = _load_kv(t_v_desc, t_v_ptrs, off_b, off_h, start_n, rows_n, seqlen_kv, offs_dv, HEAD_DV, BLOCK_N,
                       BLOCK_DV, MASK_N, USE_TMA)
        t_acc = _dot(p_lo, t_v, t_acc, UPCAST, PRECISION)
    t_acc = _dot(h.to(v.dtype), v, t_acc, UPCAST, PRECISION)
    return acc, t_acc, m_new, l_new, c_new


def tma_block_hook(block: str, descs: tuple[tuple[str, str], ...]):
    """An autotune pre-hook setting each (descriptor, feature-width) pair's block to [1, 1, config[block], width]."""

    def hook(nargs):
        if nargs["USE_TMA"]:
            for name, width in descs:
                nargs[name].block_shape = [1, 1, nargs[block], nargs[width]]

    return hook


_set_tma_blocks = tma_block_hook("BLOCK_N", (("K_DESC", "BLOCK_DQK"), ("V_DESC", "BLOCK_DV"),
                                             ("TK_DESC", "BLOCK_DQK"), ("TV_DESC", "BLOCK_DV")))


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_tma_blocks)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Keep configs whose fp32 state fits the registers and whose K/V stages fit shared memory."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    dqk, dv = args["BLOCK_DQK"], args["BLOCK_DV"]
    n_kv_tiles = 2 if args["HAS_T_KV"] else 1  # (K, V) or (K, V, dK, dV)
    elem = 2  # bf16 / fp16 bytes; fp32 inputs are a checking path, tuned with the same rule

    def regs(c):  # two [BM, Dv] accumulators + S and dS tiles [BM, BN], fp32, per thread
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (2 * bm * dv + 2 * bm * bn) / (32 * c.num_warps)

    def smem(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return c.num_stages * n_kv_tiles * bn * (dqk + dv) * elem + 2 * bm * dqk * elem

    fits = [c for c in configs if smem(c) <= 200 * 1024]
    kept = [
        c for c in fits
        if regs(c) <= 192
        and (c.num_warps == 4 or c.kwargs["BLOCK_M"] == 128)  # one warpgroup per 64 query rows
        and not (c.kwargs["BLOCK_N"] == 32 and dqk <= 64)  # 32-wide key tiles only for wide heads
    ]
    # head dim 256: nothing fits the rule; take the leanest config that fits shared memory
    return kept or [min(fits or configs, key=regs)]


@triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DQK", "HEAD_DV", "HAS_T_KV", "SEQ_BUCKET_Q", "SEQ_BUCKET_KV"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)
@triton.jit
def _attn_jvp_fwd(
    Q, K, V, TQ, TK, TV, Out, TOut, LSE, TLSE, K_DESC, V_DESC, TK_DESC, TV_DESC,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_tqb, stride_tqh, stride_tqs, stride_tqd,
    stride_tkb, stride_tkh, stride_tks, stride_tkd,
    stride_tvb, stride_tvh, stride_tvs, stride_tvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_tob, stride_toh, stride_tos, stride_tod,
    seqlen_q, seqlen_kv, num_heads, softmax_scale,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_T_KV: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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

    # -- prologue: this block's Q and dQ stay on chip; 64-bit offsets go into the base pointers
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qs
              + offs_m[:, None] * stride_qs + offs_dqk[None, :] * stride_qd)
    t_q_ptrs = (TQ + off_b * stride_tqb + off_h * stride_tqh + row0 * stride_tqs
                + offs_m[:, None] * stride_tqs + offs_dqk[None, :] * stride_tqd)
    q = _load_tile(q_ptrs, rows_m, seqlen_q, offs_dqk, HEAD_DQK, True, BLOCK_DQK != HEAD_DQK)
    t_q = _load_tile(t_q_ptrs, rows_m, seqlen_q, offs_dqk, HEAD_DQK, True, BLOCK_DQK != HEAD_DQK)
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh
              + offs_n[:, None] * stride_ks + offs_dqk[None, :] * stride_kd)
    v_ptrs = (V + off_b * stride_vb + off_h * stride_vh
              + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd)
    t_k_ptrs = (TK + off_b * stride_tkb + off_h * stride_tkh
                + offs_n[:, None] * stride_tks + offs_dqk[None, :] * stride_tkd)
    t_v_ptrs = (TV + off_b * stride_tvb + off_h * stride_tvh
                + offs_n[:, None] * stride_tvs + offs_dv[None, :] * stride_tvd)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    t_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e)

    # -- main loop: full key tiles, no masks
    n_full = (seqlen_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, t_acc, m_i, l_i, c_i = _attn_jvp_fwd_tile(
            acc, t_acc, m_i, l_i, c_i, q, t_q, K_DESC, V_DESC, TK_DESC, TV_DESC,
            k_ptrs, v_ptrs, t_k_ptrs, t_v_ptrs, off_b, off_h, start_n, seqlen_kv, offs_n, offs_dqk, offs_dv,
            softmax_scale, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HAS_T_KV, False, USE_TMA,
            UPCAST, PRECISION,
        )
        if not USE_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
            if HAS_T_KV:
                t_k_ptrs += BLOCK_N * stride_tks
                t_v_ptrs += BLOCK_N * stride_tvs
    # -- tail: the last, partial key tile (masked; never empty, so every row max stays finite)
    if n_full < seqlen_kv:
        acc, t_acc, m_i, l_i, c_i = _attn_jvp_fwd_tile(
            acc, t_acc, m_i, l_i, c_i, q, t_q, K_DESC, V_DESC, TK_DESC, TV_DESC,
            k_ptrs, v_ptrs, t_k_ptrs, t_v_ptrs, off_b, off_h, n_full, seqlen_kv, offs_n, offs_dqk, offs_dv,
            softmax_scale, qk_scale, HEAD_DQK, HEAD_DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HAS_T_KV, True, USE_TMA,
            UPCAST, PRECISION,
        )

    # -- epilogue: O = O~/l, dO = (A~ + B~)/l (r = 0: B~ is centred at c = dLSE), LSE = m + log l
    l_rcp = 1.0 / l_i
    o = acc * l_rcp[:, None]
    if HAS_T_KV:
        t_o = t_acc * l_rcp[:, None]
        t_lse = c_i
    else:
        t_o = t_acc * (l_rcp * softmax_scale)[:, None]
        t_lse = c_i * softmax_scale
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln(2): back to natural log

    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + row0 * stride_os
              + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od)
    t_o_ptrs = (TOut + off_b * stride_tob + off_h * stride_toh + row0 * stride_tos
                + offs_m[:, None] * stride_tos + offs_dv[None, :] * stride_tod)
    _store_tile(o_ptrs, o.to(Out.dtype.element_ty), rows_m, seqlen_q, offs_dv, HEAD_DV, BLOCK_DV != HEAD_DV)
    _store_tile(t_o_ptrs, t_o.to(TOut.dtype.element_ty), rows_m, seqlen_q, offs_dv, HEAD_DV,
                BLOCK_DV != HEAD_DV)
    lse_offs = off_bh.to(tl.int64) * seqlen_q + rows_m
    tl.store(LSE + lse_offs, lse, mask=rows_m < seqlen_q)
    tl.store(TLSE + lse_offs, t_lse, mask=rows_m < seqlen_q)


def attn_jvp_fwd_launch(q, k, v, t_q, t_k, t_v, o, t_o, lse, t_lse, dims, q_strides, k_strides, v_strides,
                        t_q_strides, t_k_strides, t_v_strides, o_strides, t_o_strides):
    """Launch the forward; each *_strides is (batch, head, seq, feature) in elements."""
    has_t_kv = t_k is not None
    if not has_t_kv:  # never read: HAS_T_KV=False removes those loads
        t_k, t_v, t_k_strides, t_v_strides = k, v, k_strides, v_strides
    grid = lambda meta: (triton.cdiv(dims.seqlen_q, meta["BLOCK_M"]), dims.batch * dims.heads)
    kv = ((k, k_strides, dims.head_dim_qk), (v, v_strides, dims.head_dim_v),
          (t_k, t_k_strides, dims.head_dim_qk), (t_v, t_v_strides, dims.head_dim_v))
    descs, use_tma = tma_descriptors(kv, dims.batch, dims.heads, dims.seqlen_kv)
    _attn_jvp_fwd[grid](
        q, k, v, t_q, t_k, t_v, o, t_o, lse, t_lse, *descs,
        *q_strides, *k_strides, *v_strides, *t_q_strides, *t_k_strides, *t_v_strides,
        *o_strides, *t_o_strides,
        dims.seqlen_q, dims.seqlen_kv, dims.heads, dims.softmax_scale,
        HEAD_DQK=dims.head_dim_qk, HEAD_DV=dims.head_dim_v,
        BLOCK_DQK=block_dim(dims.head_dim_qk), BLOCK_DV=block_dim(dims.head_dim_v),
        HAS_T_KV=has_t_kv, USE_TMA=use_tma, UPCAST=upcast_dots(q), PRECISION=dot_precision(q),
        SEQ_BUCKET_Q=triton.next_power_of_2(dims.seqlen_q),
        SEQ_BUCKET_KV=triton.next_power_of_2(dims.seqlen_kv),
    )


def tma_ok(x: torch.Tensor, strides) -> bool:
    """Whether TMA can read ``x``: Hopper or newer, not interpreted, 2-byte elements, unit feature stride,
    16-byte aligned base and outer strides (TMA's rules)."""
    if INTERPRET or not x.is_cuda or x.element_size() != 2 or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return strides[3] == 1 and x.data_ptr() % 16 == 0 and all(st * 2 % 16 == 0 for st in strides[:3])


def tma_descriptor(x: torch.Tensor, strides, batch: int, heads: int, seqlen: int, head_dim: int):
    """A 4-D descriptor over a tensor's (batch, head, seq, feature) view; the autotune pre-hook sets the
    block shape of each config."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    shape = [batch, heads, seqlen, head_dim]
    return TensorDescriptor(x, shape, list(strides), [1, 1, 16, block_dim(head_dim)])


def tma_descriptors(tensors, batch: int, heads: int, seqlen: int):
    """(x, strides, head_dim) triples of streamed tensors -> (descriptors, True) when TMA can read every one,
    else (the tensors themselves, False): the kernel then ignores them and uses pointer loads."""
    use_tma = all(tma_ok(x, st) for x, st, _ in tensors)
    if not use_tma:
        return [x for x, _, _ in tensors], False
    return [tma_descriptor(x, st, batch, heads, seqlen, d) for x, st, d in tensors], True


def block_dim(head_dim: int) -> int:
    """Feature tile width: the head dim rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def upcast_dots(x) -> bool:
    return INTERPRET and x.dtype == torch.bfloat16


def dot_precision(x) -> str | None:
    """float32 inputs are a checking path: full-precision products, not tf32."""

    return "ieee" if x.dtype == torch.float32 else None
