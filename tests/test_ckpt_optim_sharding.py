"""How the distributed optimizer's checkpoint is written (``checkpoint.optim_fully_reshardable``) and the
resume check that a per-rank (``dp_reshardable``) optimizer checkpoint is not loaded at another TP/PP layout.
The save and load themselves need CUDA (Megatron's DistributedOptimizer): tests/test_ckpt_optim_gpu.py."""

import json

import pytest

from megatron_rcm.config import load_config
from megatron_rcm.config.loader import to_dict
from megatron_rcm.training.checkpoint import CheckpointError, check_optim_layout, optim_sharding_of
from megatron_rcm.training.optim import MegatronOptimizer


def _config(**parallel):
    return load_config(None, ["data.source=mock", *(f"parallel.{k}={v}" for k, v in parallel.items())])


def _fake_ckpt(tmp_path, sharding, **parallel):
    cfg = to_dict(_config(**parallel))
    meta = {"step": 3, "config": cfg}
    if sharding is not None:
        meta["optim_sharding"] = sharding
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _run(**parallel):
    return to_dict(_config(**parallel))


def test_default_is_megatrons_per_rank_format():
    assert _config().checkpoint.optim_fully_reshardable is False


def test_checkpoints_without_the_field_were_fully_reshardable(tmp_path):
    assert optim_sharding_of(_fake_ckpt(tmp_path, None)) == "fully_reshardable"


@pytest.mark.parametrize("change", [{"tensor_parallel": 2}, {"pipeline_parallel": 2}])
def test_per_rank_optimizer_checkpoint_refuses_another_tp_or_pp(tmp_path, change):
    path = _fake_ckpt(tmp_path, "dp_reshardable")
    with pytest.raises(CheckpointError) as err:
        check_optim_layout(path, _run(**change))
    key = next(iter(change))
    assert f"parallel.{key}: 1 -> 2" in str(err.value) and "optim_fully_reshardable=true" in str(err.value)


def test_per_rank_optimizer_checkpoint_allows_another_dp_or_cp(tmp_path):
    path = _fake_ckpt(tmp_path, "dp_reshardable", tensor_parallel=2)
    check_optim_layout(path, _run(tensor_parallel=2, context_parallel=2))


def test_fully_reshardable_checkpoint_allows_any_layout(tmp_path):
    check_optim_layout(_fake_ckpt(tmp_path, "fully_reshardable"), _run(tensor_parallel=2, pipeline_parallel=2))


def test_unknown_sharding_is_refused():
    opt = MegatronOptimizer.__new__(MegatronOptimizer)
    with pytest.raises(ValueError, match="fully_sharded_model_space"):
        opt.sharded_state_dict({}, "optimizer.student", sharding="fully_sharded_model_space")
