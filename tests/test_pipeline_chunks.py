"""Rank slicing, resuming and atomic assembly of chunked shard writing (megatron_rcm.pipeline.chunks),
without any model: the chunks hold small random tensors."""

import pytest
import torch

from megatron_rcm.data.format import NEGATIVE_FILE
from megatron_rcm.data.index import load_index
from megatron_rcm.pipeline.chunks import ChunkedShards, ChunkError, rank_chunks

N, PER = 7, 2  # 4 chunks: [0, 1], [2, 3], [4, 5], [6]


def _samples(chunks, c, calls):
    for i in chunks.records(c):
        calls.append(i)
        g = torch.Generator().manual_seed(i)
        yield f"{i:08d}", torch.randn(2, 1, 2, 2, generator=g), torch.randn(3, 4, generator=g), {"i": i}


def _chunks(out, **plan):
    return ChunkedShards(out, N, PER, {"setting": 1, **plan})


def test_rank_slices_cover_every_chunk_once():
    for n, world in ((4, 2), (7, 3), (2, 4), (1, 1)):
        slices = [rank_chunks(n, r, world) for r in range(world)]
        assert sorted(c for s in slices for c in s) == list(range(n))
    assert rank_chunks(4, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="rank 2"):
        rank_chunks(4, 2, 2)


def test_two_ranks_then_assembly(tmp_path):
    out = tmp_path / "shards"
    calls = {0: [], 1: []}
    for rank in (1, 0):  # the ranks of a 2-process job, one after the other
        chunks = _chunks(out)
        chunks.open()
        chunks.check_plan()
        if rank == 0:
            chunks.write_negative(torch.ones(3, 4))
        for c in chunks.todo(rank, 2):
            chunks.write_chunk(c, _samples(chunks, c, calls[rank]))
    assert calls == {0: [0, 1, 4, 5], 1: [2, 3, 6]}
    assert not out.exists()  # nothing is presented before assembly
    chunks.assemble()
    samples = load_index(out)
    assert sorted(s["key"] for _, s in samples) == [f"{i:08d}" for i in range(N)]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", NEGATIVE_FILE] + [f"shard-{c:06d}.tar" for c in range(4)]
    assert not chunks.parts.exists()


def test_resume_redoes_only_missing_chunks(tmp_path):
    out = tmp_path / "shards"
    chunks = _chunks(out)
    chunks.open()
    for c in (0, 2):
        chunks.write_chunk(c, _samples(chunks, c, []))

    def killed():  # a run interrupted inside chunk 1: no chunk folder appears
        yield from _samples(chunks, 1, [])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chunks.write_chunk(1, killed())
    assert not chunks.chunk_dir(1).exists()
    with pytest.raises(ChunkError, match=r"chunk\(s\) \[1, 3\] of 4 are not complete"):
        chunks.assemble()
    rerun, calls = _chunks(out), []
    rerun.check_plan()
    assert rerun.todo() == [1, 3]
    for c in rerun.todo():
        rerun.write_chunk(c, _samples(rerun, c, calls))
    assert calls == [2, 3, 6]
    rerun.assemble()
    assert len(load_index(out)) == N


def test_rerun_with_other_settings_is_refused(tmp_path):
    chunks = _chunks(tmp_path / "shards")
    chunks.open()
    other = _chunks(tmp_path / "shards", setting=2)
    with pytest.raises(ChunkError, match=r"setting: 1 \(stored\) != 2.*remove .*\.shards\.parts"):
        other.check_plan()


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "old.tar").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _chunks(out)
    chunks = ChunkedShards(out, N, PER, {}, overwrite=True)
    chunks.open()
    for c in chunks.todo():
        chunks.write_chunk(c, _samples(chunks, c, []))
    chunks.assemble()
    assert not (out / "old.tar").exists() and len(load_index(out)) == N
