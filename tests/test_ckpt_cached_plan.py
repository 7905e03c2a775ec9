"""Megatron's cached save plan (Megatron-LM's ``--ckpt-assume-constant-structure``: ``TorchDistSaveShardedStrategy(
..., cached_metadata=True)``) stays off (issue 13, item 3). In megatron-core 0.16.1 the plan is compared
with the previous one only until two saves agree (``save_state_dict_async_plan`` returns
``cached_central_plan == central_plan``); from then on the cached local plan is reused without calling
``create_local_plan`` again, so a state dict that gains a tensor (e.g. the optimizer's moments after the
first step) is saved without it, silently. ``CheckpointManager``'s strategy re-plans every save: the same
sequence round-trips bit for bit (and fails when the manager is given the cached strategy and
``FullyParallelSaveStrategyWrapper(..., do_cache_distribution=True)``, 0.16.1's name for the wrapper's cache,
whose distribution is reused from the first save without any check). If a Megatron upgrade revalidates the
cache, the first test fails: then the plan (1.1-1.4 s of the stall for Wan 1.3B) can be cached."""

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.training.checkpoint import CheckpointManager, _writers_die_with_trainer

_G = torch.Generator().manual_seed(0)
W, M = torch.randn(4, 3, generator=_G), torch.randn(5, generator=_G)


def _sd(with_moment: bool, w=W, m=M) -> dict:
    sd = {"w": ShardedTensor.from_rank_offsets("w", w.clone())}
    if with_moment:
        sd["m"] = ShardedTensor.from_rank_offsets("m", m.clone())
    return sd


def _save(sd, path, strategy):
    path.mkdir()
    with _writers_die_with_trainer(path):  # no multiprocessing.Manager (see checkpoint.py)
        dist_checkpointing.save(sd, str(path), strategy)


def test_megatron_cached_plan_drops_a_tensor_added_after_validation(tmp_path):
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    initialize_parallel()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
    for i in range(3):  # the second save validates the cache, the third reuses it
        _save(_sd(False), tmp_path / f"a{i}", strategy)
    assert strategy.validated_cache_reuse
    _save(_sd(True), tmp_path / "b", strategy)  # the structure changed: no error...
    saved = FileSystemReader(str(tmp_path / "b")).read_metadata().state_dict_metadata
    assert "w" in saved and "m" not in saved  # ...and the new tensor is missing from the checkpoint


def test_manager_saves_a_changing_structure_and_loads_it_bit_equal(tmp_path):
    initialize_parallel()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5, async_save=False)
    for step in range(3):
        manager.save(step, _sd(False))
    path = manager.save(3, _sd(True))
    manager.close()
    loaded = manager.load(_sd(True, torch.zeros_like(W), torch.zeros_like(M)), path)
    assert torch.equal(loaded["w"], W) and torch.equal(loaded["m"], M)
    assert manager._save_strategy().base_strategy.use_cached_ckpt_structure is False
