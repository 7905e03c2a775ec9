"""Tensor-parallel collectives whose autograd matches how the model uses them.

Megatron's ``reduce_from_tensor_model_parallel_region`` has an identity backward because what follows
it is replicated on every TP rank. The q/k RMSNorm across heads is different: the all-reduced sum of
squares normalizes each rank's *own* head shard, so each rank holds a different part of the gradient
of that sum, and the backward must all-reduce as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every rank; dL/dx_r = sum_r dL_r/dy (downstream differs per rank)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def all_reduce_sum_tp(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group of a quantity each rank uses for its own, non-replicated shard."""
    if tp_world_size() == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllReduceSum.apply(x)
    x = x.clone()
    dist.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
    return x


def scatter_sequence(x_SBH: torch.Tensor) -> torch.Tensor:
    """[S, B, H] -> this rank's [S/tp, B, H] (backward: all-gather)."""
    if tp_world_size() == 1:
        return x_SBH
    return mappings.scatter_to_sequence_parallel_region(x_SBH)


def gather_sequence(x_SBH: torch.Tensor) -> torch.Tensor:
    """[S/tp, B, H] -> [S, B, H] on every rank (backward: split, the downstream is replicated)."""
    if tp_world_size() == 1:
        return x_SBH
    return mappings.gather_from_sequence_parallel_region(x_SBH, tensor_parallel_output_grad=False)
