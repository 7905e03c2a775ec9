"""Tar shards: round trip, DP split, exact resume of the position, and clear errors on bad shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from megatron_rcm.data import ShardError, ShardWriter
from megatron_rcm.data.format import INDEX_FILE
from megatron_rcm.data.index import index_folder, write_index
from megatron_rcm.data.shards import ShardSource

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 1, 4, 4)


def _write(tmp_path, n=10, per_shard=4, neg=True):
    g = torch.Generator().manual_seed(1)
    data = {}
    with ShardWriter(tmp_path, per_shard, torch.randn(3, 8, generator=g) if neg else None) as w:
        for i in range(n):
            lat, t5 = torch.randn(SHAPE, generator=g), torch.randn(2 + i % 3, 8, generator=g)
            w.write(f"s{i:03d}", lat, t5, meta={"i": i})
            data[f"s{i:03d}"] = (lat, t5)
    return data


def _source(root, **kw):
    args = dict(micro_batch_size=3, latent_shape_CFHW=SHAPE, text_len=6, text_dim=8, seed=5)
    args.update(kw)
    return ShardSource(root, **args)


def test_round_trip_and_padding(tmp_path):
    data = _write(tmp_path)
    assert len(list(tmp_path.glob("*.tar"))) == 3
    src = _source(tmp_path)
    b = src.next_batch()
    assert b.latent_BCFHW.shape == (3, *SHAPE) and b.context_BLD.shape == (3, 6, 8)
    assert b.neg_context_BLD.shape == (1, 6, 8)
    for k, lat, ctx in zip(b.keys, b.latent_BCFHW, b.context_BLD):
        ref_lat, ref_t5 = data[k]
        torch.testing.assert_close(lat, ref_lat, rtol=0, atol=0)
        L = ref_t5.shape[0]
        torch.testing.assert_close(ctx[:L], ref_t5, rtol=0, atol=0)
        assert ctx[L:].abs().sum() == 0  # zero padding, as Wan pads umT5 output


def test_epoch_covers_all_and_dp_ranks_are_disjoint(tmp_path):
    _write(tmp_path, n=10)
    seen = []
    for r in range(2):
        src = _source(tmp_path, micro_batch_size=1, dp_rank=r, dp_size=2)
        seen.append([src.next_batch().keys[0] for _ in range(5)])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 10
    # the next epoch is a different permutation of the same samples
    src = _source(tmp_path, micro_batch_size=1)
    e0 = [src.next_batch().keys[0] for _ in range(10)]
    e1 = [src.next_batch().keys[0] for _ in range(10)]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_resume_position_is_exact(tmp_path):
    _write(tmp_path, n=10)
    ref = _source(tmp_path)
    ref_keys = [ref.next_batch().keys for _ in range(7)]  # crosses two epoch boundaries
    a = _source(tmp_path)
    [a.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # must survive serialization
    b = _source(tmp_path)
    b.load_state_dict(state)
    assert [b.next_batch().keys for _ in range(4)] == ref_keys[3:]


def test_corrupt_member_names_shard_and_key(tmp_path):
    _write(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    entry = index["shards"][1]["samples"][2]
    off, size, _ = entry["members"]["latent.pth"]
    path = tmp_path / index["shards"][1]["name"]
    raw = bytearray(path.read_bytes())
    raw[off + size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    src = _source(tmp_path, micro_batch_size=10)
    with pytest.raises(ShardError, match=rf"{path.name}.*'{entry['key']}'.*crc32"):
        src.next_batch()


def test_truncated_shard_is_detected_at_open(tmp_path):
    _write(tmp_path)
    path = tmp_path / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(ShardError, match=r"shard-000002.tar.*truncated"):
        _source(tmp_path)


def _tar_with(path, members, index=True):
    """A tar written by another tool, indexed with ``make_shards.py --index``'s function."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if index:
        write_index(path.parent, index_folder(path.parent))


def _pth(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_missing_member_is_refused_by_the_indexer(tmp_path):
    with pytest.raises(ShardError, match=r"a.tar.*'k2'.*no text-embedding"):
        _tar_with(tmp_path / "a.tar", {"k1.latent.pth": _pth(torch.zeros(SHAPE)),
                                       "k1.t5.pth": _pth(torch.zeros(2, 8)), "k2.latent.pth": _pth(torch.zeros(SHAPE))})
    assert not (tmp_path / INDEX_FILE).exists()


def test_shape_mismatch_and_undecodable(tmp_path):
    _tar_with(tmp_path / "a.tar", {"k1.latent.pth": _pth(torch.zeros(4, 1, 4, 2)), "k1.t5.pth": _pth(torch.zeros(2, 8))})
    with pytest.raises(ShardError, match=r"a.tar.*'k1'.*latent has shape \(4, 1, 4, 2\)"):
        _source(tmp_path, micro_batch_size=1).next_batch()
    _tar_with(tmp_path / "a.tar", {"k1.latent.pth": b"garbage", "k1.t5.pth": _pth(torch.zeros(2, 8))})
    with pytest.raises(ShardError, match=r"a.tar.*'k1'.*cannot be decoded"):
        _source(tmp_path, micro_batch_size=1).next_batch()
    _tar_with(tmp_path / "a.tar", {"k1.latent.pth": _pth(torch.zeros(SHAPE)), "k1.t5.pth": _pth(torch.zeros(9, 8))})
    with pytest.raises(ShardError, match=r"a.tar.*'k1'.*9 tokens"):
        _source(tmp_path, micro_batch_size=1).next_batch()


def test_resume_with_other_dataset_size_is_refused(tmp_path):
    _write(tmp_path / "a", n=10)
    _write(tmp_path / "b", n=9)
    state = _source(tmp_path / "a").state_dict()
    with pytest.raises(ShardError, match="exact resume is impossible"):
        _source(tmp_path / "b").load_state_dict(state)


def make_shards(*args):
    """Run tools/make_shards.py with this checkout's package first on the path (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_make_shards_tool_from_dir_and_reindex(tmp_path):
    src = tmp_path / "loose"
    src.mkdir()
    for i in range(3):
        torch.save(torch.full(SHAPE, float(i)), src / f"v{i}.latent.pth")
        torch.save(torch.ones(2, 8), src / f"v{i}.t5.pth")
    out = tmp_path / "shards"
    proc = make_shards("--from-dir", src, "--out", out, "--samples-per-shard", 2)
    assert proc.returncode == 0, proc.stderr
    written = (out / INDEX_FILE).read_text()
    (out / INDEX_FILE).unlink()
    proc = make_shards("--index", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / INDEX_FILE).read_text()) == json.loads(written)
    b = _source(out, micro_batch_size=3, shuffle=False).next_batch()
    assert b.keys == ["v0", "v1", "v2"] and b.latent_BCFHW[2].eq(2).all()
