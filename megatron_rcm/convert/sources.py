"""Find a Wan2.1 checkpoint's weight files, open them lazily, and tell which layout their keys are in.

SRC may be a weight file, a ``*.index.json``, a folder of them, or a diffusers pipeline root (its
``transformer/`` folder is used). In a folder, safetensors win over ``.pth/.pt/.bin`` (the original
release keeps its T5, CLIP and VAE ``.pth`` files beside the DiT's safetensors); an index JSON names the
shards; several files without an index must be one ``name-0000i-of-0000n`` set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rcm.convert.errors import CorruptFileError, KeyMismatchError, UnknownLayoutError
from megatron_rcm.convert.safetensors_io import SafetensorsFile
from megatron_rcm.convert.wan_keys import TABLES, map_key

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_SHARD = re.compile(r"(.+)-(\d+)-of-(\d+)\.(safetensors|pth|pt|bin)$")
_EXAMPLE_KEYS = {
    "diffusers": "blocks.0.attn1.to_q.weight",
    "original": "blocks.0.self_attn.q.weight",
    "rcm": "net.blocks.0.self_attn.q.weight",
}


class PthFile:
    """A torch-pickled state dict, opened with ``mmap=True``: tensors are paged in when read."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            obj = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... by cause
            raise CorruptFileError(f"{self.path}: cannot read as a torch checkpoint ({e}); truncated?") from e
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            for wrapper in ("state_dict", "model", "module"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
        if not isinstance(obj, dict):
            raise CorruptFileError(f"{self.path}: holds a {type(obj).__name__}, not a state dict")
        others = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
        if others:
            raise CorruptFileError(f"{self.path}: entries that are not tensors: {others}")
        self._sd = obj

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name].clone()

    def close(self) -> None:
        self._sd = {}


class _SafetensorsReader(SafetensorsFile):
    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype


def _open(path: Path):
    return _SafetensorsReader(str(path)) if path.suffix == ".safetensors" else PthFile(str(path))


@dataclass
class Source:
    """The tensors of one checkpoint, across its files, read on demand."""

    root: Path
    """The folder holding the weights (and ``config.json``, if any)."""
    files: list[Path]
    index: Path | None = None
    config: dict | None = None
    pipeline_root: Path | None = None
    """Set when SRC was a diffusers pipeline root and its ``transformer/`` folder was used."""
    _where: dict = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        for reader in {id(r): r for r in self._where.values()}.values():
            reader.close()


def _pick_weight_files(folder: Path) -> tuple[list[Path], Path | None]:
    """(weight files, index or None) of a folder; see the module docstring for the rules."""
    for suffixes in ((".safetensors",), (".pth", ".pt", ".bin")):
        indexes = sorted(
            p for p in folder.iterdir() if p.name.endswith(tuple(s + ".index.json" for s in suffixes))
        )
        if len(indexes) > 1:
            raise UnknownLayoutError(
                f"{folder}: several index files {[p.name for p in indexes]}; pass the one to convert as SRC"
            )
        if indexes:
            return [], indexes[0]
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(files) == 1:
            return files, None
        if files:
            shards = [_SHARD.match(p.name) for p in files]
            if all(shards) and len({(m.group(1), m.group(3)) for m in shards}) == 1:
                total = int(shards[0].group(3))
                if sorted(int(m.group(2)) for m in shards) != list(range(1, total + 1)):
                    raise CorruptFileError(
                        f"{folder}: shard set {[p.name for p in files]} is incomplete (expected {total})"
                    )
                return files, None
            raise UnknownLayoutError(
                f"{folder}: several weight files and no index: {[p.name for p in files]}; "
                "pass the file to convert as SRC"
            )
    raise UnknownLayoutError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) found")


