"""Context parallelism (CP): the patchified token sequence split across the CP group.

Legend: S tokens of the sample, S_pad = S rounded up to a multiple of CP x TP (TP only under sequence
parallelism), s = S_pad / CP tokens on this CP rank (s / TP of them on this TP rank between the
attention and FFN linears), B batch, P patch features, N heads, d head dim.

Layout: CP rank r holds the contiguous tokens [r s, (r + 1) s) of the padded sequence. Padding adds zero
tokens at the end of the sequence, so only the last rank(s) hold padding. Attention never masks: the
padded keys are sliced off K/V before the kernel (which accepts any key length), which is exact; the
padded query rows are computed and dropped when the output is gathered.

The CP group is Megatron's (``parallel_state.get_context_parallel_group``): at a fixed TP rank, the
ranks of one data-parallel replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = [
    "CP_COMM_TYPES",
    "TokenShard",
    "check_parallel_layout",
    "cp_group",
    "cp_rank",
    "cp_world_size",
    "gather_from_cp",
    "token_shard",
]

CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p")


def cp_world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def cp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_context_parallel_rank()


def cp_group():
    return parallel_state.get_context_parallel_group()


def hierarchical_cp_groups():
    """(level-0 group, level-1 group) of Megatron's ``hierarchical_context_parallel_sizes`` [A, R]: the A
    consecutive CP ranks of this rank (``cp_comm_type`` a2a+p2p: the all-to-all) and the R CP ranks c, c + A, ...
    (the ring). Raises when the parallel state was initialized without them."""
    groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not groups or len(groups) != 2:
        raise RuntimeError(
            "cp_comm_type 'a2a+p2p' needs the parallel state initialized with hierarchical_context_parallel_sizes "
            f"= [A, R] (two levels); found {0 if not groups else len(groups)} hierarchical CP groups"
        )
    return groups[0], groups[1]


def cp_global_ranks() -> list[int]:
    """Global ranks of this rank's CP group, in CP-rank order (the ring's order)."""
    return list(parallel_state.get_context_parallel_global_ranks())


@dataclass(frozen=True)
class TokenShard:
    """Which tokens of the (padded) sequence this CP rank holds."""

    seq_len: int
    """S, the valid tokens of the sample."""
    padded_len: int
    """S_pad >= S, a multiple of ``size`` (x TP under sequence parallelism)."""
    size: int
    """CP group size."""
    rank: int
    """This rank's index in the CP group."""

    @property
    def local_len(self) -> int:
        """s = S_pad / CP."""
        return self.padded_len // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    def valid_len(self, rank: int) -> int:
        """Valid (non-padding) tokens held by CP rank ``rank`` (0 when it holds only padding)."""
        return max(0, min(self.local_len, self.seq_len - rank * self.local_len))

    def shard(self, x_S: torch.Tensor) -> torch.Tensor:
        """[S, ...] (full sequence, same on every CP rank) -> this rank's [s, ...], zero-padded."""
        if x_S.shape[0] != self.seq_len:
            raise ValueError(f"token_shard: expected {self.seq_len} tokens on dim 0, got shape {tuple(x_S.shape)}")
        pad = self.padded_len - self.seq_len
        if pad:
            x_S = torch.cat([x_S, x_S.new_zeros(pad, *x_S.shape[1:])])
        return x_S[self.start : self.start + self.local_len]


def token_shard(seq_len: int, multiple_of: int = 1, size: int | None = None) -> TokenShard:
    """The shard of this CP rank for a sequence of ``seq_len`` tokens; the padded length is a multiple of
    CP x ``multiple_of`` (pass the TP size under sequence parallelism). ``size`` is the CP size the model
    was built for (default: the CP group's size); 1 gives the whole sequence (a CP=1 model, e.g. the
    one-GPU baseline of a benchmark, inside a CP process group)."""
    size = cp_world_size() if size is None else size
    if size not in (1, cp_world_size()):
        raise ValueError(f"token_shard: CP size {size} is neither 1 nor the CP group's size {cp_world_size()}")
    m = size * multiple_of
    padded = -(-seq_len // m) * m
    return TokenShard(seq_len=seq_len, padded_len=padded, size=size, rank=cp_rank() if size > 1 else 0)


class _GatherFromCP(torch.autograd.Function):
    """y = cat_r x_r on every CP rank; dL/dx_r = this rank's slice of dL/dy (the computation downstream of
    y is replicated on the CP ranks, so each one holds the whole gradient)."""

    @staticmethod
    def forward(ctx, x_s):
        size = cp_world_size()
        x_s = x_s.contiguous()
        parts = [torch.empty_like(x_s) for _ in range(size)]
        dist.all_gather(parts, x_s, group=cp_group())
        ctx.rank, ctx.n = cp_rank(), x_s.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_from_cp(x_s: torch.Tensor, shard: TokenShard) -> torch.Tensor:
    """This rank's [s, ...] -> the valid full sequence [S, ...] on every CP rank (padding dropped)."""
    if shard.size == 1:
        return x_s[: shard.seq_len]
    if torch.is_grad_enabled() and x_s.requires_grad:
        full = _GatherFromCP.apply(x_s)
    else:
        x_s = x_s.contiguous()
        parts = [torch.empty_like(x_s) for _ in range(shard.size)]
        dist.all_gather(parts, x_s, group=cp_group())
        full = torch.cat(parts)
    return full[: shard.seq_len]


def check_parallel_layout(world: int, tp: int, cp: int, pp: int, heads: int, comm_type: str,
                          hierarchical_sizes=None, a2a_head_groups=1) -> int:
    """Validate world = TP x CP x PP x DP and the CP attention's needs (``a2a_head_groups``:
    ``parallel.cp_a2a_head_groups``) before anything is built; returns DP. Raises ValueError naming the
    numbers that do not divide."""
    model_parallel = tp * cp * pp
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x CP x PP = {tp} x {cp} x {pp} = {model_parallel}; "
            "change the parallel sizes or the number of ranks"
        )
    if heads % tp:
        raise ValueError(f"{heads} attention heads are not divisible by tensor_parallel {tp}")
    if cp > 1:
        from megatron_rcm.parallel.cp_attention import check_cp_layout

        check_cp_layout(comm_type, cp, heads // tp, hierarchical_sizes, a2a_head_groups)
    return world // model_parallel
