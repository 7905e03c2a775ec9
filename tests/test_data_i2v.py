"""I2V members of the shard format (.clip, .y): written together, read and collated, checked for shape and
for samples that lack them."""

import pytest
import torch

from megatron_rcm.data import ShardWriter
from megatron_rcm.data.format import ShardError
from megatron_rcm.data.shards import ShardSource


def _write(out, i2v_keys, y_shape=(8, 2, 4, 4)):
    g = torch.Generator().manual_seed(0)
    with ShardWriter(out) as w:
        for i in range(2):
            extra = {}
            if i in i2v_keys:
                extra = {"clip_ND": torch.randn(5, 6, generator=g), "y_CFHW": torch.randn(*y_shape, generator=g)}
            w.write(f"s{i}", torch.randn(4, 2, 4, 4, generator=g), torch.randn(3, 8, generator=g), **extra)


def _batch(out):
    src = ShardSource(out, 2, [4, 2, 4, 4], 16, 8, seed=0, shuffle=False)
    try:
        return src.next_batch()
    finally:
        src.close()


def test_i2v_members_are_collated(tmp_path):
    _write(tmp_path / "a", {0, 1})
    b = _batch(tmp_path / "a")
    assert b.clip_fea_BND.shape == (2, 5, 6) and b.y_BCFHW.shape == (2, 8, 2, 4, 4)
    _write(tmp_path / "t2v", set())
    b = _batch(tmp_path / "t2v")
    assert b.clip_fea_BND is None and b.y_BCFHW is None


def test_i2v_member_errors(tmp_path):
    with pytest.raises(ValueError, match="needs both"):
        with ShardWriter(tmp_path / "x") as w:
            w.write("k", torch.zeros(4, 2, 4, 4), torch.zeros(3, 8), clip_ND=torch.zeros(5, 6))
    _write(tmp_path / "mixed", {1})
    with pytest.raises(ShardError, match=r"samples \['s0'\] have no I2V members"):
        _batch(tmp_path / "mixed")
    _write(tmp_path / "frames", {0, 1}, y_shape=(8, 3, 4, 4))
    with pytest.raises(ShardError, match=r"sample 's0' I2V members have shapes .y \(8, 3, 4, 4\)"):
        _batch(tmp_path / "frames")
