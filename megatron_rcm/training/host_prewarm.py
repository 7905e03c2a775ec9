"""Pinned host memory warmed before the first checkpoint save (``checkpoint.prewarm_host_memory``, issue 13).

An asynchronous save stops training while Megatron's preload copies every tensor the rank writes to host
memory (megatron-core 0.16.1, ``FileSystemWriterAsync.preload_tensors``: ``tensor.to("cpu",
non_blocking=True)`` per tensor, which allocates pinned memory). The first save of a Wan 1.3B rCM run (45 GB)
stalled 36.6 s in that copy, the second 0.96 s: the first pays for fresh pinned memory, the second finds
PyTorch's cached blocks. This module pays for them in a background thread before the first save.

PyTorch's pinned-memory cache (torch 2.13, ``ATen/core/CachingHostAllocator.h``, ``allocate`` / ``free`` /
``get_free_block``):
  * a request of ``n`` bytes is rounded up to ``PowerOf2Ceil(n)`` (``pinned_max_round_threshold`` and
    ``pinned_max_cached_size`` default to SIZE_MAX: every size is rounded and cached);
  * it is served by any cached free block of exactly that size (one free list per power of two, indexed by
    ``Log2_64_Ceil``; blocks are never split nor merged), else by a new ``cudaHostAlloc``;
  * a freed block used by no stream goes straight back to its free list (one used by a copy goes back once
    its event has completed).
So the preload finds a cached block for every tensor iff, for each power of two ``b``, the cache holds as
many free blocks of ``b`` bytes as the preload has tensors of ``b/2 < nbytes <= b`` bytes (it holds them
all at once). The warm-up allocates exactly those blocks (``torch.empty(b, uint8, pin_memory=True)``, all
held together, so that none is served twice), then frees them into the cache: the same pinned memory the
first save would have allocated, allocated earlier. ``torch.empty`` releases the GIL (generated Python
bindings drop it around the dispatch), so ``cudaHostAlloc`` and its page pinning run beside training.

Sizes come from the trainer's sharded state dict (``ShardedTensor.data`` on the GPU: the tensors the
preload copies). The optimizer's moments appear only after a network's first step (AdamW's lazy state):
``PrewarmTrigger`` watches a cheap signature each step (which optimizers have state for all their
parameters) and builds a state dict only when it changes: at most once per optimizer plus once for the
networks, never per step (the critic steps only after the warm-up phase: its moments are warmed then). The
allocator returns the blocks warmed earlier at once, so each warm-up pays only for the new ones. Nothing is warmed once a save
has started (the save's own blocks are then in the cache or in flight).

Scope: the rank writes every tensor of its state dict only when the save's data-parallel (with context)
group has one rank; in a larger group Megatron's fully parallel save spreads the replicated tensors over it
with a collective at save time, so the trainer does not warm (it would pin up to DP times too much).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger("megatron_rcm.train")


def pow2_ceil(nbytes: int) -> int:
    """``c10::llvm::PowerOf2Ceil``: the smallest power of two >= ``nbytes`` (``nbytes`` >= 1)."""
    return 1 << (nbytes - 1).bit_length()


def _walk(obj) -> Iterable:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def preload_sizes(sharded_state_dict: dict, device_type: str = "cuda") -> list[int]:
    """Bytes of each host copy Megatron's preload makes of ``sharded_state_dict`` on this rank: every
    ``ShardedTensor`` whose data lives on ``device_type`` (``tensor.to("cpu")`` allocates ``numel *
    element_size`` bytes, whatever the strides). Factories (``ShardedTensorFactory``) build their tensors at
    save time: raises, so that an unwarmed tensor is not silently missed."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sizes = []
    for item in _walk(sharded_state_dict):
        if isinstance(item, ShardedTensorFactory):
            raise NotImplementedError(f"host memory warm-up: the state dict holds a ShardedTensorFactory "
                                      f"({item.key}), whose tensors exist only at save time; set "
                                      "checkpoint.prewarm_host_memory=false")
        if isinstance(item, ShardedTensor) and isinstance(item.data, torch.Tensor) \
                and item.data.device.type == device_type and item.data.numel() > 0:
            sizes.append(item.data.numel() * item.data.element_size())
    return sizes


