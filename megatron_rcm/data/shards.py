"""Read tar shards (``megatron_rcm.data.format``) in the seeded, DP-split order of
``megatron_rcm.data.order.EpochOrder``, with a position that checkpoints and restores exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_rcm.data.batch import Batch, pad_text
from megatron_rcm.data.format import (
    CLIP_EXTS,
    COND_EXTS,
    LATENT_EXTS,
    NEG_TEXT_EXTS,
    NEGATIVE_FILE,
    TEXT_EXTS,
    ShardError,
    crc32,
    decode_member,
)
from megatron_rcm.data.index import load_index
from megatron_rcm.data.order import EpochOrder


class ShardSource:
    """Micro-batches from tar shards for one data-parallel rank (see module docstring for the order)."""

    def __init__(self, root: str | Path, micro_batch_size: int, latent_shape_CFHW, text_len: int,
                 text_dim: int, seed: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True):
        self.root = Path(root)
        self.samples = load_index(self.root)
        self.micro_batch_size = micro_batch_size
        self.latent_shape = tuple(int(s) for s in latent_shape_CFHW)
        self.text_len, self.text_dim = text_len, text_dim
        try:
            self.order = EpochOrder(len(self.samples), seed, dp_rank, dp_size, shuffle, name=str(self.root))
        except ValueError as err:
            raise ShardError(str(err)) from err
        self._files: dict[Path, object] = {}
        neg = self.root / NEGATIVE_FILE
        self.negative_LD = None
        if neg.is_file():
            self.negative_LD = self._check_text(self._decode(neg, "negative", "pth", neg.read_bytes()),
                                                neg, "negative")

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.order.load_state_dict(state)
        except ValueError as err:
            raise ShardError(str(err)) from err

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, path: Path, key: str, ext: str, offset: int, size: int, crc: int | None) -> bytes:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 (kept open across reads)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"shard {path}: sample '{key}' member .{ext} is truncated "
                             f"({len(data)} of {size} bytes)")
        if crc is not None and crc32(data) != crc:
            raise ShardError(f"shard {path}: sample '{key}' member .{ext} fails its crc32 check (corrupt)")
        return data

    @staticmethod
    def _decode(path: Path, key: str, ext: str, data: bytes):
        try:
            return decode_member(ext, data)
        except Exception as err:
            raise ShardError(f"shard {path}: sample '{key}' member .{ext} cannot be decoded ({err})") from err

    def _check_text(self, t: torch.Tensor, path: Path, key: str) -> torch.Tensor:
        if t.ndim != 2 or t.shape[1] != self.text_dim:
            raise ShardError(f"shard {path}: sample '{key}' text embedding has shape {tuple(t.shape)}, "
                             f"expected [L, data.text_dim={self.text_dim}]")
        if t.shape[0] > self.text_len:
            raise ShardError(f"shard {path}: sample '{key}' text embedding has {t.shape[0]} tokens, more than "
                             f"data.text_len={self.text_len}")
        if not torch.isfinite(t).all():
            raise ShardError(f"shard {path}: sample '{key}' text embedding holds non-finite values")
        return t

    def read_sample(self, i: int) -> dict:
        path, entry = self.samples[i]
        key, members = entry["key"], entry["members"]
        out = {"key": key}
        for name, exts in (("latent", LATENT_EXTS), ("t5", TEXT_EXTS), ("neg_t5", NEG_TEXT_EXTS),
                           ("clip", CLIP_EXTS), ("y", COND_EXTS)):
            ext = next((e for e in exts if e in members), None)
            if ext is None:
                continue
            offset, size, crc = members[ext]
            out[name] = self._decode(path, key, ext, self._read(path, key, ext, offset, size, crc))
        lat = out["latent"]
        if tuple(lat.shape) != self.latent_shape:
            raise ShardError(f"shard {path}: sample '{key}' latent has shape {tuple(lat.shape)}, expected "
                             f"data.latent_shape={list(self.latent_shape)}")
        if not torch.isfinite(lat.float()).all():
            raise ShardError(f"shard {path}: sample '{key}' latent holds non-finite values")
        self._check_text(out["t5"], path, key)
        if "neg_t5" in out:
            self._check_text(out["neg_t5"], path, key)
        if ("clip" in out) != ("y" in out):
            raise ShardError(f"shard {path}: sample '{key}' has only one of the I2V members .clip and .y")
        if "y" in out:
            y, clip = out["y"], out["clip"]
            if y.ndim != 4 or tuple(y.shape[1:]) != self.latent_shape[1:] or clip.ndim != 2:
                raise ShardError(f"shard {path}: sample '{key}' I2V members have shapes .y {tuple(y.shape)}, .clip "
                                 f"{tuple(clip.shape)}; expected [Cy, {', '.join(map(str, self.latent_shape[1:]))}] "
                                 f"and [N, D_img]")
            if not (torch.isfinite(y.float()).all() and torch.isfinite(clip.float()).all()):
                raise ShardError(f"shard {path}: sample '{key}' I2V members hold non-finite values")
        return out

    def next_batch(self) -> Batch:
        items = [self.read_sample(self.order.next_index()) for _ in range(self.micro_batch_size)]
        return self._collate(items)

    def _collate(self, items: list[dict]) -> Batch:
        latent = torch.stack([it["latent"].float() for it in items])
        ctx = torch.stack([pad_text(it["t5"], self.text_len, it["key"]) for it in items])
        has_neg = ["neg_t5" in it for it in items]
        if all(has_neg):
            neg = torch.stack([pad_text(it["neg_t5"], self.text_len, it["key"]) for it in items])
        elif any(has_neg):
            missing = [it["key"] for it in items if "neg_t5" not in it]
            raise ShardError(f"data directory {self.root}: samples {missing} have no .neg_t5 member while others "
                             f"in the batch do (mismatched shards)")
        elif self.negative_LD is not None:
            neg = pad_text(self.negative_LD, self.text_len, NEGATIVE_FILE)[None]
        else:
            neg = None
        clip = y = None
        has_i2v = ["y" in it for it in items]
        if all(has_i2v):
            clip = torch.stack([it["clip"].float() for it in items])
            y = torch.stack([it["y"].float() for it in items])
        elif any(has_i2v):
            missing = [it["key"] for it in items if "y" not in it]
            raise ShardError(f"data directory {self.root}: samples {missing} have no I2V members (.clip, .y) while "
                             f"others in the batch do (mismatched shards)")
        return Batch(latent, ctx, neg, [it["key"] for it in items], clip_fea_BND=clip, y_BCFHW=y)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
