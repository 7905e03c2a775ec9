"""Every example config under examples/configs builds: it loads, its model config (Wan or Cosmos, full size)
is built from it with the data shapes checked against the model, the timestep scale and conditioning-frame
settings pass the trainer's checks, and its parallel section is a valid layout at DP = 1 (world = TP x CP x PP).
The networks are not built (14B on CPU); the per-family tests build the tiny presets.

Also: the four Cosmos-Predict2 models (2B / 14B x Text2Image / Video2World) each have an example config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rcm.config import load_config
from megatron_rcm.training.models import build_wan_config, check_condition_frames, check_timestep_scale

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_builds(path):
    from megatron_rcm.training import Trainer

    cfg = load_config(path, ["data.path=/shards"])
    model_cfg = build_wan_config(cfg.model, cfg.data, recompute=False)
    check_timestep_scale(cfg.model, cfg.distill)
    check_condition_frames(cfg.model, cfg.distill, cfg.data)
    p = cfg.parallel
    Trainer._check_layout(cfg, world=p.tensor_parallel * p.context_parallel * p.pipeline_parallel)
    assert model_cfg.num_attention_heads % p.tensor_parallel == 0


@pytest.mark.parametrize("size,layers,heads", [("2b", 28, 16), ("14b", 36, 40)])
@pytest.mark.parametrize("kind", ["t2i", "v2w"])
def test_each_cosmos_model_has_an_example_config(size, layers, heads, kind):
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"cosmos_predict2_{size}_{kind}.yaml"
    assert path in CONFIGS
    cfg = load_config(path, ["data.path=/shards"])
    assert cfg.model.preset == f"cosmos-predict2-{size}-{kind}"
    model_cfg = build_wan_config(cfg.model, cfg.data, recompute=False)
    assert (model_cfg.num_layers, model_cfg.num_attention_heads, model_cfg.model_type) == (layers, heads, kind)
    assert cfg.distill.timestep_scale == 1.0
    assert (cfg.distill.condition_frames > 0) == (kind == "v2w") == cfg.distill.condition_mask_channel


def test_cosmos_14b_v2w_layout():
    """The 14B Video2World config's CP layout: 84,480 tokens split over CP x TP = 16 ranks without padding,
    the ring (Ulysses would need CP to divide the 5 heads per TP rank)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cosmos_predict2_14b_v2w.yaml"
    cfg = load_config(path, ["data.path=/shards"])
    C, F, H, W = cfg.data.latent_shape
    tokens = F * (H // 2) * (W // 2)
    p = cfg.parallel
    assert tokens == 84_480 and tokens % (p.context_parallel * p.tensor_parallel) == 0
    assert (p.tensor_parallel, p.context_parallel, p.cp_comm_type) == (8, 2, "p2p")
