"""Start-up checks of the paths a config names, run before any network or process group is built.

``load_config`` checks keys, types and ranges only (a config can be printed or edited on a machine without
the data); ``preflight`` checks that ``data.path`` is a complete, indexed shard folder that can feed the
configured CFG, and that ``model.teacher_checkpoint`` (and ``model.student_checkpoint``) exists and looks like one of the formats
``megatron_rcm.training.models.load_weights`` reads. Cheap: ``index.json``, file sizes and headers only.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from megatron_rcm.config.schema import ConfigError

PICKLE_PROTOCOL_2_PLUS = b"\x80"
"""First byte of a legacy (non-zip) ``torch.save`` file: the pickle PROTO opcode."""


def preflight(cfg, check_teacher: bool = True) -> None:
    """Raise ``ConfigError`` naming the key, the path and the fix when ``cfg``'s data or teacher is unusable."""
    from megatron_rcm.data import ShardError, check_data_source

    try:
        check_data_source(cfg.data, cfg.distill.guidance)
    except ShardError as err:
        raise ConfigError(f"data.path={cfg.data.path}: {err}") from err
    if check_teacher and cfg.model.teacher_checkpoint:
        check_teacher_checkpoint(Path(cfg.model.teacher_checkpoint))
    if check_teacher and cfg.model.student_checkpoint:
        check_teacher_checkpoint(Path(cfg.model.student_checkpoint), "model.student_checkpoint")


def check_teacher_checkpoint(path: Path, name: str = "model.teacher_checkpoint") -> None:
    """A ``dist_checkpointing`` folder (``metadata.json``; or a two-expert folder of two), a ``.safetensors``
    file with a readable header, or a ``torch.save`` file (zip archive or legacy pickle). ``name`` is the config key errors cite."""
    key = f"{name}={str(path)!r}"
    if not path.exists():
        raise ConfigError(f"{key} does not exist")
    if path.is_dir():
        from megatron_rcm.convert.experts import expert_folders

        experts = expert_folders(path)
        if experts is not None:  # a converted Wan2.2 A14B folder: each expert is a checkpoint
            for which, folder in experts.items():
                check_teacher_checkpoint(folder, f"{name} ({which}-noise expert)")
            return
        meta = path / "metadata.json"
        if not meta.is_file():
            hint = ""
            if (path / "latest").is_file():
                hint = (" (it looks like a training checkpoint folder: export its student with "
                        "`python tools/convert.py export` or point at a teacher export)")
            raise ConfigError(f"{key} is a folder with no metadata.json: not a dist_checkpointing checkpoint{hint}")
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}: {meta} is not valid JSON ({err}); the checkpoint is damaged") from err
        return
    if path.suffix == ".safetensors":
        _check_safetensors(path, key)
        return
    with open(path, "rb") as f:
        head = f.read(1)
    if not (zipfile.is_zipfile(path) or head == PICKLE_PROTOCOL_2_PLUS):
        raise ConfigError(f"{key} is not a checkpoint: expected a dist_checkpointing folder, a .safetensors file "
                          f"or a torch.save state dict (.pt/.pth)")


def _check_safetensors(path: Path, key: str) -> None:
    """The format's first 8 bytes are the little-endian length of a JSON header that must fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise ConfigError(f"{key}: not a safetensors file (header length {n}, file size {size} bytes)")
        try:
            json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{key}: the safetensors header is not valid JSON ({err}); the file is damaged") \
                from err
