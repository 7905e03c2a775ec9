"""Attention JVP forward for Hopper (sm_90) in Gluon: the math of ``attention_jvp_fwd.py`` (rcm_math.md
section 9), warp-specialized so that tensor-core products, the element-wise softmax/tangent work and
the TMA loads of different warps overlap.

Why not plain Triton: Triton waits for every wgmma before the next non-wgmma instruction and puts a
CTA-wide barrier before each TMA copy, so in ``attention_jvp_fwd.py`` the two warpgroups of a
program run in lockstep and the exp2 / centring / rescale work of a tile never overlaps a product.
Gluon (Triton's explicit-layout dialect) exposes asynchronous wgmma, mbarriers and warp
specialization. Each program owns BLOCK_M = 128 query rows and runs three partitions:

    loader      1 warp     TMA: Q, dQ once; then K/dK and V/dV tiles into two-deep rings,
                           each slot refilled when both consumers have released it (k_empty/v_empty)
    consumer 0  4 warps    query rows 0-63 of the program       (the default partition)
    consumer 1  4 warps    query rows 64-127                    (a worker partition)

The consumers share nothing but the rings, so they drift apart and one's element-wise work runs
under the other's products. Inside a consumer the key loop is software-pipelined:

    iteration i:  issue  S_i = Q K_i^T,  dS_i = dQ K_i^T + Q dK_i^T                          (async)
                  issue  O~ += P~_{i-1} V_{i-1},  A~+B~ += P~_{i-1} dV_{i-1} + H~_{i-1} V_{i-1}   (async)
                  wait for S_i, dS_i only, release K/dK slot; online softmax and centred tangent
                  weights of tile i while the value products of tile i-1 run
                  wait for the value products; rescale / re-centre the accumulators;
                  P~_i, H~_i -> shared memory (the A operands of the next value products); release V/dV slot

P~ and H~ go through shared memory: as register operands they would hold 32 more registers per
thread while the products that read them run, past the 240 a consumer gets (ptxas then serializes
every wgmma). The rescale factor is routed through the row sum l (``where(l > 0, alpha, 0)``,
always alpha) so that the accumulators depend on the whole softmax; without that data path ptxas
sinks the exp2 work below the wgmma wait. With dK = dV = 0 (HAS_T_KV=False) the tiles carry K and
V only, dS = dQ K^T, and the softmax scale of dS moves to the epilogue, as in the Triton kernel.

Tensors are read through 2-D TMA descriptors over a (row, column) view of each 4-D tensor:
row = b * row_b + s, column = b * col_b + h * col_h + d (``plan_2d``): Megatron's [s, b, h, d]
(and slices of a fused projection) as row_b = 0, bshd [b, s, h, d] as row_b = S. Rows past the end
are zero-filled by TMA (seq-major) or belong to the next batch (batch-major); either way they are
finite and masked out of the softmax.

Scope: Hopper, bf16/fp16, Dqk = Dv in (64, 128), any lengths, Triton 3.6 (``GLUON_VERIFIED``: Gluon's
API moves between releases); everything else runs ``attention_jvp_fwd.py``. Shape legend: BLOCK_M query rows per program, HALF = BLOCK_M / 2 per
consumer, BLOCK_N keys per tile, HEAD_D.
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

# Gluon's API changes between Triton releases (3.9 renamed the TMA copy and the CTA barrier this file uses):
# the kernel runs only on the release it was compiled and verified with, others take the Triton kernel.
GLUON_VERIFIED = ("3.6",)
GLUON_OK = HAVE_GLUON and ".".join(triton.__version__.split(".")[:2]) in GLUON_VERIFIED

BLOCK_M, BLOCK_N = 128, 64
CONSUMER_REGS, LOADER_REGS = 240, 24  # per thread; the launch budget below leaves 240 for each consumer
MAXNREG = 168  # 12 warps (3 warpgroups: consumer, consumer, loader + 3 idle) * 32 * 168 <= 65536 registers


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
    def _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale, HAS_T_KV: gl.constexpr):
        """Online softmax of one tile and its centred tangent weights (rcm_math.md section 9):
        P~ = exp2(S * scale * log2 e - m), H~ = P~ * (dS * scale - c), c the running dLSE. The fast path
        (HAS_T_KV=False) keeps dS and c unscaled; the epilogue applies the scale."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_new = l_i + gl.sum(p, 1)
        pd = p * ds
        if HAS_T_KV:
            c_new = (c_i * l_i + gl.sum(pd, 1) * softmax_scale) / l_new
            h = pd * softmax_scale - p * gl.expand_dims(c_new, 1)
        else:
            c_new = (c_i * l_i + gl.sum(pd, 1)) / l_new
            h = pd - p * gl.expand_dims(c_new, 1)
        return p, h, alpha, m_new, l_new, c_new

    @gluon.jit
    def _mask_tail(s, start_n, seqlen_kv, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        return gl.where(gl.expand_dims(cols < seqlen_kv, 0), s, float("-inf"))

    @gluon.jit
    def _scores(q_rows, tq_rows, k_buf, tk_buf, zero_s, HAS_T_KV: gl.constexpr):
        """Issue S = Q K^T and dS = dQ K^T (+ Q dK^T), unscaled, asynchronously."""
        k_t = k_buf.permute((1, 0))
        s = warpgroup_mma(q_rows, k_t, zero_s, use_acc=False, is_async=True)
        ds = warpgroup_mma(tq_rows, k_t, zero_s, use_acc=False, is_async=True)
        if HAS_T_KV:
            ds = warpgroup_mma(q_rows, tk_buf.permute((1, 0)), ds, is_async=True)
        return s, ds

    @gluon.jit
    def _values(acc, t_acc, p_buf, h_buf, v_buf, tv_buf, HAS_T_KV: gl.constexpr):
        """Issue O~ += P~ V and A~ + B~ += (P~ dV +) H~ V asynchronously."""
        acc = warpgroup_mma(p_buf, v_buf, acc, is_async=True)
        if HAS_T_KV:
            t_acc = warpgroup_mma(p_buf, tv_buf, t_acc, is_async=True)
        t_acc = warpgroup_mma(h_buf, v_buf, t_acc, is_async=True)
        return acc, t_acc

    @gluon.jit
    def _consumer(smem, bars, ptrs, strides, sizes, ROW0: gl.constexpr, HAS_T_KV: gl.constexpr):
        """One warpgroup: query rows ROW0 .. ROW0 + HALF of the program, the whole key loop, the epilogue."""
        q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ph_smem = smem
        q_bar, k_ready, k_empty, v_ready, v_empty = bars
        Out, TOut, LSE, TLSE = ptrs
        stride_ob, stride_oh, stride_os, stride_tob, stride_toh, stride_tos = strides
        seqlen_q, seqlen_kv, num_heads, softmax_scale = sizes
        BLOCK_M: gl.constexpr = q_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_smem.type.shape[1]
        HEAD_D: gl.constexpr = k_smem.type.shape[2]
        HALF: gl.constexpr = BLOCK_M // 2
        N_VALUES: gl.constexpr = 3 if HAS_T_KV else 2  # wgmma groups of the value products
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_rows = q_smem.slice(ROW0, HALF)
        tq_rows = tq_smem.slice(ROW0, HALF)
        p_buf = ph_smem.index(2 * (ROW0 // HALF))
        h_buf = ph_smem.index(2 * (ROW0 // HALF) + 1)
        n_tiles = gl.cdiv(seqlen_kv, BLOCK_N)

        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([HALF], gl.float32, layout=row_s)
        c_i = gl.zeros([HALF], gl.float32, layout=row_s)
        acc = gl.zeros([HALF, HEAD_D], gl.float32, layout=o_layout)
        t_acc = gl.zeros([HALF, HEAD_D], gl.float32, layout=o_layout)
        zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
        qk_scale = softmax_scale * 1.4426950408889634  # log2(e)

        # -- tile 0: scores and softmax; P~, H~ to shared memory
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s, ds = _scores(q_rows, tq_rows, k_smem.index(0), tk_smem.index(0), zero_s, HAS_T_KV)
        s, ds = warpgroup_mma_wait(0, deps=(s, ds))
        mbarrier.arrive(k_empty.index(0), count=1)
        if n_tiles == 1:
            s = _mask_tail(s, 0, seqlen_kv, BLOCK_N, s_layout)
        p, h, alpha, m_i, l_i, c_i = _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale, HAS_T_KV)
        p_buf.store(p.to(dtype))
        h_buf.store(h.to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # this warpgroup's four warps

        # -- steady state: tile i's score products and tile i-1's value products in flight together
        for i in range(1, n_tiles):
            slot = i % 2
            prev = 1 - slot
            mbarrier.wait(k_ready.index(slot), (i // 2) & 1)
            s, ds = _scores(q_rows, tq_rows, k_smem.index(slot), tk_smem.index(slot), zero_s, HAS_T_KV)
            mbarrier.wait(v_ready.index(prev), ((i - 1) // 2) & 1)
            acc, t_acc = _values(acc, t_acc, p_buf, h_buf, v_smem.index(prev), tv_smem.index(prev), HAS_T_KV)
            s, ds = warpgroup_mma_wait(N_VALUES, deps=(s, ds))
            mbarrier.arrive(k_empty.index(slot), count=1)
            if i == n_tiles - 1:
                s = _mask_tail(s, i * BLOCK_N, seqlen_kv, BLOCK_N, s_layout)
            c_old = c_i
            p, h, alpha, m_i, l_i, c_i = _softmax_tangent(s, ds, m_i, l_i, c_i, softmax_scale, qk_scale, HAS_T_KV)
            # alpha routed through l (always >= 1): the rescale below depends on the whole softmax
            alpha = gl.where(l_i > 0, alpha, 0.0)
            acc, t_acc = warpgroup_mma_wait(0, deps=(acc, t_acc))
            # rescale by alpha and re-centre B~ from c_old to c_new (t_acc += (c_old - c_new) * O~)
            alpha_o = gl.convert_layout(alpha, row_o)
            shift_o = gl.convert_layout(c_old - c_i, row_o)
            acc = acc * gl.expand_dims(alpha_o, 1)
            t_acc = t_acc * gl.expand_dims(alpha_o, 1) + gl.expand_dims(shift_o, 1) * acc
            p_buf.store(p.to(dtype))
            h_buf.store(h.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(v_empty.index(prev), count=1)

        # -- the last tile's value products
        last = (n_tiles - 1) % 2
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // 2) & 1)
        acc, t_acc = _values(acc, t_acc, p_buf, h_buf, v_smem.index(last), tv_smem.index(last), HAS_T_KV)
        acc, t_acc = warpgroup_mma_wait(0, deps=(acc, t_acc))

        # -- epilogue: O = O~/l, dO = (A~ + B~)/l (B~ centred at c = dLSE), LSE = m + log l
        l_rcp = 1.0 / l_i
        if HAS_T_KV:
            t_lse = c_i
            t_scale = l_rcp
        else:
            t_lse = c_i * softmax_scale
            t_scale = l_rcp * softmax_scale
        o = acc * gl.expand_dims(gl.convert_layout(l_rcp, row_o), 1)
        t_o = t_acc * gl.expand_dims(gl.convert_layout(t_scale, row_o), 1)
        start_m = gl.program_id(0)
        off_bh = gl.program_id(1)
        off_b = (off_bh // num_heads).to(gl.int64)
        off_h = (off_bh % num_heads).to(gl.int64)
        rows_o = start_m * BLOCK_M + ROW0 + gl.arange(0, HALF, layout=row_o)
        cols_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        row_ok = gl.expand_dims(rows_o < seqlen_q, 1) & gl.expand_dims(cols_o < HEAD_D, 0)
        rows64 = gl.expand_dims(rows_o.to(gl.int64), 1)
        o_offs = off_b * stride_ob + off_h * stride_oh + rows64 * stride_os + gl.expand_dims(cols_o, 0)
        gl.store(Out + o_offs, o.to(Out.dtype.element_ty), mask=row_ok)
        t_offs = off_b * stride_tob + off_h * stride_toh + rows64 * stride_tos + gl.expand_dims(cols_o, 0)
        gl.store(TOut + t_offs, t_o.to(TOut.dtype.element_ty), mask=row_ok)
        rows_s = start_m * BLOCK_M + ROW0 + gl.arange(0, HALF, layout=row_s)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # ln(2): back to natural log
        stat_offs = off_bh.to(gl.int64) * seqlen_q + rows_s
        gl.store(LSE + stat_offs, lse, mask=rows_s < seqlen_q)
        gl.store(TLSE + stat_offs, t_lse, mask=rows_s < seqlen_q)

    @gluon.jit
    def _load_tile_pair(desc, t_desc, coord, t_coord, buf, t_buf, empty, ready, phase, tile_bytes: gl.constexpr,
                        HAS_T_KV: gl.constexpr):
        """Wait until both consumers released a ring slot, then TMA a tile (and its tangent) into it."""
        mbarrier.wait(empty, phase ^ 1)
        mbarrier.expect(ready, tile_bytes)
        tma.async_copy_global_to_shared(desc, coord, ready, buf)
        if HAS_T_KV:
            tma.async_copy_global_to_shared(t_desc, t_coord, ready, t_buf)

    @gluon.jit
    def _loader(smem, bars, descs, maps, sizes, HAS_T_KV: gl.constexpr):
        """The TMA warp: Q and dQ once, then every key tile into the (K, dK) and (V, dV) rings."""
        q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ph_smem = smem
        q_bar, k_ready, k_empty, v_ready, v_empty = bars
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc = descs
        q_rb, q_cb, q_ch, tq_rb, tq_cb, tq_ch, k_rb, k_cb, k_ch, tk_rb, tk_cb, tk_ch, v_rb, v_cb, v_ch, tv_rb, tv_cb, \
            tv_ch = maps
        seqlen_q, seqlen_kv, num_heads, softmax_scale = sizes
        BLOCK_M: gl.constexpr = q_smem.type.shape[0]
        BLOCK_N: gl.constexpr = k_smem.type.shape[1]
        HEAD_D: gl.constexpr = k_smem.type.shape[2]
        elem: gl.constexpr = q_smem.dtype.primitive_bitwidth // 8
        tile_bytes: gl.constexpr = (2 if HAS_T_KV else 1) * BLOCK_N * HEAD_D * elem
        start_m = gl.program_id(0)
        off_bh = gl.program_id(1)
        off_b = off_bh // num_heads
        off_h = off_bh % num_heads

        mbarrier.expect(q_bar, 2 * BLOCK_M * HEAD_D * elem)
        tma.async_copy_global_to_shared(q_desc, [off_b * q_rb + start_m * BLOCK_M, off_b * q_cb + off_h * q_ch],
                                        q_bar, q_smem)
        tma.async_copy_global_to_shared(tq_desc, [off_b * tq_rb + start_m * BLOCK_M, off_b * tq_cb + off_h * tq_ch],
                                        q_bar, tq_smem)
        k_col, tk_col = off_b * k_cb + off_h * k_ch, off_b * tk_cb + off_h * tk_ch
        v_col, tv_col = off_b * v_cb + off_h * v_ch, off_b * tv_cb + off_h * tv_ch
        for j in range(gl.cdiv(seqlen_kv, BLOCK_N)):
            slot = j % 2
            phase = (j // 2) & 1  # a fresh mbarrier counts as having completed phase 1: the first waits pass
            _load_tile_pair(k_desc, tk_desc, [off_b * k_rb + j * BLOCK_N, k_col], [off_b * tk_rb + j * BLOCK_N, tk_col],
                            k_smem.index(slot), tk_smem.index(slot), k_empty.index(slot), k_ready.index(slot), phase,
                            tile_bytes, HAS_T_KV)
            _load_tile_pair(v_desc, tv_desc, [off_b * v_rb + j * BLOCK_N, v_col], [off_b * tv_rb + j * BLOCK_N, tv_col],
                            v_smem.index(slot), tv_smem.index(slot), v_empty.index(slot), v_ready.index(slot), phase,
                            tile_bytes, HAS_T_KV)

    # Worker partitions lose constexpr arguments, so each (partition, HAS_T_KV) pair is its own function.
    @gluon.jit
    def _consumer_hi_tkv(smem, bars, descs, ptrs, strides, maps, sizes):
        _consumer(smem, bars, ptrs, strides, sizes, smem[0].type.shape[0] // 2, True)

    @gluon.jit
    def _consumer_hi_fast(smem, bars, descs, ptrs, strides, maps, sizes):
        _consumer(smem, bars, ptrs, strides, sizes, smem[0].type.shape[0] // 2, False)

    @gluon.jit
    def _loader_tkv(smem, bars, descs, ptrs, strides, maps, sizes):
        _loader(smem, bars, descs, maps, sizes, True)

    @gluon.jit
    def _loader_fast(smem, bars, descs, ptrs, strides, maps, sizes):
        _loader(smem, bars, descs, maps, sizes, False)

    @gluon.jit
    def _attn_jvp_fwd_sm90(
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc,
        Out, TOut, LSE, TLSE,
        stride_ob, stride_oh, stride_os, stride_tob, stride_toh, stride_tos,
        q_rb, q_cb, q_ch, tq_rb, tq_cb, tq_ch, k_rb, k_cb, k_ch, tk_rb, tk_cb, tk_ch,
        v_rb, v_cb, v_ch, tv_rb, tv_cb, tv_ch,
        seqlen_q, seqlen_kv, num_heads, softmax_scale,
        HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_T_KV: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        # -- shared memory: Q, dQ; two-deep rings for (K, dK) and (V, dV); P~ and H~ of each consumer
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
        tq_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], tq_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], v_desc.layout)
        if HAS_T_KV:
            tk_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], tk_desc.layout)
            tv_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], tv_desc.layout)
        else:  # never read
            tk_smem = k_smem
            tv_smem = v_smem
        ph_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, BLOCK_N], dtype)
        ph_smem = gl.allocate_shared_memory(dtype, [4, BLOCK_M // 2, BLOCK_N], ph_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for j in gl.static_range(2):
            mbarrier.init(k_ready.index(j), count=1)
            mbarrier.init(v_ready.index(j), count=1)
            mbarrier.init(k_empty.index(j), count=2)  # one arrive per consumer
            mbarrier.init(v_empty.index(j), count=2)
        fence_async_shared()

        smem = (q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ph_smem)
        bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
        descs = (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc)
        ptrs = (Out, TOut, LSE, TLSE)
        strides = (stride_ob, stride_oh, stride_os, stride_tob, stride_toh, stride_tos)
        maps = (q_rb, q_cb, q_ch, tq_rb, tq_cb, tq_ch, k_rb, k_cb, k_ch, tk_rb, tk_cb, tk_ch,
                v_rb, v_cb, v_ch, tv_rb, tv_cb, tv_ch)
        sizes = (seqlen_q, seqlen_kv, num_heads, softmax_scale)
        worker_args = (smem, bars, descs, ptrs, strides, maps, sizes)
        if HAS_T_KV:
            gl.warp_specialize([
                (_consumer, (smem, bars, ptrs, strides, sizes, 0, True)),
                (_consumer_hi_tkv, worker_args),
                (_loader_tkv, worker_args),
            ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (smem, bars, ptrs, strides, sizes, 0, False)),
                (_consumer_hi_fast, worker_args),
                (_loader_fast, worker_args),
            ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def sm90_applies(q, k, v, t_q, t_k, t_v, dims, strides) -> bool:
    """Whether the Gluon Hopper kernel takes this call: Triton 3.6 (``GLUON_VERIFIED``), CUDA sm_9x, bf16/fp16, Dqk = Dv
    in (64, 128),
    and a 2-D TMA view of every input (``plan_2d``); ``strides`` are those of (q, t_q, k, t_k, v, t_v), None for
    absent tangents (the dK = dV = 0 path)."""
    if not GLUON_OK or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if dims.head_dim_qk != dims.head_dim_v or dims.head_dim_qk not in (64, 128):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    lengths = (dims.seqlen_q, dims.seqlen_q) + (dims.seqlen_kv,) * 4
    return all(x is None or plan_2d(x, st, dims.batch, dims.heads, n, dims.head_dim_qk) is not None
               for x, st, n in zip((q, t_q, k, t_k, v, t_v), strides, lengths))


def attn_jvp_fwd_sm90_launch(q, k, v, t_q, t_k, t_v, o, t_o, lse, t_lse, dims, q_strides, k_strides, v_strides,
                             t_q_strides, t_k_strides, t_v_strides, o_strides, t_o_strides):
    """Launch the Hopper kernel (call ``sm90_applies`` first); each *_strides is (batch, head, seq, feature).
    t_k = t_v = None selects the dK = dV = 0 path."""
    has_t_kv = t_k is not None
    if not has_t_kv:  # never read: HAS_T_KV=False skips their loads and products
        t_k, t_v, t_k_strides, t_v_strides = k, v, k_strides, v_strides
    assert o_strides[3] == 1 and t_o_strides[3] == 1, "outputs are allocated with a unit feature stride"
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
        HEAD_D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_T_KV=has_t_kv,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
