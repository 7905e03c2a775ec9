"""Streaming safetensors I/O: read one tensor at a time with plain file reads, write one at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data buffer, little-endian, each tensor at ``8 + N + begin``. Reading with ``pread`` instead of a memory
map keeps the process's resident memory at one tensor, however large the file (a memory map would leave
every page it touched resident until the kernel reclaims it, and counted in RSS).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from megatron_rcm.convert.errors import CorruptFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the reference implementation's limit


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the data buffer
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and checked on open; tensors read on demand."""

    def __init__(self, path: str):
        self.path = str(path)
        self.entries, self.metadata, self.data_start = read_header(self.path)
        self._fh = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in a fresh buffer of its own."""
        e = self.entries[name]
        if self._fh is None:
            self._fh = open(self.path, "rb")  # kept open across reads; closed by close()
        buf = torch.empty(e.end - e.begin, dtype=torch.uint8)
        self._fh.seek(self.data_start + e.begin)
        got = self._fh.readinto(buf.numpy()) if buf.numel() else 0
        if got != buf.numel():
            raise CorruptFileError(
                f"{self.path}: tensor {name!r} is cut short ({got} of {buf.numel()} bytes); "
                "the file is truncated"
            )
        if e.dtype == torch.bool:
            return buf.view(torch.bool).reshape(e.shape)
        return buf.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_header(path: str) -> tuple[dict[str, Entry], dict, int]:
    """Parse and validate the header: every tensor's byte range matches its dtype and shape, the ranges
    tile the data buffer, and the file holds the whole buffer (a truncated download fails here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CorruptFileError(
                f"{path}: header length {n} does not fit in the {size}-byte file; not a safetensors file, "
                "or truncated inside its header"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: bad header entry for {name!r}: {info} ({e!r})") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise CorruptFileError(
                f"{path}: {name!r} spans {end - begin} bytes, but {info['dtype']}{list(shape)} needs "
                f"{math.prod(shape) * itemsize}"
            )
        entries[name] = Entry(dtype, shape, begin, end)
    expected_end = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != expected_end:
            raise CorruptFileError(f"{path}: {name!r} starts at byte {e.begin}, expected {expected_end}")
        expected_end = e.end
    if size != 8 + n + expected_end:
        raise CorruptFileError(
            f"{path}: file is {size} bytes but its header describes {8 + n + expected_end} "
            f"({'truncated' if size < 8 + n + expected_end else 'trailing bytes'}); re-download or re-export it"
        )
    return entries, metadata, 8 + n


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_file(
    path: str,
    specs: list[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    metadata: dict | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> int:
    """Write ``specs`` to ``path``: the header first (it needs only shapes and dtypes), then each tensor
    as ``produce(name)`` returns it. Returns the file size."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, like the reference writer
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            t = produce(s.name)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(
                    f"{s.name}: produced {t.dtype}{list(t.shape)}, announced {s.dtype}{list(s.shape)}"
                )
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(s)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def shard(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_sharded(
    directory: str,
    stem: str,
    specs: list[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[str]:
    """Write ``{stem}.safetensors``, or when it takes more than one shard the Hugging Face sharded layout
    ``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json``. Returns the file names."""
    groups = shard(specs, max_shard_bytes)
    if len(groups) == 1:
        name = f"{stem}.safetensors"
        write_file(os.path.join(directory, name), groups[0], produce, on_tensor=on_tensor)
        return [name]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_file(os.path.join(directory, name), group, produce, on_tensor=on_tensor)
        names.append(name)
        weight_map.update({s.name: name for s in group})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    index_name = f"{stem}.safetensors.index.json"
    with open(os.path.join(directory, index_name), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, index_name]
