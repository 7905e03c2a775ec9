"""Run Megatron-Core's CUDA-hard-coded paths on CPU over gloo.

Megatron-Core allocates buffers with ``device=torch.cuda.current_device()``, builds its RNG tracker on
CUDA generators and calls ``torch.cuda.synchronize`` / streams in DDP and checkpointing. On a CPU-only
machine (CI, the quickstart) ``enable_cpu_compat()`` installs:

* a ``TorchFunctionMode`` that rewrites any ``device=`` argument naming CUDA to ``"cpu"``;
* stubs for ``torch.cuda.current_device/synchronize/current_stream/stream/...``;
* a CPU RNG tracker in place of Megatron's CUDA one.

It is a no-op when CUDA is available. DistributedOptimizer and ``clip_grads`` still assert CUDA tensor
types and are exercised on the GPU machine only.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every ``device=cuda*`` keyword (and ``Tensor.cuda()``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func in (torch.Tensor.to,) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *_a, **_k):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def record_event(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None


class _CpuRNGTracker:
    """Minimal stand-in for ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker`` on CPU."""

    def __init__(self):
        self.states_ = {}

    def is_initialized(self):
        return True

    def reset(self):
        self.states_ = {}

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            self.add(name, 1234)
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_TRACKER = _CpuRNGTracker()


def enable_cpu_compat() -> bool:
    """Install the CPU shims once per process. Returns True when they are active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    # "cpu", not 0: buffers allocated with device=current_device() inside autograd backward (where the
    # function mode is not active) must land on the CPU too.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.get_cuda_rng_tracker = lambda *a, **k: _TRACKER
    mcore_random._CUDA_RNG_STATE_TRACKER = _TRACKER
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.model_parallel_cuda_manual_seed = lambda seed, *a, **k: _TRACKER.add(
        "model-parallel-rng", seed
    )
    mode = _CudaToCpuMode()
    mode.__enter__()
    _ENABLED = True
    return True
