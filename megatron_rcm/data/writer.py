"""Write tar shards in the format of ``megatron_rcm.data.format`` (used by tools/make_shards.py).

Atomic (``megatron_rcm.atomic``): the shards go into a temporary folder beside the target
(``.<name>.tmp-<pid>-*``), ``index.json`` is written last, everything is fsynced, and only then the folder
is renamed into place. A failed or killed
write leaves the target as it was (absent, or the previous complete data set); a non-empty target is
replaced only with ``overwrite=True``, as a whole (no stale shards of the earlier write survive).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import torch

from megatron_rcm.atomic import make_temp_dir, publish_dir, sweep_leftovers
from megatron_rcm.data.format import (
    INDEX_FILE,
    INDEX_VERSION,
    NEGATIVE_FILE,
    crc32,
    encode_tensor,
)
from megatron_rcm.data.index import write_index

logger = logging.getLogger("megatron_rcm.data")


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite`` (before any work)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"shard output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"shard output {out_dir} exists and is not empty; pass --overwrite "
                              f"(ShardWriter(overwrite=True)) to replace the whole folder")


class ShardWriter:
    """Append samples to ``shard-000000.tar``, ``shard-000001.tar``, ... (``samples_per_shard`` each), write
    ``index.json`` (member offsets, sizes, crc32) last and move the folder into place on ``close()``."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000,
                 negative_t5_LD: torch.Tensor | None = None, overwrite: bool = False):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.target = Path(os.path.abspath(out_dir))
        check_output_dir(self.target, overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.target, "shard write", logger.warning)
        self.out_dir = make_temp_dir(self.target)
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()
        if negative_t5_LD is not None:
            torch.save(negative_t5_LD.detach().cpu().clone(), self.out_dir / NEGATIVE_FILE)

    def _open_next(self) -> None:
        self._close_tar()
        name = f"shard-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": []})
        self._count = 0

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            path = self.out_dir / self.shards[-1]["name"]
            self.shards[-1]["bytes"] = path.stat().st_size
            self._tar = None

    def write(self, key: str, latent_CFHW: torch.Tensor, t5_LD: torch.Tensor,
              neg_t5_LD: torch.Tensor | None = None, meta: dict | None = None,
              clip_ND: torch.Tensor | None = None, y_CFHW: torch.Tensor | None = None) -> None:
        """Add one sample. ``key`` must be unique and contain no dot. I2V samples add ``clip_ND`` and
        ``y_CFHW`` (both or neither; see ``megatron_rcm.data.format``)."""
        if "." in key.rsplit("/", 1)[-1] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if latent_CFHW.ndim != 4:
            raise ValueError(f"latent of {key!r} must be [C, F, H, W], got {tuple(latent_CFHW.shape)}")
        if t5_LD.ndim != 2:
            raise ValueError(f"t5 embedding of {key!r} must be [L, D], got {tuple(t5_LD.shape)}")
        if (clip_ND is None) != (y_CFHW is None):
            raise ValueError(f"I2V sample {key!r} needs both the CLIP features and the condition channels")
        self._keys.add(key)
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        members = {"latent.pth": encode_tensor(latent_CFHW), "t5.pth": encode_tensor(t5_LD)}
        if neg_t5_LD is not None:
            members["neg_t5.pth"] = encode_tensor(neg_t5_LD)
        if clip_ND is not None:
            members["clip.pth"] = encode_tensor(clip_ND)
            members["y.pth"] = encode_tensor(y_CFHW)
        if meta is not None:
            members["json"] = json.dumps(meta).encode("utf-8")
        entry = {"key": key, "members": {}}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
            # after addfile the tar offset sits past the member's data, padded to 512-byte blocks
            offset_data = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            entry["members"][ext] = [offset_data, len(data), crc32(data)]
        self.shards[-1]["samples"].append(entry)
        self._count += 1

    def close(self) -> Path:
        """Finish the last shard, write ``index.json`` last and move the folder into place. Returns the
        index path inside the target folder."""
        self._close_tar()
        if not self.shards:
            self.abort()
            raise ValueError(f"no samples were written for {self.target}; nothing to publish")
        write_index(self.out_dir, {"version": INDEX_VERSION, "shards": self.shards})
        publish_dir(self.out_dir, self.target)  # replaced as a whole (overwrite=True was checked at start)
        return self.target / INDEX_FILE

    def abort(self) -> None:
        """Drop everything written so far; the target folder is left as it was."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()
