"""Megatron-Core ``dist_checkpointing`` checkpoints of a Wan model, written and read one tensor at a time.

On disk (Megatron's ``torch_dist`` format, i.e. PyTorch DCP)::

    metadata.json   Megatron's backend record ({"sharded_backend": "torch_dist", ...})
    .metadata       DCP's index: every tensor's global shape, dtype and where its bytes are
    __0_0.distcp    the tensors
    common.pt       Megatron's non-sharded state (empty here)
    wan_config.json the architecture (``WanArch``), preset, dtype and provenance (this package)

Each tensor is stored under its Megatron sharded key -- ``model.`` + our parameter name, blocks numbered
by global layer -- with its full (global) shape, so ``dist_checkpointing.load`` reshards it on load to any
TP size. ``model.`` is the prefix the trainer's teacher loader and ``export_model`` use
(``megatron_rcm.training.models.EXPORT_PREFIX``): a converted checkpoint is a teacher checkpoint.

Writing streams: the sharded state dict comes from a WanModel built on the ``meta`` device (structure and
shapes without storage), and the DCP planner's ``resolve_data`` -- called once per tensor, right before
its bytes are written -- fetches that one tensor from the source.
"""

from __future__ import annotations

import json
import math
import queue
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_rcm.convert.arch import WanArch, arch_of_config
from megatron_rcm.convert.errors import ConversionError

CONFIG_FILE = "wan_config.json"
MODEL_PREFIX = "model."
FORMAT = "megatron-rcm/wan-dist-ckpt"
FORMAT_VERSION = 1


def is_dist_checkpoint(path: Path) -> bool:
    return (Path(path) / "metadata.json").is_file() and (Path(path) / ".metadata").is_file()


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """The checkpoint folder CKPT designates: a checkpoint folder itself; a training run's checkpoint
    root, whose ``latest`` file names the checkpoint; or such a ``latest`` pointer file itself."""
    path = Path(ckpt)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_dist_checkpoint(path):
            return path
        pointer = path / "latest"
        if not pointer.is_file():
            raise ConversionError(
                f"{path}: not a Megatron dist_checkpointing checkpoint (no metadata.json and .metadata) "
                "nor a training run's checkpoint root (no 'latest' file)"
            )
    else:
        pointer = path
    try:
        with open(pointer, "rb") as f:
            raw = f.read(4097)  # a pointer is one short line: never read a large (weight) file whole
        name = raw.decode().strip() if len(raw) <= 4096 else None
    except (OSError, UnicodeDecodeError):
        name = None
    if not name or len(name) > 255 or Path(name).name != name or any(c.isspace() for c in name):
        raise ConversionError(
            f"{pointer}: not a checkpoint pointer file like a training run's 'latest' (one line naming a "
            "checkpoint folder beside it); give a checkpoint folder, a run's checkpoint root or its 'latest'"
        )
    step = pointer.parent / name
    if not is_dist_checkpoint(step):
        raise ConversionError(
            f"{pointer} names {name!r}, which is not a complete checkpoint in {pointer.parent}"
        )
    return step


# ---------------------------------------------------------------------------------------------------
# the model config recorded beside the tensors


def write_wan_config(ckpt_dir: str | Path, arch: WanArch, preset: str | None, dtype: str, **extra) -> dict:
    """Record the architecture (and the checkpoint's dtype and provenance) as ``wan_config.json``."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "arch": arch.to_json(),
        "dtype": dtype,
        **extra,
    }
    (Path(ckpt_dir) / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_wan_config(ckpt_dir: str | Path) -> dict | None:
    """The record ``write_wan_config`` wrote (with ``arch`` as a ``WanArch``), or None if absent."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT or record.get("format_version", 0) > FORMAT_VERSION:
        raise ConversionError(
            f"{path}: format {record.get('format')!r} v{record.get('format_version')} is not "
            f"{FORMAT!r} v<={FORMAT_VERSION}"
        )
    record["arch"] = WanArch.from_json(record["arch"])
    return record


def arch_of(config) -> WanArch:
    """The ``WanArch`` of a ``WanConfig`` (to record beside a checkpoint the trainer writes)."""
    return arch_of_config(config)


def load_wan_config(ckpt_dir: str | Path, **overrides):
    """A ``WanConfig`` for the checkpoint at ``ckpt_dir`` (parallel sizes and dtype from ``overrides``)."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    record = read_wan_config(ckpt_dir)
    if record is None:
        raise ConversionError(f"{ckpt_dir}: no {CONFIG_FILE}; not a checkpoint written by tools/convert.py")
    return record["arch"].wan_config(**overrides)


# ---------------------------------------------------------------------------------------------------
# writing


def meta_sharded_state_dict(arch: WanArch, prefix: str = "") -> dict:
    """The sharded state dict of a WanModel with ``arch`` at TP=1, built on the meta device (no memory)."""
    from megatron_rcm.models.wan import WanModel

    with torch.device("meta"):
        model = WanModel(arch.wan_config(tensor_model_parallel_size=1))
    return model.sharded_state_dict(prefix=prefix)


def sharded_tensors(sharded_sd: dict) -> dict[str, ShardedTensor]:
    """Checkpoint key -> ShardedTensor (the ``_extra_state`` ShardedObjects left out; a fused QKV linear's
    tensors under their unfused q/k/v keys)."""
    from megatron_rcm.models.fused_qkv import checkpoint_tensors

    return {v.key: v for v in checkpoint_tensors(sharded_sd)}


class _FetchingPlanner(MCoreSavePlanner):
    """Megatron's save planner whose tensor data is fetched when the writer asks for it."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]):
        super().__init__(flatten_state_dict=False, can_run_decentralized_global_plan=False)
        self._fetch = fetch
        self.error: BaseException | None = None
        """What ``fetch`` raised (DCP re-raises it wrapped in a CheckpointException of tracebacks)."""

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        try:
            return self._fetch(write_item.index.fqn)
        except BaseException as e:
            self.error = e
            raise


