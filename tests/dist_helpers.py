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
