"""Atomic, rotating Megatron ``dist_checkpointing`` checkpoints.

Layout under ``root``::

    step_00000100/        one complete checkpoint (Megatron dist_checkpointing format + meta.json)
    step_00000200/
    latest                text file naming the newest complete checkpoint ("step_00000200")
    .tmp-step_00000300/   a save in progress (or left by a crash: ignored and removed on the next save)
    .trash-step_00000000/ a checkpoint pruned (or replaced), being deleted in the background; never listed

Save protocol (every rank takes part; rank 0 does the renames):
  1. write everything into ``.tmp-step_N`` (``dist_checkpointing.save`` with Megatron's fully parallel
     torch_dist strategy: the tensor writes are spread over the data-parallel ranks);
  2. once every rank's writers are done (Megatron's finalize functions: torch's ``.metadata``, then
     ``metadata.json``), ``meta.json``; fsync every file and directory of it (every rank);
  3. rename ``.tmp-step_N`` -> ``step_N`` and fsync ``root`` (rename is atomic on POSIX);
  4. write ``latest.tmp``, fsync, rename to ``latest``, fsync ``root``;
  5. rename the oldest ``step_*`` beyond ``keep_last`` to ``.trash-step_*`` (atomic, instant) and delete
     them in a background thread of rank 0 (deleting ~45 GB took seconds inside a finalize: a training stall).
A crash before 3 leaves only a ``.tmp-`` directory; a crash between 3 and 4 leaves ``latest`` on the
previous good checkpoint. Either way the last good checkpoint is untouched. A ``.trash-`` directory left
by a crash is never listed nor resumed from; the manager's construction and every save hand it to the
background deleter (as they remove ``.tmp-`` ones); ``close`` waits for the deleter.

Asynchronous saves (``async_save=True``): ``save`` returns after step 1 has prepared the write (tensors
copied to host memory, common state written) and a forked writer process persists the tensors while
training goes on; ``finalize`` (polled by the trainer every step, blocking before the next save and at
the end) runs 2-5 once the writers of every rank are done. One save is in flight at a time.

Resume: ``check_intact`` reads only metadata (``meta.json``, Megatron's ``metadata.json``, torch's
``.metadata``, the zip directory of ``common.pt``) and the sizes of the ``.distcp`` files it lists;
``resolve_resume`` skips a broken newest checkpoint (with a warning) unless the user pinned it.
``meta.json`` stores the run's config; ``config_changes`` compares it with the resuming run's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist

from megatron_rcm.atomic import fsync_dir, fsync_tree, write_atomic
from megatron_rcm.parallel.mcore_compat import file_results_queue, patch_psutil
from megatron_rcm.training.ckpt_layout import one_copy_per_shard

_STEP_RE = re.compile(r"^step_(\d{8})$")
TRASH = ".trash-"  # prefix of a directory being deleted in the background
LATEST = "latest"
META = "meta.json"
logger = logging.getLogger("megatron_rcm.train")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (broken, or written by an incompatible run)."""