def _item_bytes(item) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


class _BoundedFileWriter(FileSystemWriter):
    """DCP's file writer keeps every tensor it wrote to a file referenced until that file is closed (it
    collects them for its safetensors mode), so one file per rank would hold the whole model in memory.
    Here each ``__0_i.distcp`` file gets consecutive tensors up to ``max_file_bytes``."""

    def __init__(self, path: str, max_file_bytes: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.max_file_bytes = max_file_bytes

    def write_data(self, plan, planner):
        if not hasattr(self, "_write_data"):  # an older DCP: fall back to one file per tensor
            self.single_file_per_rank = False
            return super().write_data(plan, planner)
        buckets, size = [[]], 0
        for item in plan.items:
            if buckets[-1] and size + _item_bytes(item) > self.max_file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += _item_bytes(item)
        file_queue: queue.Queue = queue.Queue()
        for i, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            file_queue.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, file_queue)


class StreamingTorchDistSave(SaveShardedStrategy):
    """Megatron's ``torch_dist`` format (same keys, chunks and planner as ``TorchDistSaveShardedStrategy``),
    written by one process through DCP's serial loader: at most one file's tensors (``max_file_bytes``,
    1 GiB) in memory at a time."""

    def __init__(self, fetch: Callable[[str], torch.Tensor], max_file_bytes: int = 2**30):
        super().__init__("torch_dist", 1)
        self._fetch = fetch
        self.max_file_bytes = max_file_bytes

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = _BoundedFileWriter(str(checkpoint_dir), self.max_file_bytes)
        planner = _FetchingPlanner(self._fetch)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        except CheckpointException:
            if planner.error is not None:
                raise planner.error from None
            raise


def save_streaming(sharded_sd: dict, ckpt_dir: str | Path, fetch: Callable[[str], torch.Tensor]) -> None:
    """``dist_checkpointing.save`` of ``sharded_sd`` (meta tensors allowed), each tensor's data coming
    from ``fetch(checkpoint_key)`` -- which must return it with the ShardedTensor's shape and dtype."""
    expected = sharded_tensors(sharded_sd)

    def checked_fetch(key: str) -> torch.Tensor:
        t = fetch(key)
        sh = expected[key]
        if tuple(t.shape) != tuple(sh.local_shape) or t.dtype != sh.data.dtype:
            raise ConversionError(
                f"{key}: fetched {t.dtype}{list(t.shape)}, planned {sh.data.dtype}{list(sh.local_shape)}"
            )
        return t.contiguous()

    dist_checkpointing.save(sharded_sd, str(ckpt_dir), sharded_strategy=StreamingTorchDistSave(checked_fetch))


# ---------------------------------------------------------------------------------------------------
# reading (no process group needed)


def tensor_metadata(ckpt_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (global shape, dtype), from DCP's ``.metadata`` alone."""
    if not is_dist_checkpoint(ckpt_dir):
        raise ConversionError(
            f"{ckpt_dir}: not a Megatron dist_checkpointing checkpoint (no metadata.json/.metadata)"
        )
    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {
        key: (tuple(m.size), m.properties.dtype)
        for key, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def load_full_tensors(ckpt_dir: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """Read whole tensors ``{key: (shape, dtype)}`` from a checkpoint, assembling any TP/PP chunks."""
    out = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
    dcp.load(
        out,
        storage_reader=FileSystemReader(str(ckpt_dir)),
        planner=DefaultLoadPlanner(allow_partial_load=True),
        no_dist=True,
    )
    return out


def load_model(model: torch.nn.Module, ckpt_dir: str | Path, prefix: str = MODEL_PREFIX) -> None:
    """Load a checkpoint into a (possibly TP-sharded, pipeline-staged) WanModel; every rank calls it.
    ``ckpt_dir`` is resolved by ``resolve_checkpoint`` (a run's root or its ``latest`` file work too).
    Keys under ``prefix`` (a training checkpoint's ``"student."`` or ``"ema.student."``) are read; all the model's must be there
    (the checkpoint may hold more: other pipeline stages' layers, other models, optimizer state)."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    sharded_sd = model.sharded_state_dict(prefix=prefix)
    loaded = dist_checkpointing.load(sharded_sd, str(ckpt_dir))  # a missing tensor raises
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in loaded.items()}
    model.load_state_dict(state, strict=True)
