"""Move full (unsharded) tensors into a tensor-parallel model and back.

Megatron marks TP-split parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; everything else is replicated on every TP rank. Full state dicts name a fused QKV
linear's tensors as the unfused q/k/v (``models.fused_qkv``: each rank's shard is [q_r; k_r; v_r]).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rcm.models.fused_qkv import fuse_full_state_dict, unfuse_full_state_dict


def _tp():
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict, strict: bool = True) -> None:
    """Copy full tensors into ``model``'s (possibly TP-sharded) parameters. With ``strict``, missing and
    unexpected keys are listed in a ``KeyError``, and a shape that does not match raises ``ValueError``."""
    tp, rank = _tp()
    params = dict(model.named_parameters())
    full = fuse_full_state_dict(full, params, tp)
    if strict:
        missing = sorted(set(params) - set(full))
        unexpected = sorted(set(full) - set(params))
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        if name not in full:
            continue
        value = full[name]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            dim = p.partition_dim
            if value.shape[dim] % tp:
                raise ValueError(
                    f"{name}: dim {dim} of shape {tuple(value.shape)} does not divide by TP {tp}"
                )
            value = value.chunk(tp, dim=dim)[rank]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: found shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))


@torch.no_grad()
def gather_full_state_dict(model: torch.nn.Module) -> dict:
    """All-gather TP shards into full tensors (on every rank)."""
    tp, _ = _tp()
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            value = torch.cat(parts, dim=p.partition_dim)
        out[name] = value.clone()
    return unfuse_full_state_dict(out, tp)
