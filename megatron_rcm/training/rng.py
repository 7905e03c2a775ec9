"""Capture and restore every random-number state a training step consumes (for exact resume)."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """python, numpy, torch CPU, CUDA (all devices, when present), Megatron's model-parallel RNG tracker
    and the trainer's own generator."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global state is what libraries use)
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": None if generator is None else generator.get_state(),
        "generator_device": None if generator is None else str(generator.device),
    }
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except (ImportError, AssertionError, RuntimeError):
        state["megatron_tracker"] = None
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if state.get("megatron_tracker") is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