def pinned_block_counts(sizes: Iterable[int]) -> Counter:
    """``{block bytes: count}``: the cached pinned blocks that serve requests of ``sizes`` bytes all at once."""
    return Counter(pow2_ceil(n) for n in sizes if n > 0)


def optimizer_state_counts(opt) -> tuple[int, int]:
    """``(parameters with optimizer state, parameters)`` of a ``CpuAdamW`` or ``MegatronOptimizer`` (its torch
    optimizers, inside Megatron's (Distributed)Optimizers and ChainedOptimizer): a few hundred dict look-ups."""
    inner = opt.optimizer
    torch_opts = [getattr(o, "optimizer", o) for o in getattr(inner, "chained_optimizers", [inner])]
    params = [p for o in torch_opts for g in o.param_groups for p in g["params"]]
    with_state = sum(1 for o in torch_opts for g in o.param_groups for p in g["params"] if o.state.get(p))
    return with_state, len(params)


def _allocate_pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class HostMemoryPrewarmer:
    """Fills PyTorch's pinned-memory cache with blocks in a background thread. ``request(counts)`` returns at
    once; the thread allocates up to the union (per size, the max) of all counts requested, holding them all,
    then frees them into the cache. ``finish`` waits for it and ends warming (called before the first save)."""

    def __init__(self, device: torch.device, allocate: Callable[[int], torch.Tensor] = _allocate_pinned):
        self.device = device
        self._allocate = allocate
        self._lock = threading.Lock()
        self._target: Counter = Counter()  # blocks wanted in the cache
        self.warmed: Counter = Counter()  # blocks put in the cache (allocated together once)
        self._thread: threading.Thread | None = None
        self.finished = False
        self.seconds = 0.0  # time the thread spent allocating
        self.error: BaseException | None = None

    def request(self, counts: Counter) -> None:
        with self._lock:
            if self.finished:
                return
            self._target = self._target | counts
            if self._target != self.warmed and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pinned-memory-warmup", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # per thread: no context on another GPU
            while True:
                with self._lock:
                    target = Counter(self._target)
                    if target == self.warmed:
                        self._thread = None
                        return
                t0 = time.perf_counter()
                held = [self._allocate(size) for size, n in sorted(target.items()) for _ in range(n)]
                del held  # every block back into the cache (no stream used them)
                self.seconds += time.perf_counter() - t0
                with self._lock:
                    self.warmed = target
        except BaseException as err:  # noqa: BLE001 (out of pinned memory must not kill training: the save allocates)
            self.error = err
            logger.warning("pinned host memory warm-up failed (%s: %s); the first checkpoint save allocates its "
                           "own", type(err).__name__, err)
        finally:
            with self._lock:
                if self._thread is me:
                    self._thread = None

    def wait(self) -> None:
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return
            thread.join()

    def finish(self) -> None:
        """Wait for the warm-up in flight; request nothing more."""
        with self._lock:
            self.finished = True
        self.wait()


class PrewarmTrigger:
    """Decides, once per training step, whether to warm. ``signature()`` (cheap): ``{optimizer name:
    (parameters with state, parameters)}``. When the set of optimizers with state for every parameter changes,
    build the state dict with ``build(names)`` (the networks, the EMA and those optimizers only: building an
    optimizer's part without its state would materialize the state) and request its blocks."""

    def __init__(self, prewarmer: HostMemoryPrewarmer, signature: Callable[[], dict[str, tuple[int, int]]],
                 build: Callable[[tuple[str, ...]], dict], device_type: str = "cuda"):
        self.prewarmer, self.signature, self.build, self.device_type = prewarmer, signature, build, device_type
        self._last = None
        self.builds = 0

    def step(self) -> None:
        if self.prewarmer.finished:
            return
        full = tuple(sorted(name for name, (with_state, total) in self.signature().items() if with_state == total))
        if full == self._last:
            return
        self._last = full
        self.builds += 1
        self.prewarmer.request(pinned_block_counts(preload_sizes(self.build(full), self.device_type)))