def open_source(src: str | Path) -> Source:
    """Locate and open the weight files of SRC (keys, shapes and dtypes read now; tensors on demand)."""
    src = Path(src)
    if not src.exists():
        raise UnknownLayoutError(f"{src}: no such file or directory")
    pipeline_root = None
    if src.is_dir() and (src / "transformer").is_dir():
        has_weights = any(p.suffix in WEIGHT_SUFFIXES for p in src.iterdir() if p.is_file())
        if (src / "model_index.json").exists() or not has_weights:
            if (src / "transformer_2").is_dir():
                raise UnknownLayoutError(
                    f"{src}: a two-expert pipeline (Wan2.2 A14B): transformer/ is the high-noise expert, "
                    "transformer_2/ the low-noise one; run_import converts both (into high_noise_model/ and "
                    f"low_noise_model/), or open each folder on its own ({src / 'transformer'}, {src / 'transformer_2'})"
                )
            pipeline_root, src = src, src / "transformer"
    index = None
    if src.is_dir():
        root = src
        files, index = _pick_weight_files(src)
    elif src.name.endswith(".index.json"):
        root, files, index = src.parent, [], src
    elif src.suffix in WEIGHT_SUFFIXES:
        root, files = src.parent, [src]
    else:
        raise UnknownLayoutError(f"{src}: not a weight file ({', '.join(WEIGHT_SUFFIXES)} or *.index.json)")

    where: dict = {}
    if index is not None:
        files = _open_indexed(index, where)
    else:
        for path in files:
            reader = _open(path)
            for key in reader.keys():
                if key in where:
                    raise CorruptFileError(f"{key!r} is in both {where[key].path} and {path}")
                where[key] = reader
    config = None
    if (root / "config.json").exists():
        try:
            config = json.loads((root / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{root / 'config.json'}: not valid JSON ({e})") from None
    return Source(root, files, index, config, pipeline_root, where)


def _open_indexed(index: Path, where: dict) -> list[Path]:
    """Open the shards an index names; each must hold exactly the keys the index assigns to it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{index}: not a weight index (needs a 'weight_map'): {e!r}") from None
    by_file: dict[str, set] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, set()).add(key)
    files = []
    for name, keys in sorted(by_file.items()):
        path = index.parent / name
        if not path.exists():
            raise CorruptFileError(f"{index}: shard {name} is missing (it should hold {len(keys)} tensors)")
        reader = _open(path)
        held = set(reader.keys())
        if held != keys:
            raise KeyMismatchError(f"{path} against {index.name}", sorted(keys - held), sorted(held - keys))
        for key in keys:
            where[key] = reader
        files.append(path)
    return files


def detect_layout(keys: list[str], config: dict | None = None) -> str:
    """The layout whose key table maps the most keys ("diffusers", "original", or "rcm": original names
    under ``net.``/``net_ema.``); config.json's ``_class_name`` breaks a tie. Raises UnknownLayoutError
    when none fits."""
    scores = {}
    for layout in TABLES:
        n = 0
        for key in keys:
            try:
                map_key(key, layout)
                n += 1
            except KeyError:
                pass
        scores[layout] = n
    best = max(scores.values())
    winners = [layout for layout, n in scores.items() if n == best]
    if len(winners) > 1 and config is not None:
        hint = {"WanTransformer3DModel": "diffusers", "WanModel": "original"}.get(config.get("_class_name"))
        winners = [hint] if hint in winners else winners
    has_blocks = any(re.match(r"(net_ema\.|net\.)?blocks\.", key) for key in keys)
    if best == 0 or best < len(keys) / 2 or len(winners) > 1 or not has_blocks:
        sample = sorted(keys)[:8]
        raise UnknownLayoutError(
            f"no Wan2.1 layout recognized in {len(keys)} tensors (diffusers matched {scores['diffusers']}, "
            f"original {scores['original']}, rcm {scores['rcm']}); first keys: {sample}. Expected diffusers "
            f"keys like {_EXAMPLE_KEYS['diffusers']!r}, original keys like {_EXAMPLE_KEYS['original']!r} or "
            f"rCM/TurboDiffusion student keys like {_EXAMPLE_KEYS['rcm']!r}"
        )
    return winners[0]
