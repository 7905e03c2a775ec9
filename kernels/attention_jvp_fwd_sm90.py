"""Attention JVP forward for Hopper (sm_90) in Gluon: the math of ``attention_jvp_fwd.py``, with the
value products of one key tile overlapping the element-wise work of the next.

Triton waits for every wgmma before the next instruction that is not a wgmma, so in
``attention_jvp_fwd.py`` the exp2 / centring / rescale work of a tile and its six products run one
after the other. Gluon (Triton's explicit-layout dialect) exposes the asynchronous wgmma and its
wait, so this kernel software-pipelines the key loop (FlashAttention-3's intra-warpgroup overlap):

    iteration i:  issue  S_i = Q K_i^T,  dS_i = dQ K_i^T + Q dK_i^T                          (async)
                  issue  O~ += P~_{i-1} V_{i-1},  A~+B~ += P~_{i-1} dV_{i-1} + H~_{i-1} V_{i-1}   (async)
                  wait for S_i, dS_i only; online softmax and centred tangent weights of tile i
                  (rcm_math.md section 9) while the value products of tile i-1 run
                  wait for the value products; rescale / re-centre the accumulators for tile i

P~ and H~ stay in registers as the A operands of the value products. Measured on an H200
(``docs/benchmarks.md``), the overlap is smaller than the schedule suggests: at 255 registers per
thread ptxas reuses the registers of the in-flight P~/H~ operands for the next tile's exp2 values,
which forces the value-product wait ahead of that work. A variant with P~/H~ in shared memory keeps
the exp2 work ahead of the wait (with alpha routed through the row sum, ``where(l > 0, alpha, 0)``,
so the accumulators depend on the whole softmax) but moves 80 KB more through shared memory per
tile and ran slower (40.0 vs 38.3 ms at B1 H12 S32760). The gain over the Triton kernel is
1-4%; what remains is shared-memory bandwidth (every N=64 score product reads both operands from
shared memory) and the CTA-wide barrier Triton puts before each TMA copy, which keeps the two
warpgroups in lockstep.
Key/value tiles stream by TMA through two-deep rings, (K, dK) and (V, dV), each
refilled as soon as both warpgroups are done with it. Scope: Hopper, bf16/fp16, Dqk = Dv in
(64, 128), tangents for K and V (the six-product path); everything else runs ``attention_jvp_fwd.py``.

Tensors are read through 2-D TMA descriptors over a (row, column) view of each 4-D tensor:
row = b * row_b + s, column = b * col_b + h * col_h + d (``plan_2d``): Megatron's [s, b, h, d]
(and slices of a fused projection) as row_b = 0, bshd [b, s, h, d] as row_b = S. Rows past the end
are zero-filled by TMA (seq-major) or belong to the next batch (batch-major); either way they are
finite and masked out of the softmax.

Shape legend: BLOCK_M query rows per program (two warpgroups of 64), BLOCK_N keys per tile, HEAD_D.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernel serves every case
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BLOCK_M, BLOCK_N, NUM_WARPS = 128, 64, 8


def plan_2d(x: torch.Tensor, strides, batch: int, heads: int, seqlen: int, head_dim: int):
    """(row_b, col_b, col_h, n_rows, n_cols) of the 2-D view of a tensor with (batch, head, seq, feature)
    ``strides``, or None when no 2-D view exists (then the Triton kernel runs)."""
    sb, sh, ss, sd = strides
    if sd != 1 or x.element_size() != 2 or x.data_ptr() % 16 or ss * 2 % 16 or sh * 2 % 16 or sb * 2 % 16:
        return None
    if sh < head_dim:
        return None
    span_h = (heads - 1) * sh + head_dim
    span_bh = (batch - 1) * sb + span_h
    if span_bh <= ss:  # seq-major: all of (b, h, d) inside one row
        return 0, sb, sh, seqlen, min(span_bh, ss)
    if sb == seqlen * ss and span_h <= ss:  # batch-major: row = b * S + s
        return seqlen, 0, sh, batch * seqlen, span_h
    return None


if HAVE_GLUON:

    @gluon.jit
    def _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale):
        """Online softmax of one tile and its centred tangent weights (rcm_math.md section 9):
        P~ = exp2(S * scale * log2 e - m), H~ = P~ * (dS * scale - c) with c the running dLSE."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_new = l_i + gl.sum(p, 1)
        pd = p * ds
        c_new = (c_i * l_i + gl.sum(pd, 1) * softmax_scale) / l_new
        h = pd * softmax_scale - p * gl.expand_dims(c_new, 1)
        return p, h, alpha, m_new, l_new, c_new

    @gluon.jit
    def _mask_tail(s, start_n, seqlen_kv, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        return gl.where(gl.expand_dims(cols < seqlen_kv, 0), s, float("-inf"))

    @gluon.jit
    def _attn_jvp_fwd_sm90(
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc,
        Out, TOut, LSE, TLSE,
        stride_ob, stride_oh, stride_os, stride_tob, stride_toh, stride_tos,
        q_rb, q_cb, q_ch, tq_rb, tq_cb, tq_ch, k_rb, k_cb, k_ch, tk_rb, tk_cb, tk_ch,
        v_rb, v_cb, v_ch, tv_rb, tv_cb, tv_ch,
        seqlen_q, seqlen_kv, num_heads, softmax_scale,
        HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        p_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

        start_m = gl.program_id(0)
        off_bh = gl.program_id(1)
        off_b = off_bh // num_heads
        off_h = off_bh % num_heads
        q_row = off_b * q_rb + start_m * BLOCK_M
        tq_row = off_b * tq_rb + start_m * BLOCK_M
        k_row0, tk_row0 = off_b * k_rb, off_b * tk_rb
        v_row0, tv_row0 = off_b * v_rb, off_b * tv_rb
        q_col, tq_col = off_b * q_cb + off_h * q_ch, off_b * tq_cb + off_h * tq_ch
        k_col, tk_col = off_b * k_cb + off_h * k_ch, off_b * tk_cb + off_h * tk_ch
        v_col, tv_col = off_b * v_cb + off_h * v_ch, off_b * tv_cb + off_h * tv_ch

        # -- shared memory: Q, dQ; two-deep rings for (K, dK) and (V, dV)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
        tq_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], tq_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], k_desc.layout)
        tk_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], tk_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], v_desc.layout)
        tv_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], tv_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for j in gl.static_range(2):
            mbarrier.init(k_bar.index(j), count=1)
            mbarrier.init(v_bar.index(j), count=1)
        fence_async_shared()

        kv_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_D * dtype.primitive_bitwidth // 8
        n_tiles = gl.cdiv(seqlen_kv, BLOCK_N)

        # -- prologue: Q, dQ and the first two tiles of each ring
        mbarrier.expect(q_bar, 2 * BLOCK_M * HEAD_D * dtype.primitive_bitwidth // 8)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
        tma.async_copy_global_to_shared(tq_desc, [tq_row, tq_col], q_bar, tq_smem)
        for j in gl.static_range(2):
            ok = j < n_tiles
            mbarrier.expect(k_bar.index(j), kv_bytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [k_row0 + j * BLOCK_N, k_col], k_bar.index(j), k_smem.index(j),
                                            pred=ok)
            tma.async_copy_global_to_shared(tk_desc, [tk_row0 + j * BLOCK_N, tk_col], k_bar.index(j),
                                            tk_smem.index(j), pred=ok)
            mbarrier.expect(v_bar.index(j), kv_bytes, pred=ok)
            tma.async_copy_global_to_shared(v_desc, [v_row0 + j * BLOCK_N, v_col], v_bar.index(j), v_smem.index(j),
                                            pred=ok)
            tma.async_copy_global_to_shared(tv_desc, [tv_row0 + j * BLOCK_N, tv_col], v_bar.index(j),
                                            tv_smem.index(j), pred=ok)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        c_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        t_acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        qk_scale = softmax_scale * 1.4426950408889634  # log2(e)

        # -- tile 0: scores and softmax; P~, H~ become the register A operands of its value products
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0)
        k_t = k_smem.index(0).permute((1, 0))
        s = warpgroup_mma(q_smem, k_t, zero_s, use_acc=False, is_async=True)
        ds = warpgroup_mma(tq_smem, k_t, zero_s, use_acc=False, is_async=True)
        ds = warpgroup_mma(q_smem, tk_smem.index(0).permute((1, 0)), ds, is_async=True)
        s, ds = warpgroup_mma_wait(0, deps=(s, ds))
        if n_tiles == 1:
            s = _mask_tail(s, 0, seqlen_kv, BLOCK_N, s_layout)
        p, h, alpha, m_i, l_i, c_i = _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale)
        p_op = gl.convert_layout(p.to(dtype), p_op_layout)
        h_op = gl.convert_layout(h.to(dtype), p_op_layout)
        gl.thread_barrier()
        # (K, dK) slot 0 is free: tile 2 goes there
        ok = n_tiles > 2
        mbarrier.expect(k_bar.index(0), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [k_row0 + 2 * BLOCK_N, k_col], k_bar.index(0), k_smem.index(0),
                                        pred=ok)
        tma.async_copy_global_to_shared(tk_desc, [tk_row0 + 2 * BLOCK_N, tk_col], k_bar.index(0), tk_smem.index(0),
                                        pred=ok)

        # -- steady state: tile i's scores and tile i-1's value products in flight together
        for i in range(1, n_tiles):
            slot = i % 2
            prev = 1 - slot
            mbarrier.wait(k_bar.index(slot), (i // 2) & 1)
            k_t = k_smem.index(slot).permute((1, 0))
            s = warpgroup_mma(q_smem, k_t, zero_s, use_acc=False, is_async=True)
            ds = warpgroup_mma(tq_smem, k_t, zero_s, use_acc=False, is_async=True)
            ds = warpgroup_mma(q_smem, tk_smem.index(slot).permute((1, 0)), ds, is_async=True)
            mbarrier.wait(v_bar.index(prev), ((i - 1) // 2) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            t_acc = warpgroup_mma(p_op, tv_smem.index(prev), t_acc, is_async=True)
            t_acc = warpgroup_mma(h_op, v_smem.index(prev), t_acc, is_async=True)
            s, ds = warpgroup_mma_wait(3, deps=(s, ds))
            if i == n_tiles - 1:
                s = _mask_tail(s, i * BLOCK_N, seqlen_kv, BLOCK_N, s_layout)
            c_old = c_i
            p, h, alpha, m_i, l_i, c_i = _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale)
            # alpha routed through l (always >= 1): the accumulators' rescale depends on the whole softmax
            alpha = gl.where(l_i > 0, alpha, 0.0)
            p_next = gl.convert_layout(p.to(dtype), p_op_layout)
            h_next = gl.convert_layout(h.to(dtype), p_op_layout)
            acc, t_acc, p_op, h_op = warpgroup_mma_wait(0, deps=(acc, t_acc, p_op, h_op))
            # rescale by alpha and re-centre B~ from c_old to c_new (t_acc += (c_old - c_new) * O~)
            alpha_o = gl.convert_layout(alpha, row_o)
            shift_o = gl.convert_layout(c_old - c_i, row_o)
            acc = acc * gl.expand_dims(alpha_o, 1)
            t_acc = t_acc * gl.expand_dims(alpha_o, 1) + gl.expand_dims(shift_o, 1) * acc
            p_op = p_next
            h_op = h_next
            gl.thread_barrier()  # both warpgroups are done with K/dK slot `slot` and V/dV slot `prev`
            ok = i + 2 < n_tiles
            mbarrier.expect(k_bar.index(slot), kv_bytes, pred=ok)
            tma.async_copy_global_to_shared(k_desc, [k_row0 + (i + 2) * BLOCK_N, k_col], k_bar.index(slot),
                                            k_smem.index(slot), pred=ok)
            tma.async_copy_global_to_shared(tk_desc, [tk_row0 + (i + 2) * BLOCK_N, tk_col], k_bar.index(slot),
                                            tk_smem.index(slot), pred=ok)
            ok = i + 1 < n_tiles
            mbarrier.expect(v_bar.index(prev), kv_bytes, pred=ok)
            tma.async_copy_global_to_shared(v_desc, [v_row0 + (i + 1) * BLOCK_N, v_col], v_bar.index(prev),
                                            v_smem.index(prev), pred=ok)
            tma.async_copy_global_to_shared(tv_desc, [tv_row0 + (i + 1) * BLOCK_N, tv_col], v_bar.index(prev),
                                            tv_smem.index(prev), pred=ok)

        # -- the last tile's value products
        last = (n_tiles - 1) % 2
        mbarrier.wait(v_bar.index(last), ((n_tiles - 1) // 2) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        t_acc = warpgroup_mma(p_op, tv_smem.index(last), t_acc, is_async=True)
        t_acc = warpgroup_mma(h_op, v_smem.index(last), t_acc, is_async=True)
        acc, t_acc = warpgroup_mma_wait(0, deps=(acc, t_acc, p_op, h_op))[:2]
        mbarrier.invalidate(q_bar)
        for j in gl.static_range(2):
            mbarrier.invalidate(k_bar.index(j))
            mbarrier.invalidate(v_bar.index(j))

        # -- epilogue: O = O~/l, dO = (A~ + B~)/l (B~ centred at c = dLSE), LSE = m + log l
        l_rcp = gl.convert_layout(1.0 / l_i, row_o)
        o = acc * gl.expand_dims(l_rcp, 1)
        t_o = t_acc * gl.expand_dims(l_rcp, 1)
        rows_o = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        cols_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        row_ok = gl.expand_dims(rows_o < seqlen_q, 1) & gl.expand_dims(cols_o < HEAD_D, 0)
        rows64 = gl.expand_dims(rows_o.to(gl.int64), 1)
        o_offs = off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh + rows64 * stride_os
        gl.store(Out + o_offs + gl.expand_dims(cols_o, 0), o.to(Out.dtype.element_ty), mask=row_ok)
        t_offs = off_b.to(gl.int64) * stride_tob + off_h.to(gl.int64) * stride_toh + rows64 * stride_tos
        gl.store(TOut + t_offs + gl.expand_dims(cols_o, 0), t_o.to(TOut.dtype.element_ty), mask=row_ok)
        rows_s = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # ln(2): back to natural log
        stat_offs = off_bh.to(gl.int64) * seqlen_q + rows_s
        gl.store(LSE + stat_offs, lse, mask=rows_s < seqlen_q)
        gl.store(TLSE + stat_offs, c_i, mask=rows_s < seqlen_q)


def sm90_applies(q, k, v, t_q, t_k, t_v, dims, strides) -> bool:
    """Whether the Gluon Hopper kernel takes this call: Gluon present, CUDA sm_9x, bf16/fp16, Dqk = Dv in (64, 128),
    tangents for K and V, and a 2-D TMA view of every input (``plan_2d``)."""
    if not HAVE_GLUON or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or t_k is None:
        return False
    if dims.head_dim_qk != dims.head_dim_v or dims.head_dim_qk not in (64, 128):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    plans = [plan_2d(x, st, dims.batch, dims.heads, n, dims.head_dim_qk)
             for x, st, n in zip((q, t_q, k, t_k, v, t_v), strides,
                                 (dims.seqlen_q, dims.seqlen_q) + (dims.seqlen_kv,) * 4)]
    return all(p is not None for p in plans)


def attn_jvp_fwd_sm90_launch(q, k, v, t_q, t_k, t_v, o, t_o, lse, t_lse, dims, q_strides, k_strides, v_strides,
                             t_q_strides, t_k_strides, t_v_strides, o_strides, t_o_strides):
    """Launch the Hopper kernel (call ``sm90_applies`` first); each *_strides is (batch, head, seq, feature)."""
    d = dims.head_dim_qk
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs, maps = [], []
    for x, st, n, rows in ((q, q_strides, dims.seqlen_q, BLOCK_M), (t_q, t_q_strides, dims.seqlen_q, BLOCK_M),
                           (k, k_strides, dims.seqlen_kv, BLOCK_N), (t_k, t_k_strides, dims.seqlen_kv, BLOCK_N),
                           (v, v_strides, dims.seqlen_kv, BLOCK_N), (t_v, t_v_strides, dims.seqlen_kv, BLOCK_N)):
        row_b, col_b, col_h, n_rows, n_cols = plan_2d(x, st, dims.batch, dims.heads, n, d)
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], gdtype)
        descs.append(TensorDescriptor(x, [n_rows, n_cols], [st[2], 1], [rows, d], layout))
        maps += [row_b, col_b, col_h]
    grid = (triton.cdiv(dims.seqlen_q, BLOCK_M), dims.batch * dims.heads)
    _attn_jvp_fwd_sm90[grid](
        *descs, o, t_o, lse, t_lse, *o_strides[:3], *t_o_strides[:3], *maps,
        dims.seqlen_q, dims.seqlen_kv, dims.heads, dims.softmax_scale,
        HEAD_D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
    )
