"""A rank that holds two copies of one checkpoint shard (the conditioning embeddings of each model chunk under the
interleaved pipeline schedule) saves with Megatron's fully parallel strategy over a data-parallel group > 1:
``CheckpointManager.save`` keeps one local copy per shard (``one_copy_per_shard``). Without that, the strategy
makes both copies main replicas on the rank it picks and the save fails; the loaded checkpoint fills every copy.

2 gloo processes (DP=2), each holding the same tensor twice (replica ids (0, 0, dp) and (1, 0, dp), as
``ModelChunks.sharded_state_dict`` gives chunks 0 and 1 at PP=1 x V=2's first stage) plus one tensor of its own.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import spawn


def _sd(dp_rank, emb, own):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        "0.emb": ShardedTensor.from_rank_offsets("emb", emb, replica_id=(0, 0, dp_rank)),
        "1.emb": ShardedTensor.from_rank_offsets("emb", emb.clone(), replica_id=(1, 0, dp_rank)),
        "nested": [{"own": ShardedTensor.from_rank_offsets("own", own, (0, dp_rank, 2))}],
        "step": 3,
    }


def _worker(rank, world, root, dedupe):
    from megatron.core import dist_checkpointing

    from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
    from megatron_rcm.training import checkpoint

    initialize_parallel(tensor_parallel=1)
    emb, own = torch.arange(6.0).view(2, 3), torch.full((1, 4), float(rank))
    if not dedupe:  # the negative: the state dict handed to the strategy as it is
        checkpoint.one_copy_per_shard = lambda sd: sd
    mgr = checkpoint.CheckpointManager(root)
    try:
        path = mgr.save(3, _sd(rank, emb, own))
    except Exception as e:  # noqa: BLE001  (returned to the test process, which asserts on it)
        destroy_parallel()
        return repr(e)
    loaded = dist_checkpointing.load(_sd(rank, torch.zeros(2, 3), torch.zeros(1, 4)), str(path))
    destroy_parallel()
    return {"0.emb": loaded["0.emb"], "1.emb": loaded["1.emb"], "own": loaded["nested"][0]["own"],
            "want emb": emb, "want own": own, "step": loaded["step"]}


def test_two_local_copies_of_a_shard_save_and_load(tmp_path):
    out = spawn(_worker, 2, str(tmp_path / "ckpt"), True)
    assert isinstance(out, dict), out
    assert torch.equal(out["0.emb"], out["want emb"]) and torch.equal(out["1.emb"], out["want emb"])
    assert torch.equal(out["own"], out["want own"]) and out["step"] == 3


def test_without_one_copy_per_shard_the_save_fails(tmp_path):
    out = spawn(_worker, 2, str(tmp_path / "ckpt"), False)
    assert isinstance(out, str) and "Invalid access pattern" in out, out


def test_one_copy_per_shard_keeps_a_main_replica_and_checks_shapes():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rcm.training.ckpt_layout import one_copy_per_shard

    t = torch.zeros(2, 3)
    copy = ShardedTensor.from_rank_offsets("emb", t, replica_id=(1, 0, 0))
    main = ShardedTensor.from_rank_offsets("emb", t.clone(), replica_id=(0, 0, 0))
    other = ShardedTensor.from_rank_offsets("other", t, replica_id=(1, 0, 0))
    out = one_copy_per_shard({"a": copy, "b": [main, 5], "c": {"d": other}})
    assert out.keys() == {"b", "c"} and out["b"][0] is main and out["b"][1] == 5 and out["c"]["d"] is other
    bad = ShardedTensor.from_rank_offsets("emb", torch.zeros(3, 2), replica_id=(1, 0, 0))
    with pytest.raises(ValueError, match=r"'emb' differ: shape \(2, 3\) torch.float32 vs \(3, 2\)"):
        one_copy_per_shard({"a": main, "b": bad})


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
