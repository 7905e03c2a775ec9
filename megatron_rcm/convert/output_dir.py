"""Write a conversion's output directory all at once or not at all.

Everything goes to a hidden sibling ``.OUT.tmp-PID-*`` first; only when every file is written and synced is
it renamed to OUT (with ``--overwrite``, the old OUT is renamed to ``.OUT.old-PID`` first and deleted last).
A failure or interrupt at any point leaves OUT as it was.

OUT may never be, contain or lie inside what the conversion reads (``check_not_source``): ``--overwrite``
would delete the source. A run killed before it could clean up (``kill -9``, power loss) leaves its
``.OUT.tmp-PID-*`` folder; the next run into OUT removes those whose process is gone, and reports the ones
it cannot attribute to a dead process on this machine and any ``.OUT.old-PID`` (the previous OUT, renamed
away by an interrupted ``--overwrite``), which it never deletes (``sweep_leftovers``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from megatron_rcm import atomic
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


def check_not_source(out: str | Path, sources, what: str = "source") -> None:
    """Refuse an OUT that is, contains or lies inside any of ``sources`` (files or folders the conversion
    reads), symbolic links and relative paths resolved: writing OUT (or deleting it for ``--overwrite``)
    would destroy them."""
    out_r = Path(os.path.realpath(out))
    for src in sources:
        src_r = Path(os.path.realpath(src))
        if out_r == src_r:
            relation = "is"
        elif out_r in src_r.parents:
            relation = "contains"
        elif src_r.is_dir() and src_r in out_r.parents:
            relation = "lies inside"
        else:
            continue
        shown = f"{out}" + (f" (= {out_r})" if str(out) != str(out_r) else "")
        raise OutputExistsError(
            f"output {shown} {relation} the {what} {src_r}: writing it would destroy the {what}; "
            "choose an output folder outside it"
        )


def sweep_leftovers(out: str | Path, log=print) -> list[Path]:
    """Remove the ``.OUT.tmp-PID-*`` folders of conversions into OUT whose process is gone; report (and
    return) the others and any ``.OUT.old-*`` (``megatron_rcm.atomic.sweep_leftovers``)."""
    return atomic.sweep_leftovers(out, "conversion", log)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool):
    """Yield a temporary folder to write into; on success it becomes ``out`` (``megatron_rcm.atomic``)."""
    check_output_dir(out, overwrite)
    with atomic.atomic_output_dir(out) as tmp:
        yield tmp
