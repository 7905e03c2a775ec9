"""A teacher checkpoint of another architecture: one error naming the preset and both shapes, before
Megatron's loader runs (which would fail on the first tensor with a raw CheckpointingException)."""

import pytest
import torch
from safetensors.torch import save_file

from megatron_rcm.config.schema import ConfigError
from megatron_rcm.models.wan import WanModel, wan_config
from megatron_rcm.parallel.sharding import gather_full_state_dict
from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.training.models import export_model, load_weights


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _model(**overrides):
    return WanModel(wan_config("wan-tiny-t2v", params_dtype=torch.float32, **overrides))


def test_dist_checkpoint_of_another_width_names_preset_and_shapes(tmp_path):
    export_model(_model(), tmp_path / "teacher")
    wider = _model(num_layers=3, hidden_size=192)
    before = {k: v.clone() for k, v in wider.named_parameters()}
    with pytest.raises(ConfigError) as err:
        load_weights(wider, tmp_path / "teacher", preset="wan-tiny-t2v")
    msg = str(err.value)
    assert "model.preset='wan-tiny-t2v'" in msg and str(tmp_path / "teacher") in msg
    assert "checkpoint: 2 layers, hidden 128" in msg and "model:      3 layers, hidden 192" in msg
    assert "patch_embedding.weight (128, 16) (expected (192, 16))" in msg
    assert "missing" in msg and "blocks.2." in msg
    assert all(torch.equal(before[k], v) for k, v in wider.named_parameters())  # nothing half-loaded


def test_full_state_dict_of_another_ffn_width_is_named(tmp_path):
    save_file({k: v.contiguous() for k, v in gather_full_state_dict(_model(ffn_hidden_size=384)).items()},
              tmp_path / "t.safetensors")
    with pytest.raises(ConfigError, match=r"FFN 384.*\n.*FFN 256|mismatching shapes: .*linear_fc1"):
        load_weights(_model(), tmp_path / "t.safetensors", preset="wan-tiny-t2v")


def test_matching_checkpoint_loads(tmp_path):
    src = _model()
    export_model(src, tmp_path / "teacher")
    dst = _model()
    torch.nn.init.zeros_(dst.patch_embedding.weight)
    load_weights(dst, tmp_path / "teacher", preset="wan-tiny-t2v")
    assert torch.equal(dst.patch_embedding.weight, src.patch_embedding.weight)
