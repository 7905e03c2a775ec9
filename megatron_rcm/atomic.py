"""All-or-nothing outputs: one protocol for every folder this package publishes (converter outputs,
shard folders, quickstart results) and for small pointer files (``latest``, ``metrics.jsonl``).

A folder OUT is written into a hidden sibling ``.OUT.tmp-PID-*`` (same file system), fsynced, then
published by rename: an existing OUT is first renamed to ``.OUT.old-PID-*`` and deleted only after
the new one is in place. A failure or kill at any point leaves OUT as it was (or, between the two renames,
the previous OUT under ``.OUT.old-*``, which ``sweep_leftovers`` reports and never deletes). The next
run into OUT removes the temporary folders of processes that are gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_output_dir",
    "fsync_dir",
    "fsync_tree",
    "make_temp_dir",
    "process_alive",
    "publish_dir",
    "sweep_leftovers",
    "write_atomic",
]

_TMP_PID = re.compile(r"\.tmp-(\d+)(?:-|$)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_atomic(path: Path, text: str) -> None:
    """Replace the file ``path`` by ``text`` in one rename (readers see the old or the new text)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def make_temp_dir(out: Path) -> Path:
    """A fresh ``.OUT.tmp-PID-*`` beside ``out`` with ordinary permissions (mkdtemp gives 0700)."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """fsync ``tmp`` and rename it to ``out``, replacing an existing ``out`` as a whole."""
    out = Path(out).absolute()
    fsync_tree(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old / out.name, out)  # put the previous output back
            old.rmdir()
            raise
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def sweep_leftovers(out: str | Path, what: str, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the ``.OUT.tmp-PID*`` folders whose process is gone (an interrupted ``what``); report, and
    return, the leftovers it keeps: temporary folders of a live or unknown process, and ``.OUT.old-*``
    folders (a previous OUT that an interrupted replacement renamed away)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    kept = []
    for entry in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")):
        m = _TMP_PID.match(entry.name[len(out.name) + 1:])
        if m is not None and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed {entry}: the unfinished output of an interrupted {what} (process {m.group(1)})")
        else:
            kept.append(entry)
            log(f"warning: {entry} is the unfinished output of another {what} into {out} (still running, or "
                f"interrupted on another machine); delete it once nothing writes there")
    for entry in sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*")):
        kept.append(entry)
        log(f"warning: {entry} holds a previous {out.name}, renamed away by an interrupted {what}; "
            f"rename it back to {out} or delete it")
    return kept


@contextlib.contextmanager
def atomic_output_dir(out: str | Path):
    """Yield a temporary folder beside ``out``; when the block succeeds it becomes ``out`` (replacing an
    existing one as a whole), when it raises it is deleted and ``out`` is untouched. The caller checks
    beforehand whether ``out`` may be replaced."""
    tmp = make_temp_dir(Path(out))
    try:
        yield tmp
        publish_dir(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
