"""Atomic, rotating Megatron ``dist_checkpointing`` checkpoints.

Layout under ``root``::

    step_00000100/        one complete checkpoint (Megatron dist_checkpointing format + meta.json)
    step_00000200/
    latest                text file naming the newest complete checkpoint ("step_00000200")
    .tmp-step_00000300/   a save in progress (or left by a crash: ignored and removed on the next save)

Save protocol (every rank takes part; rank 0 does the renames):
  1. write everything into ``.tmp-step_N`` (``dist_checkpointing.save``), then ``meta.json``;
  2. fsync every file and directory of it (every rank, for shared file systems);
  3. rename ``.tmp-step_N`` -> ``step_N`` and fsync ``root`` (rename is atomic on POSIX);
  4. write ``latest.tmp``, fsync, rename to ``latest``, fsync ``root``;
  5. delete the oldest ``step_*`` beyond ``keep_last``.
A crash before 3 leaves only a ``.tmp-`` directory; a crash between 3 and 4 leaves ``latest`` on the
previous good checkpoint. Either way the last good checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

_STEP_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
META = "meta.json"


def _patch_megatron_psutil() -> None:
    """Megatron's async file writer logs process memory through psutil, which is not a dependency of
    this package: without psutil report 0 (the value is only logged) instead of failing the save."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._process_memory = lambda: 0


# -- writer processes die with the trainer ------------------------------------------------------------
# megatron-core 0.16.1's torch_dist save (``FileSystemWriterAsync.write_preloaded_data_multiproc`` in
# ``dist_checkpointing/strategies/filesystem_async.py``) forks one writer process per file bucket, and
# collects their results through a queue served by a spawned ``multiprocessing.Manager`` process that lives
# as long as the trainer. A trainer killed by SIGKILL left both behind for good (a forked writer holds a
# copy of the trainer's memory: ~2.8 GB RSS each for a 67M-parameter model). While ``CheckpointManager``
# saves, (1) every process forked by the saving process asks the kernel for SIGKILL when its parent dies
# (``prctl(PR_SET_PDEATHSIG)``), and (2) the results queue is an in-process ``queue.Queue``: our saves are
# synchronous, so the writers' results are put and read by the trainer process itself and no Manager is
# started. (2) retires when Megatron drops ``_get_write_results_queue``; (1) stays useful for any writer.
_PR_SET_PDEATHSIG = 1
_saving_pid: int | None = None  # pid of the process inside CheckpointManager.save, else None


def _die_with_parent_after_fork() -> None:
    """``os.register_at_fork(after_in_child=...)``: in a process forked during a save, SIGKILL on the
    parent's death. The death signal follows the forking *thread*; saves fork from the thread calling
    ``save``, which outlives the writers."""
    global _saving_pid
    parent = _saving_pid
    if parent is None or sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        os.write(2, f"checkpoint writer {os.getpid()}: prctl(PR_SET_PDEATHSIG) failed, errno "
                    f"{ctypes.get_errno()}; it will not die with the trainer\n".encode())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    _saving_pid = os.getpid()  # processes this writer forks die with it in turn


os.register_at_fork(after_in_child=_die_with_parent_after_fork)


@contextlib.contextmanager
def _writers_die_with_trainer():
    """Scope of a synchronous ``dist_checkpointing.save``: see the comment above ``_PR_SET_PDEATHSIG``."""
    global _saving_pid
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    patch_queue = hasattr(filesystem_async, "_get_write_results_queue")
    if patch_queue:
        original = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = queue.Queue
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None
        if patch_queue:
            filesystem_async._get_write_results_queue = original


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and every directory including ``path``."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last
        _patch_megatron_psutil()

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (``step_*`` with ``meta.json``), oldest first."""
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.iterdir() if _STEP_RE.match(p.name) and (p / META).is_file()]
        return sorted(out, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to (validated), else None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not _STEP_RE.match(name) or not (path / META).is_file():
            raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint in {self.root}")
        return path

    def save(self, step: int, sharded_state_dict: dict, meta: dict | None = None) -> Path:
        """Collective: every rank calls it with its own sharded state dict."""
        from megatron.core import dist_checkpointing

        name = self.step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        t0 = time.time()
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        with _writers_die_with_trainer():
            dist_checkpointing.save(sharded_state_dict, str(tmp))
        if _rank() == 0:
            info = {"step": step, "time": time.time(), **(meta or {})}
            (tmp / META).write_text(json.dumps(info, indent=1))
        _barrier()
        fsync_tree(tmp)
        _barrier()
        if _rank() == 0:
            if final.exists():  # re-saving a step (e.g. after resuming from it): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, name + "\n")
            self._prune(keep=final)
        _barrier()
        self.last_save_seconds = time.time() - t0
        return final

    def _prune(self, keep: Path) -> None:
        ckpts = [p for p in self.list_checkpoints() if p != keep]
        excess = len(ckpts) + 1 - self.keep_last
        for p in ckpts[: max(0, excess)]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, sharded_state_dict: dict, path: str | Path) -> dict:
        """Load ``path`` into the structure of ``sharded_state_dict`` (Megatron's template)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        if not (path / META).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
        return dist_checkpointing.load(sharded_state_dict, str(path))

    def resolve_resume(self, resume: str) -> Path | None:
        """``auto`` -> latest (or None), ``never`` -> None, else the given checkpoint path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():
            return CheckpointManager(path).latest()
        if not (path / META).is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint directory")
        return path
