"""Wan and Cosmos configs use Megatron's TransformerConfig fields (``layernorm_epsilon``, the recompute
fields) instead of shadowing them; the override name ``norm_eps`` maps onto ``layernorm_epsilon``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rcm.models.config_fields import recompute_fields
from megatron_rcm.models.cosmos.config import CosmosConfig, cosmos_config
from megatron_rcm.models.wan.config import WanConfig, wan_config


@pytest.mark.parametrize("cls", [WanConfig, CosmosConfig])
def test_no_field_repeats_a_transformer_config_field(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    assert "norm_eps" not in names and "recompute_blocks" not in names


@pytest.mark.parametrize("build", [lambda **kw: wan_config("wan-tiny-t2v", **kw),
                                   lambda **kw: cosmos_config("cosmos-tiny-t2i", **kw)])
def test_overrides_map_onto_megatron_fields(build):
    assert build(norm_eps=1e-3).layernorm_epsilon == 1e-3
    assert build().layernorm_epsilon == 1e-6
    with pytest.raises(ValueError, match="'norm_eps' or 'layernorm_epsilon', not both"):
        build(norm_eps=1e-3, layernorm_epsilon=1e-4)
    with pytest.raises(ValueError, match="'recompute_blocks' was removed; use recompute_granularity='full'"):
        build(recompute_blocks=True)
    with pytest.raises(NotImplementedError, match="recompute_granularity='selective'"):
        build(recompute_granularity="selective")
    cfg = build(**recompute_fields(True))
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)


def test_norms_and_recompute_read_megatron_fields(monkeypatch):
    from megatron_rcm.models.wan.layers import TPRMSNorm
    from megatron_rcm.models.wan.model import WanModel
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(tensor_parallel=1)
    model = WanModel(wan_config("wan-tiny-t2v", norm_eps=1e-3, **recompute_fields(True)))
    eps = {m.eps for m in model.modules() if isinstance(m, TPRMSNorm)}
    assert eps == {1e-3}
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 4, 1, 4, 4)
    model(x, torch.full((1,), 500.0), torch.randn(1, 3, 32))
    assert len(calls) == model.config.num_layers