# -- writer processes die with the trainer ------------------------------------------------------------
# megatron-core 0.16.1's torch_dist save (``FileSystemWriterAsync.write_preloaded_data_multiproc`` in
# ``dist_checkpointing/strategies/filesystem_async.py``) forks one writer process per file bucket, and
# collects their results through a queue served by a spawned ``multiprocessing.Manager`` process that lives
# as long as the trainer. An asynchronous save runs that function in a process forked from the trainer
# (``TemporalAsyncCaller``), which forks the bucket writers in turn. A trainer killed by SIGKILL left them
# all behind for good (a forked writer holds a copy of the trainer's memory: ~2.8 GB RSS each for a
# 67M-parameter model). While ``CheckpointManager`` saves or schedules a save, (1) every process forked by
# the saving process asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``; a
# writer's own children die with it, and so on), and (2) the results queue is a ``FileResultsQueue``, a
# file inside the checkpoint's ``.tmp-`` directory, so no Manager is started (an in-memory pipe would not
# do: Megatron joins the writer before it reads the queue, and a writer blocks on exit until a full pipe is
# read; ``megatron_rcm.parallel.mcore_compat``, workaround 5). (1) stays useful for any writer.
_PR_SET_PDEATHSIG = 1
_saving_pid: int | None = None  # pid of the process inside CheckpointManager's save / schedule, else None


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
def _writers_die_with_trainer(results_dir: Path | None = None):
    """Scope of ``dist_checkpointing.save`` (``results_dir``: where the writers' results file goes) and of
    scheduling or running its request: see the comment above ``_PR_SET_PDEATHSIG``."""
    global _saving_pid
    path = None if results_dir is None else Path(results_dir) / f".write_results_rank{_rank()}.pkl"
    _saving_pid = os.getpid()
    try:
        with file_results_queue(path):
            yield
    finally:
        _saving_pid = None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_intact(path: Path) -> str | None:
    """What is wrong with checkpoint directory ``path``, or None if it looks intact. Cheap (metadata and
    file sizes only): ``meta.json`` and Megatron's ``metadata.json`` parse, torch's ``.metadata`` unpickles,
    every ``.distcp`` file it lists exists and holds the bytes it records, ``common.pt`` is a readable zip."""
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader

    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a directory"
    for name in (META, "metadata.json"):
        try:
            info = json.loads((path / name).read_text())
        except FileNotFoundError:
            return f"has no {name}"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"has an unreadable {name} ({type(err).__name__}: {err})"
        if not isinstance(info, dict):
            return f"has a {name} that is not a JSON object"
        if name == META and not isinstance(info.get("step"), int):
            return f"has a {META} without an integer 'step'"
    if not (path / ".metadata").is_file():
        return "has no .metadata (torch distributed checkpoint index)"
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 (a truncated pickle raises anything from EOFError to KeyError)
        return f"has an unreadable .metadata ({type(err).__name__}: {err})"
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, nbytes in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            return f"lacks {rel}, listed in .metadata"
        if f.stat().st_size < nbytes:
            return f"has a truncated {rel}: {f.stat().st_size} bytes, .metadata needs {nbytes}"
    if not (path / "common.pt").is_file():
        return "has no common.pt"
    try:
        with zipfile.ZipFile(path / "common.pt"):
            pass
    except (OSError, zipfile.BadZipFile) as err:
        return f"has an unreadable common.pt ({type(err).__name__}: {err})"
    return None


def read_meta(path: Path) -> dict:
    """``meta.json`` of an intact checkpoint (step, time, algorithm, world size, the run's config)."""
    return json.loads((path / META).read_text())


