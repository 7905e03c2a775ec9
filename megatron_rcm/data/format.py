"""The on-disk sample format: webdataset-style tar shards of precomputed Wan latents and text embeddings.

One sample = tar members sharing a key (the basename up to its first dot), as Wan training teams store
precomputed data:

    <key>.latent.pth | <key>.latent.npy   VAE latent [C, F, H, W] (required)
    <key>.t5.pth     | <key>.t5.npy       umT5 prompt embedding [L, D], unpadded (required)
    <key>.neg_t5.pth | <key>.neg_t5.npy   per-sample negative-prompt embedding [L', D] (optional)
    <key>.json                            free metadata, e.g. {"caption": ...} (optional)
    <key>.clip.pth   | <key>.clip.npy     I2V: CLIP image features of the first frame [N, D_img]
    <key>.y.pth      | <key>.y.npy        I2V: condition channels [4 + C, F, H, W]: the first-frame mask
                                          (4 channels) and the VAE latent of the first frame followed by
                                          zero frames (``megatron_rcm.pipeline.i2v``); both or neither

A data set is a directory of ``*.tar`` shards plus:

    negative.t5.pth   the data set's negative-prompt embedding [L', D] (optional; used when samples have
                      none; CFG with guidance != 1 needs it or per-sample .neg_t5 members)
    index.json        written last by ``ShardWriter`` / ``tools/make_shards.py`` (``--index DIR`` for tars
                      from elsewhere): per shard its byte size and per member (offset, size, crc32), so
                      reading is a seek without scanning the tar and every byte read is verified. The
                      reader refuses a folder without it (``megatron_rcm.data.index``).
"""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import torch

INDEX_FILE = "index.json"
NEGATIVE_FILE = "negative.t5.pth"
INDEX_VERSION = 1

LATENT_EXTS = ("latent.pth", "latent.npy")
TEXT_EXTS = ("t5.pth", "t5.npy")
NEG_TEXT_EXTS = ("neg_t5.pth", "neg_t5.npy")
META_EXTS = ("json",)
CLIP_EXTS = ("clip.pth", "clip.npy")
COND_EXTS = ("y.pth", "y.npy")
KNOWN_EXTS = LATENT_EXTS + TEXT_EXTS + NEG_TEXT_EXTS + META_EXTS + CLIP_EXTS + COND_EXTS


class ShardError(RuntimeError):
    """A shard is missing, corrupt or does not match the expected shapes; the message names the shard
    and the sample key. Training stops on it: samples are never skipped silently."""


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.latent.pth"`` -> (``"dir/abc"``, ``"latent.pth"``): key up to the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def encode_tensor(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous().clone(), buf)
    return buf.getvalue()


def decode_member(ext: str, data: bytes):
    """Bytes of one member -> tensor (``.pth``/``.npy``) or dict (``.json``). Raises on bad bytes."""
    kind = ext.rsplit(".", 1)[-1]
    if kind == "pth":
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"expected a tensor, found {type(obj).__name__}")
        return obj
    if kind == "npy":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    if kind == "json":
        return json.loads(data.decode("utf-8"))
    raise ValueError(f"unknown member type .{ext}")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF
