"""Per-phase step timers: off by default (a no-op context), on for the step benchmark.

    timers = PhaseTimers(enabled=True)
    with timers("backward"):
        loss.backward()
    timers.collect()  -> {"backward": seconds, ...} accumulated since the last collect

On CUDA each phase records a pair of CUDA events on the current stream (no synchronization inside the
step); ``collect`` synchronizes once and reads them. On CPU it reads ``time.perf_counter``. Phases do
not nest: a phase entered while another is open is counted in the outer one (a student forward inside
the "teacher_forward" phase never happens, but a rollout's ``forward_jvp`` inside ``forward`` does).

``instrument_network`` labels every call of a network's ``forward`` / ``forward_jvp`` with a phase
name, so the engine's network calls are timed without touching the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

__all__ = ["PhaseTimers", "cuda_time_ms", "instrument_network"]


class PhaseTimers:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._open: str | None = None
        self._pending: list[tuple[str, object, object]] = []
        self._totals: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        if not self.enabled or self._open is not None:
            return contextlib.nullcontext()
        return self._phase(name)

    @contextlib.contextmanager
    def _phase(self, name: str):
        self._open = name
        cuda = torch.cuda.is_available()
        start = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            start.record()
        try:
            yield
        finally:
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            self._pending.append((name, start, end))
            self._open = None

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (synchronizes the device once)."""
        if self._pending and torch.cuda.is_available():
            torch.cuda.synchronize()
        for name, start, end in self._pending:
            self._totals[name] += start.elapsed_time(end) / 1e3 if hasattr(start, "elapsed_time") else end - start
        self._pending.clear()
        out, self._totals = dict(self._totals), defaultdict(float)
        return out


def instrument_network(net: torch.nn.Module, timers: PhaseTimers, forward: str, forward_jvp: str | None = None):
    """Time ``net``'s ``forward`` as phase ``forward`` and ``forward_jvp`` as ``forward_jvp`` (instance
    attributes shadow the class methods; wrappers such as DDP reach them through ``.module``)."""
    while not hasattr(net, "forward_jvp") and hasattr(net, "module"):
        net = net.module
    for attr, phase in (("forward", forward), ("forward_jvp", forward_jvp)):
        if phase is None or not hasattr(net, attr):
            continue
        fn = getattr(net, attr)

        def timed(*args, _fn=fn, _phase=phase, **kwargs):
            with timers(_phase):
                return _fn(*args, **kwargs)

        setattr(net, attr, timed)


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Mean milliseconds of ``fn()`` on the current CUDA stream: ``warmup`` untimed calls, then ``iters``
    calls between one pair of CUDA events (the kernel benchmarks in ``tools/``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
