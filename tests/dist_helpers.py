"""Spawn gloo/NCCL worker processes from a test and collect rank 0's result.

Workers are plain module-level functions ``fn(rank, world_size, *args)``; whatever rank 0 returns is
passed back through a temporary file. Spawned children import the test module by name, never run it
as ``__main__`` (Megatron's checkpoint writer helper process hangs otherwise).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from megatron_rcm.parallel.state import free_port


def _entry(rank, fn, world_size, port, out_path, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    if rank == 0:
        torch.save(result, out_path)


def spawn(fn, world_size: int, *args):
    """Run ``fn`` on ``world_size`` processes; return rank 0's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_path, args), nprocs=world_size, join=True)
        return torch.load(out_path, weights_only=False)


COMPARED = ("loss/", "grad_norm/", "scm/g_norm", "dmd/weight")
"""The per-step metrics a parallel trainer run must reproduce from its one-process reference."""


def history_errors(ref_hist, got_hist, prefixes=COMPARED) -> dict:
    """``"step i key" -> |a - b| / |a|`` for every compared metric of every step; asserts that both runs logged
    the same compared keys at each step."""
    errs = {}
    for i, (a, b) in enumerate(zip(ref_hist, got_hist)):
        keys = sorted(k for k in a if k.startswith(prefixes))
        assert keys == sorted(k for k in b if k.startswith(prefixes)), i
        errs.update({f"step {i} {k}": abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in keys})
    return errs


def reduced_full_grads(model) -> dict:
    """The whole model's parameter gradients after the reductions DDP would do: sequence-parallel parameters'
    gradients summed over TP, and every gradient over CP (each CP rank holds its tokens' share), then gathered
    to full (unsharded) tensors. Leaves the parameters as they were."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rcm.parallel.sharding import gather_full_state_dict

    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            dist.all_reduce(p.grad, group=ps.get_context_parallel_group())
    saved = {n: p.data for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data = p.grad
    grads = gather_full_state_dict(model)
    for n, p in model.named_parameters():
        p.data = saved[n]
    return grads


def gather_sequence(tensors, world: int, S: int) -> list:
    """Each rank's sequence shard (dim 0) of every tensor all-gathered over the default group into the full
    sequence, cut to its S valid rows (the last shard may be padded); None entries stay None."""
    out = []
    for x in tensors:
        if x is None:
            out.append(None)
            continue
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        out.append(torch.cat(parts)[:S])
    return out