# -- config changes between the checkpoint's run and the resuming run -----------------------------------
# Refused: the saved tensors (or the critic's presence) no longer fit, or the losses mean something else.
REFUSED_CHANGES = ("model.preset", "model.overrides", "distill.algorithm")
# Not reported: layout (checkpoints are layout-agnostic), bookkeeping, where things are written.
IGNORED_CHANGES = ("parallel", "checkpoint", "logging", "training.output_dir", "training.device",
                   "model.recompute", "model.recompute_method", "model.recompute_num_layers",
                   "model.recompute_granularity")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(refused, warned)``: "key: old -> new" lines for the dotted keys whose values differ between the
    checkpoint's stored config ``old`` and this run's ``new`` (both ``to_dict`` views)."""
    absent = "<absent>"
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    refused, warned = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, absent), b.get(key, absent)
        if va == vb or _under(key, IGNORED_CHANGES):
            continue
        (refused if _under(key, REFUSED_CHANGES) else warned).append(f"{key}: {va!r} -> {vb!r}")
    return refused, warned


def check_resume_config(path: Path, config: dict, rank: int = 0) -> None:
    """Refuse (``CheckpointError`` listing the keys) to resume from ``path`` with another architecture or
    algorithm; warn (rank 0) about other changed settings (lr, seed, batch size, max_steps ...)."""
    stored = read_meta(path).get("config")
    if stored is None:
        if rank == 0:
            logger.warning("%s stores no config (written by an older version): resuming without checking "
                           "that the model and algorithm match", path)
        return
    refused, warned = config_changes(stored, config)
    if refused:
        raise CheckpointError(f"cannot resume from {path}: it was written by a run with another model or "
                              "algorithm (checkpoint -> this run):\n  " + "\n  ".join(refused) +
                              "\nrestore these settings, or start a new run (checkpoint.resume=never or "
                              "another checkpoint.dir)")
    if warned and rank == 0:
        logger.warning("resuming from %s with settings that differ from its run (checkpoint -> this run):\n  %s",
                       path, "\n  ".join(warned))


def optim_sharding_of(path: Path) -> str:
    """How the checkpoint at ``path`` wrote the distributed optimizer's state (``meta.json``; checkpoints
    written before the choice existed are ``fully_reshardable``)."""
    return read_meta(path).get("optim_sharding", "fully_reshardable")


# the layout dimensions a "dp_reshardable" optimizer checkpoint cannot change (its buffers are laid out per
# TP x PP domain; data and context parallelism only split them differently)
_OPTIM_LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline")


def check_optim_layout(path: Path, config: dict) -> None:
    """Refuse (``CheckpointError``), before any network is built, to resume a ``dp_reshardable`` optimizer
    checkpoint at another TP or PP layout; name both layouts and the way out."""
    if optim_sharding_of(path) != "dp_reshardable":
        return
    stored = (read_meta(path).get("config") or {}).get("parallel", {})
    now = config.get("parallel", {})
    changed = [f"parallel.{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in _OPTIM_LAYOUT_KEYS
               if k in stored and stored.get(k) != now.get(k)]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: its optimizer state was written per rank (dp_reshardable, "
            "checkpoint.optim_fully_reshardable=false), which resumes at another data/context-parallel size "
            "but not at another tensor/pipeline layout (checkpoint -> this run):\n  " + "\n  ".join(changed) +
            "\nresume at the checkpoint's layout and save once with checkpoint.optim_fully_reshardable=true, "
            "then change the layout")


class SaveResult(NamedTuple):
    """A finalized save: ``latest`` names ``path``."""

    step: int
    path: Path
    nbytes: int  # size of the checkpoint directory (counted on rank 0; 0 on the other ranks)
    stall_s: float  # time the caller of ``save`` was blocked by it
    total_s: float  # from the start of ``save`` to the end of its finalization

    @property
    def write_gb_per_s(self) -> float:
        return self.nbytes / max(self.total_s, 1e-9) / 1e9


class _PendingSave(NamedTuple):
    step: int
    final: Path
    started: float  # time.perf_counter() when save began
    stall_s: float | None  # None until save returns


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, async_save: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._strategy = None
        self._calls = None  # Megatron's AsyncCallsQueue, made on the first asynchronous save
        self._pending: _PendingSave | None = None
        self._done: list[SaveResult] = []
        self.last_save_phases: dict[str, float] = {}  # where the last ``save`` call spent its time (seconds)
        self._trash_lock = threading.Lock()
        self._trash_todo: list[Path] = []  # queued for the deleter thread, or being deleted by it
        self._trash_thread: threading.Thread | None = None
        patch_psutil()
        self._delete_stale_trash()

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

    @property
    def pending_step(self) -> int | None:
        """The step of the asynchronous save in flight (written, not yet finalized), else None."""
        return self._pending.step if self._pending is not None else None

    def _save_strategy(self):
        """torch_dist, the tensor writes spread over the data-parallel ranks (each writes an equal share of
        the replicated tensors) as in Megatron-LM's ``--ckpt-fully-parallel-save``."""
        if self._strategy is None:
            from megatron.core import parallel_state as ps
            from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )

            group = ps.get_data_parallel_group(with_context_parallel=True) if ps.model_parallel_is_initialized() \
                else None
            self._strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
        return self._strategy

    def save(self, step: int, sharded_state_dict: dict, meta: dict | None = None) -> Path:
        """Collective: every rank calls it with its own sharded state dict. Returns the checkpoint's path.
        Synchronous: once ``latest`` names it. Asynchronous (``async_save``): once the tensors are copied to
        host memory and a writer process persists them; ``finalize`` publishes it. A save still in flight is
        finalized first (blocking)."""
        from megatron.core import dist_checkpointing

        self._done += self.finalize(blocking=True)
        name = self.step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        t0 = time.perf_counter()
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._delete_stale_trash()
            tmp.mkdir()
        _barrier()
        info = {"step": step, "time": time.time(), **(meta or {})}
        self._pending = _PendingSave(step, final, t0, None)
        try:
            # the request holds the tensors (live device tensors, Megatron's gathered optimizer state); its
            # preload copies them to host memory when it is scheduled or run, before this returns
            t_plan = time.perf_counter()
            with _writers_die_with_trainer(tmp):
                request = dist_checkpointing.save(one_copy_per_shard(sharded_state_dict), str(tmp),
                                                  self._save_strategy(),
                                                  async_sharded_save=True)
            request.add_finalize_fn(functools.partial(self._publish, info, tmp, final))
            t_sched = time.perf_counter()
            self.last_save_phases = {"prepare_s": t_plan - t0, "plan_s": t_sched - t_plan}
            if self.async_save:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                self._calls = self._calls or AsyncCallsQueue()
                with _writers_die_with_trainer():
                    self._calls.schedule_async_request(request)  # the device-to-host copy, the writer's fork
                self.last_save_phases["schedule_s"] = time.perf_counter() - t_sched
                self._pending = self._pending._replace(stall_s=time.perf_counter() - t0)
            else:
                with _writers_die_with_trainer():
                    request.execute_sync()  # write, barrier, then the finalize functions (_publish last)
                self.last_save_phases["write_s"] = time.perf_counter() - t_sched
        except BaseException:
            self._pending = None
            raise
        self.last_save_seconds = time.perf_counter() - t0
        return final

    def finalize(self, blocking: bool = False) -> list[SaveResult]:
        """Collective (every rank, same ``blocking``): publish the asynchronous save in flight once its writers
        are done on every rank (``blocking``: wait for them). Returns the saves finalized since the last call
        (synchronous ones included). A failed write raises here, on every rank; ``latest`` stays where it was."""
        if self._calls is not None and self._calls.get_num_unfinalized_calls():
            try:
                self._calls.maybe_finalize_async_calls(blocking=blocking)
            except BaseException:
                self._pending = None
                raise
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Collective: finalize the save in flight (blocking), then wait for the background deleter."""
        self._done += self.finalize(blocking=True)
        if self._calls is not None:
            self._calls.close()
        self.wait_for_deletions()

    def _publish(self, info: dict, tmp: Path, final: Path) -> None:
        """Megatron finalize function, run on every rank after every rank's writers are done and Megatron's
        own finalize functions (``.metadata``, ``metadata.json``): steps 2-5 of the protocol."""
        if _rank() == 0:
            (tmp / META).write_text(json.dumps(info, indent=1))
        _barrier()
        fsync_tree(tmp)
        _barrier()
        nbytes = 0
        if _rank() == 0:
            nbytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            if final.exists():  # re-saving a step (e.g. after resuming from it): replace it
                self._discard(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
        _barrier()
        pending, self._pending = self._pending, None
        total = time.perf_counter() - pending.started
        stall = total if pending.stall_s is None else pending.stall_s
        self._done.append(SaveResult(info["step"], final, nbytes, stall, total))

    def _prune(self, keep: Path) -> None:
        ckpts = [p for p in self.list_checkpoints() if p != keep]
        excess = len(ckpts) + 1 - self.keep_last
        for p in ckpts[: max(0, excess)]:
            self._discard(p)

    # -- background deletion (rank 0) -------------------------------------------------------------------
    # Deleting a checkpoint is an rmtree of tens of GB (4.8 s for Wan 1.3B's 45 GB on /dev/shm): renamed
    # out of the way instead (atomic, instant), then deleted by a daemon thread while training goes on. The
    # unlink system calls release the GIL. One thread at a time; it exits once its queue is empty.
    def _discard(self, path: Path) -> None:
        """Rename checkpoint ``path`` to a fresh ``.trash-<name>[.k]`` beside it and delete it in the
        background."""
        trash, k = self.root / f"{TRASH}{path.name}", 0
        while trash.exists():  # e.g. the same step pruned twice, or a crash left one behind
            k += 1
            trash = self.root / f"{TRASH}{path.name}.{k}"
        os.rename(path, trash)
        self._delete_in_background([trash])

    def _delete_stale_trash(self) -> None:
        """Rank 0: hand every ``.trash-*`` under ``root`` (left by a crash, or queued already) to the deleter."""
        if _rank() == 0 and self.root.is_dir():
            self._delete_in_background(sorted(self.root.glob(f"{TRASH}*")))

    def _delete_in_background(self, paths: list[Path]) -> None:
        with self._trash_lock:
            self._trash_todo += [p for p in paths if p not in self._trash_todo]
            if self._trash_todo and self._trash_thread is None:
                self._trash_thread = threading.Thread(target=self._delete_loop, name="checkpoint-deleter",
                                                      daemon=True)
                self._trash_thread.start()

    def _delete_loop(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._trash_lock:
                    if not self._trash_todo:  # under the lock: a later request starts a new thread
                        self._trash_thread = None
                        return
                    path = self._trash_todo[0]
                try:
                    shutil.rmtree(path, ignore_errors=True)
                    if path.exists():
                        logger.warning("could not delete %s (a pruned checkpoint); retried at the next save", path)
                finally:
                    with self._trash_lock:
                        self._trash_todo.remove(path)
        finally:
            with self._trash_lock:  # an unexpected error: let a later request start a new thread
                if self._trash_thread is me:
                    self._trash_thread = None

    def wait_for_deletions(self) -> None:
        """Block until the background deleter has removed everything handed to it."""
        while True:
            with self._trash_lock:
                thread = self._trash_thread
            if thread is None:
                return
            thread.join()

    def load(self, sharded_state_dict: dict, path: str | Path) -> dict:
        """Load ``path`` into the structure of ``sharded_state_dict`` (Megatron's template)."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        path = Path(path)
        problem = check_intact(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} {problem}")
        try:
            return dist_checkpointing.load(sharded_state_dict, str(path))
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"loading checkpoint {path} failed: {type(err).__name__}: {err}") from err

    def resolve_resume(self, resume: str) -> Path | None:
        """``never`` -> None; ``auto`` -> the newest intact checkpoint under ``root`` (None if there is none);
        a run's checkpoint folder (holding ``latest``) -> likewise there; else the given checkpoint, which
        must be intact (``CheckpointError`` naming it and what is wrong)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.newest_intact()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():
            return CheckpointManager(path).newest_intact()
        problem = check_intact(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.resume={resume!r}: {path} {problem}")
        return path

    def newest_intact(self) -> Path | None:
        """The checkpoint ``latest`` names if intact, else the newest intact ``step_*`` (warning, on rank 0,
        about each broken one skipped); None without checkpoints; ``CheckpointError`` if all are broken."""
        if not self.root.is_dir():
            return None
        candidates: list[Path] = []
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            if _STEP_RE.match(name) and (self.root / name).is_dir():
                candidates.append(self.root / name)
            elif _rank() == 0:
                logger.warning("%s names %r, which is not a checkpoint in %s; looking for the newest intact "
                               "checkpoint instead", pointer, name[:80], self.root)
        steps = sorted((p for p in self.root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()),
                       key=lambda p: p.name, reverse=True)
        candidates += [p for p in steps if p not in candidates]
        broken = []
        for path in candidates:
            problem = check_intact(path)
            if problem is None:
                return path
            broken.append(f"{path} {problem}")
            if _rank() == 0:
                logger.warning("checkpoint %s %s: skipping it, resuming from an older one if any", path, problem)
        if broken:
            raise CheckpointError(f"no intact checkpoint in {self.root}: " + "; ".join(broken) +
                                  " (checkpoint.resume=never starts over)")
        return None
