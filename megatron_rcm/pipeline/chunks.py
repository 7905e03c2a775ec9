"""Resumable, rank-sliced shard writing, assembled atomically into one shard folder.

N records are cut into chunks of S (samples per shard): chunk c holds records [c S, min((c + 1) S, N)).
Rank r of W writes the chunks c with c mod W == r, each as its own ``ShardWriter`` folder::

    <parent of out>/.<name of out>.parts/
        plan.json             the settings the chunks are written with (a rerun must use the same)
        negative.t5.pth       the negative-prompt embedding (written once, by rank 0)
        chunk-000000/         a complete ShardWriter folder (shard-000000.tar + index.json), or absent
        .chunk-000001.tmp-<pid>/   a chunk being written (removed by the next run once its writer is dead)

A chunk folder exists only when complete (ShardWriter renames it into place after writing its index), so
a rerun skips complete chunks and redoes the others. ``assemble`` (one process, after every rank finished)
hard-links (or copies) the chunks' tars into a temporary folder as ``shard-<chunk>.tar``, writes the merged
``index.json`` last, renames the folder to ``out`` (``megatron_rcm.data.writer.publish``) and removes the
parts folder. ``out`` therefore is either absent, the previous data set, or complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_rcm.atomic import atomic_output_dir, sweep_leftovers
from megatron_rcm.data.format import INDEX_FILE, INDEX_VERSION, NEGATIVE_FILE
from megatron_rcm.data.index import load_index, write_index
from megatron_rcm.data.writer import ShardWriter, check_output_dir

logger = logging.getLogger("megatron_rcm.pipeline")
PLAN_FILE = "plan.json"


class ChunkError(RuntimeError):
    """A parts folder that does not belong to this run, or chunks missing at assembly; names the folder."""


def rank_chunks(num_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks rank ``rank`` of ``world_size`` writes: c mod world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, num_chunks, world_size))


class ChunkedShards:
    """The parts folder of ``out`` for ``num_records`` records (module docstring)."""

    def __init__(self, out: str | Path, num_records: int, samples_per_shard: int, plan: dict,
                 overwrite: bool = False):
        if num_records < 1:
            raise ValueError("nothing to write: no records")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out = Path(os.path.abspath(out))
        self.parts = self.out.with_name(f".{self.out.name}.parts")
        self.num_records, self.per_chunk = num_records, samples_per_shard
        self.num_chunks = -(-num_records // samples_per_shard)
        self.plan = {**plan, "num_records": num_records, "samples_per_shard": samples_per_shard}
        self.overwrite = overwrite
        check_output_dir(self.out, overwrite)

    # -- set-up (every rank) ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create the parts folder and its plan unless there (every rank may: the ranks of one run write the
        same plan, each atomically); ``check_plan`` then compares an existing plan with this run's."""
        path = self.parts / PLAN_FILE
        self.parts.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            _write_atomic(path, json.dumps(self.plan, indent=2, sort_keys=True))

    def check_plan(self) -> None:
        path = self.parts / PLAN_FILE
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ChunkError(f"{path} cannot be read ({err}); remove {self.parts} to start over") from err
        plan = json.loads(json.dumps(self.plan))  # tuples -> lists, as stored
        diffs = [f"{k}: {stored.get(k)!r} (stored) != {plan.get(k)!r}" for k in sorted(set(stored) | set(plan))
                 if stored.get(k) != plan.get(k)]
        if diffs:
            raise ChunkError(f"{self.parts} holds chunks of a run with other settings ({'; '.join(diffs)}); "
                             f"rerun with those settings to resume it, or remove {self.parts} to start over")

    # -- chunks ----------------------------------------------------------------------------------------
    def chunk_dir(self, c: int) -> Path:
        return self.parts / f"chunk-{c:06d}"

    def records(self, c: int) -> range:
        return range(c * self.per_chunk, min((c + 1) * self.per_chunk, self.num_records))

    def is_complete(self, c: int) -> bool:
        return (self.chunk_dir(c) / INDEX_FILE).is_file()

    def todo(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's chunks that are not complete yet."""
        return [c for c in rank_chunks(self.num_chunks, rank, world_size) if not self.is_complete(c)]

    def write_chunk(self, c: int, samples: Iterable[tuple]) -> Path:
        """Write chunk ``c`` from ``(key, latent [C,F,H,W], t5 [L,D], meta[, extra])`` tuples, atomically;
        ``extra`` holds more ``ShardWriter.write`` arguments (the I2V ``clip_ND`` and ``y_CFHW``)."""
        with ShardWriter(self.chunk_dir(c), samples_per_shard=self.per_chunk) as writer:
            for key, latent, t5, meta, *extra in samples:
                writer.write(key, latent, t5, meta=meta, **(extra[0] if extra else {}))
        return self.chunk_dir(c)

    @property
    def negative_path(self) -> Path:
        return self.parts / NEGATIVE_FILE

    def write_negative(self, negative_LD: torch.Tensor) -> None:
        tmp = self.negative_path.with_name(f".{NEGATIVE_FILE}.tmp-{os.getpid()}")
        torch.save(negative_LD.detach().cpu().clone(), tmp)
        os.replace(tmp, self.negative_path)

    # -- assembly (one process, after every rank) ------------------------------------------------------
    def assemble(self) -> Path:
        """Publish the complete chunks as one shard folder at ``out`` and remove the parts folder."""
        missing = [c for c in range(self.num_chunks) if not self.is_complete(c)]
        if missing:
            raise ChunkError(f"{self.parts}: chunk(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} of "
                             f"{self.num_chunks} are not complete; rerun the same command to write them")
        check_output_dir(self.out, self.overwrite)
        sweep_leftovers(self.out, "shard write", logger.warning)
        with atomic_output_dir(self.out) as tmp:
            shards = []
            for c in range(self.num_chunks):
                src = self.chunk_dir(c)
                load_index(src)  # the chunk is intact (sizes, keys) before it is linked in
                for shard in json.loads((src / INDEX_FILE).read_text())["shards"]:
                    name = f"shard-{len(shards):06d}.tar"
                    _link_or_copy(src / shard["name"], tmp / name)
                    shards.append({**shard, "name": name})
            if self.negative_path.is_file():
                _link_or_copy(self.negative_path, tmp / NEGATIVE_FILE)
            write_index(tmp, {"version": INDEX_VERSION, "shards": shards})
        shutil.rmtree(self.parts)
        return self.out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
