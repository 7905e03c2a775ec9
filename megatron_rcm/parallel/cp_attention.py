"""Self-attention and its tangent over a context-parallel token sequence: ring (p2p) and Ulysses (a2a).

Legend: s tokens on this CP rank (of S_pad = CP * s; the first S are valid), B batch, N heads on this TP
rank, N_c = N / CP, d head dim. In and out: q, k, v, t_q, t_k, t_v, o, t_o [s, B, N, d] (Megatron layout).

Ulysses (``cp_comm_type: a2a``): one all-to-all over the CP group moves q, k, v and t_q, t_k, t_v stacked
together from [s, B, N, d] (sequence-sharded, all heads) to [S_pad, B, N_c, d] (whole sequence, this rank's
heads); attention runs on the valid keys [:S]; one all-to-all moves (o, t_o) back. The all-to-all's
backward is the inverse all-to-all; the tangents carry no gradient. Needs CP | N. With
``cp_a2a_head_groups: G`` > 1 the all-to-alls run per head group, asynchronously, overlapped with the other
groups' attention (``cp_ulysses_groups``; G | N_c).

Ring (``cp_comm_type: p2p``): each rank keeps its queries while (k, v, t_k, t_v) travel around the ring,
the next chunk's send/recv started before the current chunk's kernel. Partial results are merged through
the log-sum-exp and its tangent, folded in place into float32 accumulators and normalized once after the
last chunk (``attention_chunks.PartialSum``). Backward: the ring in reverse; each
chunk's FlashAttention-2 backward with the global (o, lse) gives this rank's share of dq and the chunk's
dk, dv, which travel with the chunk back to its owner. Any CP size.

Hierarchical (``cp_comm_type: a2a+p2p``, Megatron's ``hierarchical_context_parallel_sizes = [A, R]``, A x R =
CP): Ulysses inside each group of A consecutive CP ranks (Megatron's level-0 groups), which turns the group's
A contiguous shards into one contiguous block of A s tokens with N / A heads; then the ring across the R
blocks over the ranks holding the same heads (level-1 groups: CP ranks c, c + A, ...), then the inverse
all-to-all. A | N; any R. A = 1 is the ring, R = 1 is Ulysses.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_rcm.ops.attention import AttentionOp, attention_op, check_attention_backend
from megatron_rcm.ops.attention_chunks import ChunkOps, PartialSum, chunk_ops
from megatron_rcm.parallel.context import (
    CP_COMM_TYPES,
    TokenShard,
    cp_global_ranks,
    cp_group,
    hierarchical_cp_groups,
)
from megatron_rcm.parallel.cp_ulysses_groups import check_head_groups, grouped_ulysses, pack_by_destination

__all__ = ["ContextParallelAttention", "PhaseTimes", "check_cp_layout", "record_phases"]


class PhaseTimes:
    """Seconds spent per phase of the CP attention, for benchmarks (``record_phases``).

    Phases: ``ring_fwd/compute``, ``ring_fwd/wait``, ``ring_bwd/compute``, ``ring_bwd/wait``,
    ``a2a/all_to_all``, ``a2a/attention``. On CUDA each phase is bracketed by CUDA events on the compute
    stream, so a ``wait`` phase is the time the stream stalls on communication that the previous compute
    did not hide (0 when the ring fully overlaps); on CPU (blocking gloo) wall-clock time.
    """

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._pending = []

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def summary(self) -> dict[str, float]:
        """{phase: seconds} so far (synchronizes CUDA)."""
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._pending.clear()
        return dict(self.totals)


_PHASES: PhaseTimes | None = None


@contextlib.contextmanager
def record_phases(times: PhaseTimes):
    """Within the block, the CP attention adds its per-phase times to ``times``."""
    global _PHASES
    previous, _PHASES = _PHASES, times
    try:
        yield times
    finally:
        _PHASES = previous


def _phase(name: str, device: torch.device):
    return contextlib.nullcontext() if _PHASES is None else _PHASES.phase(name, device)


def check_cp_layout(comm_type: str, cp: int, heads_per_tp_rank: int, hierarchical_sizes=None,
                    a2a_head_groups=1) -> None:
    """Raise ValueError (naming the numbers) for a CP layout the attention cannot run. ``hierarchical_sizes``:
    [A, R] (Megatron's ``hierarchical_context_parallel_sizes``), required by and only used with 'a2a+p2p'.
    ``a2a_head_groups`` G (``parallel.cp_a2a_head_groups``): Ulysses' all-to-all in G head groups overlapped
    with the attention, 'a2a' only; G must divide the heads per CP rank."""
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type must be one of {CP_COMM_TYPES}, got {comm_type!r}")
    if comm_type == "a2a" and heads_per_tp_rank % cp:
        raise ValueError(
            f"cp_comm_type 'a2a' (Ulysses) splits the heads over the CP group: {heads_per_tp_rank} heads per "
            f"tensor-parallel rank are not divisible by context_parallel {cp}; use cp_comm_type 'p2p' (ring), "
            "which works for any CP size"
        )
    if isinstance(a2a_head_groups, bool) or a2a_head_groups != 1:
        if comm_type != "a2a":
            raise ValueError(
                f"cp_a2a_head_groups {a2a_head_groups!r} (the overlapped Ulysses all-to-all) is implemented for "
                f"cp_comm_type 'a2a' only, got {comm_type!r}; set cp_a2a_head_groups to 1"
            )
        check_head_groups(a2a_head_groups, heads_per_tp_rank // cp, cp, heads_per_tp_rank)
    if comm_type != "a2a+p2p":
        if hierarchical_sizes:
            raise ValueError(
                f"hierarchical_context_parallel_sizes {list(hierarchical_sizes)} is only used with cp_comm_type "
                f"'a2a+p2p', got {comm_type!r}"
            )
        return
    sizes = list(hierarchical_sizes or [])
    if len(sizes) != 2 or any(int(x) != x or x < 1 for x in sizes):
        raise ValueError(
            "cp_comm_type 'a2a+p2p' needs hierarchical_context_parallel_sizes = [A, R] (A ranks of Ulysses "
            f"all-to-all inside each group, a ring of R groups), two positive integers; got {hierarchical_sizes!r}"
        )
    a, r = sizes
    if a * r != cp:
        raise ValueError(
            f"hierarchical_context_parallel_sizes {sizes}: A x R = {a} x {r} = {a * r} must equal "
            f"context_parallel {cp}"
        )
    if heads_per_tp_rank % a:
        raise ValueError(
            f"cp_comm_type 'a2a+p2p' splits the heads over the all-to-all groups of A = {a} ranks: "
            f"{heads_per_tp_rank} heads per tensor-parallel rank are not divisible by {a}; pick A dividing "
            f"the heads in hierarchical_context_parallel_sizes, or use cp_comm_type 'p2p'"
        )


# -------------------------------------------------------------------------------------------------
# Ulysses
# -------------------------------------------------------------------------------------------------


def _seq_to_heads(parts_sBNd, cp: int, group) -> list[torch.Tensor]:
    """X tensors [s, B, N, d] -> X views [cp*s, B, N/cp, d]: rank j receives heads [j N_c, (j+1) N_c) of
    every rank, all X parts in one all-to-all. One copy in all: the send buffer [cp, s, X, B, N_c, d] is
    filled part by part; the receive buffer [cp (source rank) * s, X, B, N_c, d] is already sequence-major,
    so each part is a strided view (sequence stride X B N_c d) that the attention kernels read in place."""
    X = len(parts_sBNd)
    s, B, N, d = parts_sBNd[0].shape
    send = parts_sBNd[0].new_empty(cp, s, X, B, N // cp, d)
    for i, x in enumerate(parts_sBNd):
        send[:, :, i].copy_(x.reshape(s, B, cp, N // cp, d).permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    full = recv.view(cp * s, X, B, N // cp, d)
    return [full[:, i] for i in range(X)]


def _heads_to_seq(parts_SBNd, cp: int, group) -> list[torch.Tensor]:
    """Inverse of ``_seq_to_heads``: X tensors [cp*s, B, N_c, d] -> X tensors [s, B, cp*N_c, d] (contiguous).
    Two copies: into the send buffer [cp (destination = sequence chunk), s, X, B, N_c, d], and out of the
    receive buffer [cp (source = head group), s, X, B, N_c, d] into each part's head order."""
    send = pack_by_destination(parts_SBNd, cp)
    _, s, X, B, Nc, d = send.shape
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out = recv.permute(1, 2, 3, 0, 4, 5)  # [s, X, B, cp, N_c, d]
    return [out[:, i].reshape(s, B, cp * Nc, d) for i in range(X)]


class _SeqToHeads(torch.autograd.Function):
    """``_seq_to_heads`` with the inverse all-to-all as its backward (for the parts that get a gradient)."""

    @staticmethod
    def forward(ctx, cp, group, *parts):
        ctx.cp, ctx.group = cp, group
        ctx.set_materialize_grads(False)
        return tuple(_seq_to_heads(parts, cp, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_exchange_grads(grads, _heads_to_seq, ctx.cp, ctx.group))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp, group, *parts):
        ctx.cp, ctx.group = cp, group
        ctx.set_materialize_grads(False)
        return tuple(_heads_to_seq(parts, cp, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_exchange_grads(grads, _seq_to_heads, ctx.cp, ctx.group))


def _exchange_grads(grads, fn, cp, group):
    """The inverse all-to-all of the gradients that exist (the same parts on every rank: the same graph)."""
    have = [i for i, g in enumerate(grads) if g is not None]
    moved = fn([grads[i] for i in have], cp, group) if have else []
    out = [None] * len(grads)
    for i, g in zip(have, moved):
        out[i] = g
    return out


def _a2a(fn, parts, cp, group):
    if torch.is_grad_enabled() and any(x.requires_grad for x in parts):
        return list(fn.apply(cp, group, *parts))
    return (_seq_to_heads if fn is _SeqToHeads else _heads_to_seq)(parts, cp, group)


def ulysses_attention(q, k, v, t_q, t_k, t_v, shard: TokenShard, attn: AttentionOp, scale=None):
    return _ulysses(q, k, v, t_q, t_k, t_v, shard, attn, shard.size, cp_group(), scale)


def grouped_ulysses_attention(q, k, v, t_q, t_k, t_v, shard: TokenShard, impl, scale=None):
    """``impl`` = (attention op, G): Ulysses with the all-to-all in G head groups (``cp_ulysses_groups``)."""
    attn, groups = impl
    return grouped_ulysses(q, k, v, t_q, t_k, t_v, shard, attn, shard.size, cp_group(), groups, scale, _phase)


def _ulysses(q, k, v, t_q, t_k, t_v, shard: TokenShard, attn: AttentionOp, cp: int, group, scale=None):
    """Ulysses over ``group`` (``cp`` ranks holding the whole padded sequence of ``shard`` between them)."""
    with_tangent = t_q is not None
    parts = [q, k, v] + ([t_q.detach(), t_k.detach(), t_v.detach()] if with_tangent else [])
    with _phase("a2a/all_to_all", q.device):
        full = _a2a(_SeqToHeads, parts, cp, group)  # 3 or 6 x [S_pad, B, N_c, d]
    S = shard.seq_len
    q, k, v = full[0], full[1][:S], full[2][:S]  # padded keys sliced off: exact, no mask
    t = (full[3].detach(), full[4][:S].detach(), full[5][:S].detach()) if with_tangent else (None,) * 3
    with _phase("a2a/attention", q.device):
        o, t_o = attn(q, k, v, *t, softmax_scale=scale)
    with _phase("a2a/all_to_all", q.device):
        if not with_tangent:
            return _a2a(_HeadsToSeq, [o], cp, group)[0], None
        out = _a2a(_HeadsToSeq, [o, t_o.to(o.dtype).detach()], cp, group)
    return out[0], out[1].detach()


# -------------------------------------------------------------------------------------------------
# Ring
# -------------------------------------------------------------------------------------------------


class _Ring:
    """Send to the next rank of the ring, receive from the previous one (asynchronously). ``ranks``: the ring's
    global ranks in order (default: the CP group's), ``group`` the process group holding them."""

    def __init__(self, ranks=None, group=None):
        ranks = cp_global_ranks() if ranks is None else ranks
        me = ranks.index(dist.get_rank())
        self.group = cp_group() if group is None else group
        self.next, self.prev = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def start(self, send: torch.Tensor):
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs):
        for r in reqs:
            r.wait()


class _RingAttention(torch.autograd.Function):
    """(o, t_o) of this rank's queries over every rank's keys; gradients to q, k, v (see module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, t_q, t_k, t_v, shard: TokenShard, ops: ChunkOps, scale: float, ring: _Ring):
        cp, rank = shard.size, shard.rank
        with_tangent = t_q is not None
        kv = torch.stack([k, v, t_k, t_v] if with_tangent else [k, v]).contiguous()
        acc = PartialSum()
        for i in range(cp):
            owner = (rank - i) % cp  # the chunk held at step i came from rank - i
            if i < cp - 1:
                nxt, reqs = ring.start(kv)  # overlap: the next chunk travels while this one is computed
            n = shard.valid_len(owner)
            if n > 0:
                c = kv[:, :n]  # padded keys sliced off: exact, no mask
                with _phase("ring_fwd/compute", q.device):
                    part = ops.forward(q, c[0], c[1], t_q, c[2] if with_tangent else None,
                                       c[3] if with_tangent else None, scale)
                    acc.add(part)
            if i < cp - 1:
                with _phase("ring_fwd/wait", q.device):
                    _Ring.wait(reqs)
                kv = nxt
        with _phase("ring_fwd/compute", q.device):
            acc = acc.result()
            o = acc.o.to(q.dtype)
            t_o = acc.t_o.to(q.dtype) if with_tangent else None
        ctx.save_for_backward(q, k, v, o, acc.lse)
        ctx.shard, ctx.ops, ctx.scale, ctx.ring = shard, ops, scale, ring
        if with_tangent:
            ctx.mark_non_differentiable(t_o)
        return o, t_o

    @staticmethod
    def backward(ctx, do, _grad_t_o):
        q, k, v, o, lse = ctx.saved_tensors
        shard, ops, scale, ring = ctx.shard, ctx.ops, ctx.scale, ctx.ring
        cp, rank = shard.size, shard.rank
        do = do.contiguous()
        kv = torch.stack([k, v]).contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
        dkv = None
        dkv_reqs = None
        for i in range(cp):
            owner = (rank - i) % cp
            if i < cp - 1:
                kv_next, kv_reqs = ring.start(kv)
            part = torch.zeros((2, *k.shape), dtype=dq.dtype, device=q.device)
            n = shard.valid_len(owner)
            if n > 0:
                with _phase("ring_bwd/compute", q.device):
                    dq_j, dk_j, dv_j = ops.backward(q, kv[0, :n], kv[1, :n], o, lse, do, scale)
                    dq += dq_j
                    part[0, :n], part[1, :n] = dk_j, dv_j
            if dkv_reqs is not None:  # the accumulated dk, dv of this chunk from the ranks before us
                with _phase("ring_bwd/wait", q.device):
                    _Ring.wait(dkv_reqs)
                part += dkv
            dkv, dkv_reqs = ring.start(part)  # after the last step this returns the chunk to its owner
            if i < cp - 1:
                with _phase("ring_bwd/wait", q.device):
                    _Ring.wait(kv_reqs)
                kv = kv_next
        with _phase("ring_bwd/wait", q.device):
            _Ring.wait(dkv_reqs)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None, None


def ring_attention(q, k, v, t_q, t_k, t_v, shard: TokenShard, backend: str, scale=None, ring: _Ring | None = None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ops = chunk_ops(backend, q.device)
    t = (t_q, t_k, t_v) if t_q is None else (t_q.detach(), t_k.detach(), t_v.detach())
    return _RingAttention.apply(q, k, v, *t, shard, ops, scale, _Ring() if ring is None else ring)


# -------------------------------------------------------------------------------------------------
# Hierarchical: Ulysses inside groups of A ranks, the ring across the R groups
# -------------------------------------------------------------------------------------------------


def hierarchical_attention(q, k, v, t_q, t_k, t_v, shard: TokenShard, impl, scale=None):
    """``impl`` = (A, backend). [s, B, N, d] -> all-to-all in the level-0 group -> [A s, B, N/A, d], the block
    ``shard.rank // A`` of R blocks -> ring over the level-1 group -> all-to-all back."""
    a, backend = impl
    r = shard.size // a
    a2a_group, ring_group = hierarchical_cp_groups()
    if r == 1:  # Ulysses over the whole (level-0 = CP) group
        return _ulysses(q, k, v, t_q, t_k, t_v, shard, attention_op(backend), a, a2a_group, scale)
    ranks = cp_global_ranks()
    ring = _Ring([ranks[shard.rank % a + j * a] for j in range(r)], ring_group)
    block = TokenShard(seq_len=shard.seq_len, padded_len=shard.padded_len, size=r, rank=shard.rank // a)
    if a == 1:
        return ring_attention(q, k, v, t_q, t_k, t_v, block, backend, scale, ring)

    def ring_over_blocks(q, k, v, t_q, t_k, t_v, softmax_scale=None):
        return ring_attention(q, k, v, t_q, t_k, t_v, block, backend, softmax_scale, ring)

    # the all-to-all gathers the group's A s tokens (no padding to slice: the ring skips padded keys per block)
    n = a * shard.local_len
    group_tokens = TokenShard(seq_len=n, padded_len=n, size=a, rank=shard.rank % a)
    return _ulysses(q, k, v, t_q, t_k, t_v, group_tokens, ring_over_blocks, a, a2a_group, scale)


class ContextParallelAttention:
    """Self-attention over a CP-sharded sequence with the flavour picked once (``cp_comm_type``)."""

    def __init__(self, comm_type: str, cp: int, heads_per_tp_rank: int, backend: str, hierarchical_sizes=None,
                 a2a_head_groups: int = 1):
        check_cp_layout(comm_type, cp, heads_per_tp_rank, hierarchical_sizes, a2a_head_groups)
        self.comm_type, self.backend = comm_type, check_attention_backend(backend)
        # Ring: the chunk implementation follows the tensors' device (``chunk_ops``); Ulysses: one
        # attention op over the whole sequence, picked here.
        if comm_type == "p2p":
            self._fn, self._impl = ring_attention, backend
        elif comm_type == "a2a" and a2a_head_groups == 1:
            self._fn, self._impl = ulysses_attention, attention_op(backend)
        elif comm_type == "a2a":
            self._fn, self._impl = grouped_ulysses_attention, (attention_op(backend), int(a2a_head_groups))
        else:
            self._fn, self._impl = hierarchical_attention, (int(hierarchical_sizes[0]), backend)

    def __call__(self, q, k, v, t_q, t_k, t_v, shard: TokenShard):
        if (t_q is None) != (t_k is None) or (t_k is None) != (t_v is None):
            raise ValueError("context-parallel self-attention needs all of t_q, t_k, t_v or none of them")
        if shard is None or shard.local_len != q.shape[0]:
            raise ValueError(
                f"context-parallel self-attention needs the TokenShard of this rank's {q.shape[0]} tokens "
                f"(got {shard})"
            )
        return self._fn(q, k, v, t_q, t_k, t_v, shard, self._impl)
