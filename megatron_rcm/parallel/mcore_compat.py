"""Workarounds for megatron-core behaviour, in one place, each gated by the release that retires it.

Every workaround below was found on megatron-core 0.16.1 (the newest release for Python 3.11; the package
supports ``>=0.16.1,<0.20``). Each names the upstream behaviour and carries ``FIXED_IN``: the first release
known not to need it, or None while no checked release fixes it. ``applies(FIXED_IN)`` is False from that
release on, so setting ``FIXED_IN`` when upstream fixes the behaviour retires the workaround.

1. ``materialize_adamw_state``: ``DistributedOptimizer.state_dict`` (torch-optimizer path, no Apex/TE)
   asserts one common AdamW ``step`` over all parameters, also when *loading* (the load template is built
   from the state dict of a fresh, stateless optimizer).
2. ``load_states_around_step``: its loads copy every key of a parameter's state from the checkpoint's
   tensors, but ``step`` is restored from the param groups before that: the ``fully_reshardable`` tensors
   never carry ``step`` (KeyError 'step' on every resume), and the ``dp_reshardable`` ones carry the load
   template's own stale ``step`` (a non-persistent local object: every state's step went back to 0 on an H200,
   so Adam's bias correction restarted after a resume).
3. ``dealias_steps``: its load stores one ``step`` tensor object in every parameter's state; torch AdamW's
   foreach update then increments it once per parameter per step (Adam's bias correction runs away).
4. ``patch_psutil``: the async file writer logs process memory through psutil (an optional dependency).
5. ``file_results_queue``: the torch_dist writer hands its results through a queue served by a spawned
   ``multiprocessing.Manager`` process that outlives a killed trainer (``filesystem_async.
   _get_write_results_queue``); a file in the checkpoint's temporary folder replaces it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import queue
from pathlib import Path

import torch
from packaging.version import Version

CHECKED_UP_TO = Version("0.16.1")
"""The newest megatron-core release these workarounds were checked against."""

ADAMW_COMMON_STEP_FIXED_IN: str | None = None
LOAD_STEP_KEY_FIXED_IN: str | None = None
STEP_ALIASING_FIXED_IN: str | None = None
PSUTIL_REQUIRED_FIXED_IN: str | None = None
RESULTS_QUEUE_MANAGER_FIXED_IN: str | None = None


@functools.cache
def mcore_version() -> Version:
    import megatron.core

    return Version(megatron.core.__version__)


def applies(fixed_in: str | None) -> bool:
    """Whether a workaround is needed by the installed megatron-core (see the module docstring)."""
    return fixed_in is None or mcore_version() < Version(fixed_in)


# -- 1-3: DistributedOptimizer state with torch AdamW --------------------------------------------------
def _is_te_fused_adam(inner) -> bool:
    """Transformer Engine's FusedAdam (what megatron-core uses where TE is installed), told apart from torch
    AdamW by its own state API rather than by importing TE."""
    return hasattr(inner, "initialize_state") and hasattr(inner, "name_to_dtype_map")


@torch.no_grad()
def materialize_adamw_state(inner: torch.optim.Optimizer) -> None:
    """Give parameters without AdamW state (never stepped, or skipped because their grad was None) zero
    moments and the step count of the other parameters of ``inner``: for a never-stepped optimizer that is
    step 0, exactly AdamW's lazy first-step init; for a parameter skipped while others stepped, zero moments
    at step k are what AdamW holds for a parameter whose gradients were all zero. (1)"""
    if not applies(ADAMW_COMMON_STEP_FIXED_IN):
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    if _is_te_fused_adam(inner):
        # Transformer Engine installed: Megatron picks TE's FusedAdam, whose step lives in the param group and
        # whose state_dict() has no dtype for a per-parameter "step" (KeyError 'step' on an H200 when torch
        # AdamW's state was put there): give empty states FusedAdam's own zero moments instead
        for p in params:
            if len(inner.state[p]) == 0:
                inner.initialize_state(p, getattr(inner, "store_param_remainders", False))
        return
    steps = {float(inner.state[p]["step"]) for p in params if "step" in inner.state[p]}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the AdamW step: {sorted(steps)}")
    step = steps.pop() if steps else 0.0
    for p in params:
        if len(inner.state[p]) == 0:
            inner.state[p]["step"] = torch.tensor(step)
            inner.state[p]["exp_avg"] = torch.zeros_like(p)
            inner.state[p]["exp_avg_sq"] = torch.zeros_like(p)


def load_states_around_step(dist_opt) -> None:
    """Hold ``step`` aside while ``dist_opt`` copies a parameter's state tensors from a checkpoint, and copy
    no ``step`` from them (the step is set per state beforehand from the param groups). (2)"""
    if not applies(LOAD_STEP_KEY_FIXED_IN):
        return
    copy_states = dist_opt._set_main_param_and_optimizer_states

    def copy_states_keep_step(model_param, tensors):
        group_index, group_order = dist_opt.model_param_group_index_map[model_param]
        main_param = dist_opt.optimizer.param_groups[group_index]["params"][group_order]
        state = dist_opt.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            copy_states(model_param, {k: v for k, v in tensors.items() if k != "step"})
        finally:
            if step is not None:
                state["step"] = step

    dist_opt._set_main_param_and_optimizer_states = copy_states_keep_step


@torch.no_grad()
def dealias_steps(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter state its own ``step`` tensor; returns how many were shared: 3 -> 3 + N after one
    step with N parameters otherwise. (3) Harmless where nothing is shared, so it is not gated."""
    seen, shared = set(), 0
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.detach().clone()
                shared += 1
            seen.add(id(state["step"]))
    return shared


# -- 4-5: the torch_dist checkpoint writer ---------------------------------------------------------------
def patch_psutil() -> None:
    """Without psutil, report 0 (the value is only logged) instead of failing the save. (4)"""
    if not applies(PSUTIL_REQUIRED_FIXED_IN):
        return
    try:
        import psutil  # noqa: F401
    except ImportError:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._process_memory = lambda: 0


class FileResultsQueue:
    """The one-item queue through which Megatron's writer hands its results (or exception) to the trainer:
    ``put`` pickles to ``path`` (written beside it, then renamed: the reader never sees half a file),
    ``get_nowait`` reads and deletes it, ``queue.Empty`` if the writer has not put anything. (5)"""

    def __init__(self, path: Path):
        self.path = Path(path)

    def put(self, item) -> None:
        try:
            data = pickle.dumps(item)
        except Exception as err:  # noqa: BLE001 (an exception that does not pickle: keep its text)
            data = pickle.dumps(RuntimeError(f"{item!r} (not picklable: {err})"))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def get_nowait(self):
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise queue.Empty from None
        self.path.unlink()
        return pickle.loads(data)


@contextlib.contextmanager
def file_results_queue(path: Path | None):
    """Within the block, the torch_dist writer's results go through ``FileResultsQueue(path)``. (5) An
    in-memory pipe would not do: Megatron joins the writer before it reads the queue, and a writer blocks on
    exit until a full pipe is read."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    patch = (path is not None and applies(RESULTS_QUEUE_MANAGER_FIXED_IN)
             and hasattr(filesystem_async, "_get_write_results_queue"))
    if patch:
        original = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = lambda: FileResultsQueue(path)
    try:
        yield
    finally:
        if patch:
            filesystem_async._get_write_results_queue = original
