"""Write a conversion's output directory all at once or not at all.

Everything goes to a hidden sibling ``.OUT.tmp-*`` first; only when every file is written and synced is it
renamed to OUT (with ``--overwrite``, the old OUT is renamed away first and deleted last). A failure or
interrupt at any point leaves OUT as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from megatron_rcm.convert.errors import OutputExistsError


def describe_existing(out: Path) -> str:
    names = {p.name for p in out.iterdir()}
    if {"metadata.json", ".metadata"} <= names:
        return "a Megatron dist_checkpointing checkpoint"
    if "config.json" in names and any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names):
        return "an exported model (config.json + safetensors)"
    return f"{len(names)} other file(s)/folder(s)"


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an OUT that exists as a file, or as a non-empty folder unless ``overwrite``."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} already holds {describe_existing(out)}; pass --overwrite to replace it"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool):
    """Yield a temporary folder to write into; on success it becomes ``out``."""
    out = Path(out).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets ordinary permissions
    try:
        yield tmp
        for entry in tmp.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
