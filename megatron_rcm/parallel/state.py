"""Start and stop torch.distributed + Megatron-Core ``parallel_state`` on GPU (NCCL) or CPU (gloo)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_rcm.parallel.cpu_compat import enable_cpu_compat


def free_port() -> int:
    """A TCP port that is free on this machine now (single-process rendezvous, test process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    hierarchical_context_parallel_sizes: list[int] | None = None,
    virtual_pipeline: int = 1,
) -> None:
    """Initialize the default process group (from torchrun/Slurm env vars or as a single process) and
    Megatron's model-parallel groups. Raises ValueError when the world size does not factor.
    ``hierarchical_context_parallel_sizes`` [A, R] (A x R = context_parallel): Megatron's two-level CP groups
    that ``cp_comm_type: a2a+p2p`` runs on. ``virtual_pipeline`` > 1: Megatron's virtual pipeline size (its
    schedules then interleave the model chunks)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        enable_cpu_compat()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ValueError("MASTER_PORT is not set for a multi-process run (torchrun/srun set it)")
            os.environ["MASTER_PORT"] = str(free_port())  # concurrent single runs must not collide
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=10))
    world = dist.get_world_size()
    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {tensor_parallel}*{pipeline_parallel}*"
            f"{context_parallel} = {model_parallel}; change the parallel sizes or the number of ranks"
        )
    hcp = list(hierarchical_context_parallel_sizes or []) or None
    if hcp is not None and (len(hcp) != 2 or hcp[0] * hcp[1] != context_parallel):
        raise ValueError(
            f"hierarchical_context_parallel_sizes {hcp} must be two sizes [A, R] with A x R = context_parallel "
            f"{context_parallel}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            context_parallel_size=context_parallel,
            hierarchical_context_parallel_sizes=hcp,
            virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
            create_gloo_process_groups=True,  # DistributedOptimizer checkpointing needs them
        )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
