"""Ulysses with its all-to-all split over G head groups and overlapped with the attention
(``parallel.cp_a2a_head_groups: G`` > 1; G = 1 is ``cp_attention._ulysses``, unchanged).

Legend: s tokens on this CP rank (S_pad = cp s, the first S valid), B batch, N heads on this TP rank,
N_c = N / cp heads per CP rank after the all-to-all, G head groups, n = N_c / G heads per group, d head dim,
X parts moved by one all-to-all (q, k, v [+ t_q, t_k, t_v] in; o [+ t_o] out).

Head order as in the G = 1 path: CP rank j owns heads [j N_c, (j + 1) N_c). Group g is heads
j N_c + [g n, (g + 1) n) of every rank j, i.e. index g of [s, B, N, d] viewed as [s, B, cp, G, n, d].
Attention heads are independent, so per group: one all-to-all in (its X parts), the attention of its n heads
over the whole sequence, one all-to-all out; the groups' results are exactly the G = 1 ones.

Schedule (forward), ``in_g`` / ``out_g`` asynchronous all-to-alls (``async_op=True``)::

    pack every group's send buffer (one copy, as G = 1); start in_0
    for g in 0 .. G-1:  start in_{g+1};  wait in_g;  attention_g;  pack + start out_g
    wait out_0 .. out_{G-1}, each copied into [s, B, N, d] (one copy, as G = 1)

so in_{g+1} and out_{g-1} travel while attention_g runs. Stream semantics (CUDA): NCCL runs the work on its
own stream; ``work.wait()`` makes the current (compute) stream wait for it. A receive buffer is read only
after its wait; every send and receive buffer stays referenced by its ``_Pending`` until that wait, so the
caching allocator cannot hand it to other compute-stream work while NCCL still uses it.

Backward: the inverse all-to-alls, synchronous: one for the input direction (all groups' dq, dk, dv at once,
the G = 1 layout), one per group for the output direction. Tangents carry no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rcm.parallel.context import TokenShard

__all__ = ["check_head_groups", "grouped_ulysses", "pack_by_destination"]


def pack_by_destination(parts_SBnd, cp: int) -> torch.Tensor:
    """X tensors [cp*s, B, n, d] copied once into one all-to-all send buffer [cp (destination = sequence chunk),
    s, X, B, n, d]."""
    S, B, n, d = parts_SBnd[0].shape
    s = S // cp
    send = parts_SBnd[0].new_empty(cp, s, len(parts_SBnd), B, n, d)
    for i, y in enumerate(parts_SBnd):
        send[:, :, i].copy_(y.reshape(cp, s, B, n, d))
    return send


def check_head_groups(groups, heads_per_cp_rank: int, cp: int, heads_per_tp_rank: int) -> None:
    """Raise ValueError (naming the numbers) unless G = ``groups`` divides the heads per CP rank."""
    if isinstance(groups, bool) or int(groups) != groups or groups < 1:
        raise ValueError(f"cp_a2a_head_groups must be a positive integer, got {groups!r}")
    if heads_per_cp_rank % groups:
        raise ValueError(
            f"cp_a2a_head_groups {groups} must divide the heads per CP rank: {heads_per_tp_rank} heads per "
            f"tensor-parallel rank / context_parallel {cp} = {heads_per_cp_rank} heads, not divisible by "
            f"{groups}; pick a divisor of {heads_per_cp_rank}"
        )


class _Pending:
    """An all-to-all in flight: its work handle and the buffers it reads and writes (kept alive until waited)."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor, group):
        self.send, self.recv = send, recv
        self.work = dist.all_to_all_single(recv, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        recv, self.send, self.recv, self.work = self.recv, None, None, None
        return recv


class _HeadGroups:
    """Buffers and in-flight work of one grouped Ulysses call (the schedule of the module docstring)."""

    def __init__(self, cp: int, G: int, group):
        self.cp, self.G, self.group = cp, G, group
        self.pending_in: list[_Pending | None] = [None] * G
        self.pending_out: list[_Pending | None] = [None] * G

    # -- input direction: [s, B, N, d] -> per group [S_pad, B, n, d] ---------------------------------------
    def pack_in(self, parts_sBNd) -> list[list[torch.Tensor]]:
        """Fill every group's send buffer [cp (destination), s, X, B, n, d] and allocate its receive buffer
        [cp (source) * s, X, B, n, d]; returns per group the X parts [S_pad, B, n, d] as strided views of the
        receive buffer (read them only after ``wait_in(g)``)."""
        cp, G = self.cp, self.G
        X = len(parts_sBNd)
        s, B, N, d = parts_sBNd[0].shape
        n = N // (cp * G)
        send = parts_sBNd[0].new_empty(G, cp, s, X, B, n, d)
        for i, x in enumerate(parts_sBNd):
            send[:, :, :, i].copy_(x.reshape(s, B, cp, G, n, d).permute(3, 2, 0, 1, 4, 5))
        self.send_in = send
        self.recv_in = [torch.empty_like(send[g]) for g in range(G)]  # one tensor per group: its own version
        return [[r.view(cp * s, X, B, n, d)[:, i] for i in range(X)] for r in self.recv_in]

    def start_in(self, g: int) -> None:
        # the buffers are held by the _Pending until its wait (then the receive buffer by its views): this
        # object lives on in autograd's ctx and must not pin them through the backward
        self.pending_in[g] = _Pending(self.send_in[g], self.recv_in[g], self.group)
        self.recv_in[g] = None
        if g == self.G - 1:
            self.send_in = None

    def wait_in(self, g: int) -> None:
        self.pending_in[g].wait()
        self.pending_in[g] = None

    # -- output direction: per group [S_pad, B, n, d] -> [s, B, N, d] ---------------------------------------
    def start_out(self, g: int, parts_SBnd) -> list[torch.Tensor]:
        """Send group g's X outputs back (send buffer [cp (destination = sequence chunk), s, X, B, n, d]);
        returns the X parts of its receive buffer [cp (source = head block), s, B, n, d] (unfilled until
        ``assemble``)."""
        send = pack_by_destination(parts_SBnd, self.cp)
        X = send.shape[2]
        recv = torch.empty_like(send)
        self.pending_out[g] = _Pending(send, recv, self.group)
        return [recv[:, :, i] for i in range(X)]

    def assemble(self, slots) -> list[torch.Tensor]:
        """``slots[g][i]`` [cp, s, B, n, d] (from ``start_out``) -> X tensors [s, B, N, d]: each group's copy
        right after its wait."""
        G, X = self.G, len(slots[0])
        cp, s, B, n, d = slots[0][0].shape
        out = [slots[0][0].new_empty(s, B, cp, G, n, d) for _ in range(X)]
        for g in range(G):
            self.pending_out[g].wait()
            self.pending_out[g] = None
            for i in range(X):
                out[i][:, :, :, g].copy_(slots[g][i].permute(1, 2, 0, 3, 4))
        return [o.view(s, B, cp * G * n, d) for o in out]


def _grads_heads_to_seq(grads, cp: int, G: int, group) -> list[torch.Tensor]:
    """Backward of the input direction, all groups in one synchronous all-to-all: ``grads[i][g]``
    [S_pad, B, n, d] -> per part [s, B, N, d] (the G = 1 layout ``_heads_to_seq`` with N_c = G n)."""
    X = len(grads)
    S, B, n, d = grads[0][0].shape
    s = S // cp
    send = grads[0][0].new_empty(cp, s, X, B, G, n, d)
    for i, per_group in enumerate(grads):
        for g, y in enumerate(per_group):
            send[:, :, i, :, g].copy_(y.reshape(cp, s, B, n, d))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out = recv.permute(1, 2, 3, 0, 4, 5, 6)  # [s, X, B, cp, G, n, d]
    return [out[:, i].reshape(s, B, cp * G * n, d) for i in range(X)]


class _PackIn(torch.autograd.Function):
    """parts (X of [s, B, N, d]) -> G x X views [S_pad, B, n, d] of the receive buffers, group-major (filled
    by ``start_in`` / ``wait_in`` outside autograd). The first ``n_grad`` parts (q, k, v) carry gradients, the
    tangents none. Backward: the inverse all-to-all of the gradients (the same parts on every rank: the
    same graph)."""

    @staticmethod
    def forward(ctx, sched: _HeadGroups, n_grad: int, *parts):
        ctx.sched, ctx.n_grad, ctx.X = sched, n_grad, len(parts)
        ctx.set_materialize_grads(False)
        views = [v for per_group in sched.pack_in(parts) for v in per_group]  # g-major
        ctx.mark_non_differentiable(*[v for j, v in enumerate(views) if j % ctx.X >= n_grad])
        return tuple(views)

    @staticmethod
    def backward(ctx, *grads):
        sched, X, G = ctx.sched, ctx.X, ctx.sched.G
        have = [i for i in range(ctx.n_grad) if any(grads[g * X + i] is not None for g in range(G))]
        per_part = []
        for i in have:
            gs = [grads[g * X + i] for g in range(G)]
            ref = next(x for x in gs if x is not None)
            per_part.append([torch.zeros_like(ref) if x is None else x for x in gs])
        moved = _grads_heads_to_seq(per_part, sched.cp, G, sched.group) if have else []
        out = [None] * X
        for i, x in zip(have, moved):
            out[i] = x
        return (None, None, *out)


class _StartOut(torch.autograd.Function):
    """Group g's (o [, t_o]) [S_pad, B, n, d] -> its receive slots [cp, s, B, n, d] (in flight). Backward:
    the inverse all-to-all of d(o slot)."""

    @staticmethod
    def forward(ctx, sched: _HeadGroups, g: int, o, *tangent):
        ctx.sched, ctx.n_tangent = sched, len(tangent)
        ctx.set_materialize_grads(False)
        slots = sched.start_out(g, [o, *tangent])
        ctx.mark_non_differentiable(*slots[1:])
        return tuple(slots)

    @staticmethod
    def backward(ctx, grad_o, *_):
        none = (None,) * ctx.n_tangent
        if grad_o is None:
            return (None, None, None, *none)
        cp, s, B, n, d = grad_o.shape
        recv = torch.empty(cp * s, B, n, d, dtype=grad_o.dtype, device=grad_o.device)
        dist.all_to_all_single(recv, grad_o.contiguous(), group=ctx.sched.group)
        return (None, None, recv, *none)


class _Assemble(torch.autograd.Function):
    """G x X receive slots -> X tensors [s, B, N, d] (waits each group's all-to-all). Backward: the slots'
    gradients are views of d(o) [s, B, cp, G, n, d], no copy."""

    @staticmethod
    def forward(ctx, sched: _HeadGroups, X: int, *slots):
        ctx.G, ctx.X, ctx.cp = sched.G, X, sched.cp
        ctx.set_materialize_grads(False)
        out = sched.assemble([slots[g * X : (g + 1) * X] for g in range(sched.G)])
        ctx.mark_non_differentiable(*out[1:])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_o, *_):
        G, X, cp = ctx.G, ctx.X, ctx.cp
        grads = [None] * (G * X)
        if grad_o is not None:
            s, B, N, d = grad_o.shape
            grad_o = grad_o.view(s, B, cp, G, N // (cp * G), d)
            for g in range(G):
                grads[g * X] = grad_o[:, :, :, g].permute(2, 0, 1, 3, 4)  # [cp, s, B, n, d]
        return (None, None, *grads)


def grouped_ulysses(q, k, v, t_q, t_k, t_v, shard: TokenShard, attn, cp: int, group, G: int, scale=None,
                    phase=None):
    """Ulysses over ``group`` with the all-to-alls of G head groups overlapped with the attention (module
    docstring). In and out [s, B, N, d]; ``phase(name, device)`` a timing context (``cp_attention._phase``):
    ``a2a/all_to_all`` covers packing, starting and waiting, ``a2a/attention`` the attention."""
    with_tangent = t_q is not None
    parts = [q, k, v] + ([t_q.detach(), t_k.detach(), t_v.detach()] if with_tangent else [])
    X = len(parts)
    S = shard.seq_len
    sched = _HeadGroups(cp, G, group)
    autograd = torch.is_grad_enabled() and any(x.requires_grad for x in parts)
    with phase("a2a/all_to_all", q.device):
        if autograd:
            flat = _PackIn.apply(sched, 3, *parts)
            full = [flat[g * X : (g + 1) * X] for g in range(G)]
        else:
            full = sched.pack_in(parts)
        sched.start_in(0)
    slots = []
    for g in range(G):
        with phase("a2a/all_to_all", q.device):
            if g + 1 < G:
                sched.start_in(g + 1)  # travels while group g's attention runs
            sched.wait_in(g)
        f = full[g]
        t = (f[3].detach(), f[4][:S].detach(), f[5][:S].detach()) if with_tangent else (None,) * 3
        with phase("a2a/attention", q.device):
            o, t_o = attn(f[0], f[1][:S], f[2][:S], *t, softmax_scale=scale)  # padded keys sliced off: exact
        out_parts = [o] + ([t_o.to(o.dtype).detach()] if with_tangent else [])
        with phase("a2a/all_to_all", q.device):
            if autograd:
                slots.append(_StartOut.apply(sched, g, *out_parts))
            else:
                slots.append(sched.start_out(g, out_parts))
    with phase("a2a/all_to_all", q.device):
        if autograd:
            out = _Assemble.apply(sched, len(slots[0]), *[x for per_group in slots for x in per_group])
        else:
            out = sched.assemble(slots)
    return out[0], (out[1].detach() if with_tangent else None)
