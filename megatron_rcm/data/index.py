"""``index.json`` of a shard folder: build it from complete tars, write it atomically, read and validate it.

The index is the folder's seal: ``ShardWriter`` writes it last, after every shard is complete, so a folder
without a valid index is an interrupted write (or tars from elsewhere that nobody has indexed) and the
reader refuses it instead of training on whatever part of the data happens to be there.

    {"version": 1, "shards": [{"name": "shard-000000.tar", "bytes": <size>,
                               "samples": [{"key": k, "members": {ext: [offset, size, crc32]}}]}]}
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from megatron_rcm.data.format import (
    INDEX_FILE,
    INDEX_VERSION,
    LATENT_EXTS,
    NEG_TEXT_EXTS,
    TEXT_EXTS,
    ShardError,
    crc32,
    split_member_name,
)

REINDEX_HINT = ("if the tars are complete (written by another tool), index them with "
                "`python tools/make_shards.py --index {root}`; a folder left by an interrupted "
                "tools/make_shards.py run is incomplete: write it again with `--overwrite`")


def scan_shard(path: Path) -> dict:
    """One shard's index entry, read from the tar itself (offset, size and crc32 of every member)."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as f:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                entry = samples.setdefault(key, {"key": key, "members": {}})
                if ext in entry["members"]:
                    raise ShardError(f"shard {path}: sample '{key}' has member .{ext} twice")
                f.seek(m.offset_data)
                data = f.read(m.size)
                if len(data) != m.size:
                    raise ShardError(f"shard {path}: sample '{key}' member .{ext} is truncated "
                                     f"({len(data)} of {m.size} bytes)")
                entry["members"][ext] = [m.offset_data, m.size, crc32(data)]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {path}: not a complete tar file ({err})") from err
    return {"name": path.name, "bytes": path.stat().st_size, "samples": list(samples.values())}


def index_folder(root: Path) -> dict:
    """The index of every ``*.tar`` in ``root`` (sorted by name), checked like ``load_index`` checks it."""
    tars = sorted(Path(root).glob("*.tar"))
    if not tars:
        raise ShardError(f"data directory {root} holds no *.tar shards to index")
    index = {"version": INDEX_VERSION, "shards": [scan_shard(p) for p in tars]}
    _check_samples(root, [(root / s["name"], e) for s in index["shards"] for e in s["samples"]])
    return index


def write_index(root: Path, index: dict) -> Path:
    """Write ``root/index.json`` atomically (temporary file, fsync, rename)."""
    path = Path(root) / INDEX_FILE
    tmp = path.with_name(f".{INDEX_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _bad(index_path: Path, what: str) -> ShardError:
    return ShardError(f"{index_path} is not a valid shard index: {what}")


def load_index(root: Path) -> list[tuple[Path, dict]]:
    """[(shard path, sample entry)] in a fixed order. Refuses a folder without a valid ``index.json``,
    an index whose shards are missing or have another byte size, and tars the index does not list."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"data directory {root} does not exist")
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        tars = sorted(p.name for p in root.glob("*.tar"))
        found = f"{len(tars)} *.tar file(s) ({', '.join(tars[:3])}{', ...' if len(tars) > 3 else ''})" \
            if tars else "no *.tar shards"
        raise ShardError(f"data directory {root} has no {INDEX_FILE} (it holds {found}); "
                         + REINDEX_HINT.format(root=root))
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(index_path, f"not valid JSON ({err}); " + REINDEX_HINT.format(root=root)) from err
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        version = index.get("version") if isinstance(index, dict) else None
        raise _bad(index_path, f"unsupported index version {version!r} (expected {INDEX_VERSION})")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise _bad(index_path, "no 'shards' list")
    out: list[tuple[Path, dict]] = []
    listed = set()
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                and isinstance(shard.get("samples"), list)):
            raise _bad(index_path, f"shard entry {i} needs a 'name' and a 'samples' list")
        path = root / shard["name"]
        listed.add(shard["name"])
        if not path.is_file():
            raise ShardError(f"shard {path} is listed in {index_path} but missing")
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise ShardError(f"shard {path}: {size} bytes on disk, {shard['bytes']} in {index_path} "
                             f"(truncated or rewritten)")
        for s in shard["samples"]:
            if not (isinstance(s, dict) and isinstance(s.get("key"), str) and isinstance(s.get("members"), dict)
                    and all(isinstance(m, list) and len(m) == 3 for m in s["members"].values())):
                raise _bad(index_path, f"shard {shard['name']}: sample entry {s!r:.120} needs a 'key' and "
                                       f"'members' {{ext: [offset, size, crc32]}}")
            out.append((path, s))
    stale = sorted(p.name for p in root.glob("*.tar") if p.name not in listed)
    if stale:
        raise ShardError(f"data directory {root}: shard(s) {stale} are not listed in {index_path} (left from "
                         f"another write?); remove them, or re-index the folder with "
                         f"`python tools/make_shards.py --index {root}` if they belong to the data set")
    _check_samples(root, out)
    return out


def _check_samples(root: Path, samples: list[tuple[Path, dict]]) -> None:
    """Every key once, every sample with a latent and a text member, at least one sample."""
    seen: dict[str, Path] = {}
    for path, s in samples:
        if s["key"] in seen:
            raise ShardError(f"shard {path}: sample key '{s['key']}' also appears in shard {seen[s['key']]}")
        seen[s["key"]] = path
        exts = s["members"]
        if not any(e in exts for e in LATENT_EXTS):
            raise ShardError(f"shard {path}: sample '{s['key']}' has no latent member "
                             f"({' or '.join('.' + e for e in LATENT_EXTS)}); found {sorted(exts)}")
        if not any(e in exts for e in TEXT_EXTS):
            raise ShardError(f"shard {path}: sample '{s['key']}' has no text-embedding member "
                             f"({' or '.join('.' + e for e in TEXT_EXTS)}); found {sorted(exts)}")
    if not samples:
        raise ShardError(f"data directory {root} holds no samples")


def samples_without_negative(samples: list[tuple[Path, dict]]) -> list[str]:
    """Keys of the samples that carry no per-sample negative-prompt member (``.neg_t5.*``)."""
    return [s["key"] for _, s in samples if not any(e in s["members"] for e in NEG_TEXT_EXTS)]
