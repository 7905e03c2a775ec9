"""Write tar shards in the format of ``megatron_rcm.data.format`` (used by tools/make_shards.py)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import torch

from megatron_rcm.data.format import (
    INDEX_FILE,
    INDEX_VERSION,
    NEGATIVE_FILE,
    crc32,
    encode_tensor,
)


class ShardWriter:
    """Append samples to ``shard-000000.tar``, ``shard-000001.tar``, ... (``samples_per_shard`` each) and
    write ``index.json`` (member offsets, sizes, crc32) on ``close()``."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000,
                 negative_t5_LD: torch.Tensor | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
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
              neg_t5_LD: torch.Tensor | None = None, meta: dict | None = None) -> None:
        """Add one sample. ``key`` must be unique and contain no dot."""
        if "." in key.rsplit("/", 1)[-1] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if latent_CFHW.ndim != 4:
            raise ValueError(f"latent of {key!r} must be [C, F, H, W], got {tuple(latent_CFHW.shape)}")
        if t5_LD.ndim != 2:
            raise ValueError(f"t5 embedding of {key!r} must be [L, D], got {tuple(t5_LD.shape)}")
        self._keys.add(key)
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        members = {"latent.pth": encode_tensor(latent_CFHW), "t5.pth": encode_tensor(t5_LD)}
        if neg_t5_LD is not None:
            members["neg_t5.pth"] = encode_tensor(neg_t5_LD)
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
        """Finish the last shard and write ``index.json`` atomically. Returns the index path."""
        self._close_tar()
        index = {"version": INDEX_VERSION, "shards": self.shards}
        path = self.out_dir / INDEX_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._close_tar()
