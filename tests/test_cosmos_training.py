"""The trainer on a tiny Cosmos DiT (``model.preset: cosmos-*``): a short rCM run on a briefly pre-trained
teacher (T_scale = 1) brings the 1-step student closer to the teacher's ODE solution; the family switch,
the timestep-scale check, a short Video2World run with its clean conditioning frame and loading an original-layout teacher file."""

import pytest
import torch

from megatron_rcm.config import load_config
from megatron_rcm.config.schema import ConfigError
from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser, euler_sample
from megatron_rcm.training import Trainer
from megatron_rcm.training.models import (
    build_model,
    build_wan_config,
    check_condition_frames,
    check_timestep_scale,
    load_weights,
)
from megatron_rcm.training.teacher_pretrain import pretrain_teacher

TINY = [
    "model.preset=cosmos-tiny-t2i",
    "model.params_dtype=fp32",
    "model.overrides={in_channels: 1, out_channels: 1, text_dim: 16, num_layers: 1, hidden_size: 48,"
    " ffn_hidden_size: 96, num_attention_heads: 4, adaln_lora_dim: 8}",
    "data.source=digits",
    "data.micro_batch_size=16",
    "data.text_len=4",
    "data.text_dim=16",
    "data.latent_shape=[1,1,8,8]",
    "distill.algorithm=rcm",
    "distill.timestep_scale=1.0",
    "distill.guidance=2.0",
    "distill.tangent_warmup=10",
    "distill.student_update_freq=2",
    "optimizer.lr=3e-4",
    "optimizer.critic_lr=1e-3",
    "optimizer.warmup_steps=3",
    "logging.progress_bar=false",
    "logging.log_every=1000",
    "training.seed=3",
]


def _teacher(cfg):
    from megatron_rcm.data.digits import DigitsSource
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(1)
    model = build_model(build_wan_config(cfg.model, cfg.data, recompute=False), 0)
    losses = pretrain_teacher(
        model,
        DigitsSource(32, cfg.data.text_len, cfg.data.text_dim, seed=0),
        120,
        lr=3e-3,
        timestep_scale=1.0,
        warmup_steps=10,
    )
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20  # the teacher itself learned
    return model.requires_grad_(False)


@torch.no_grad()
def _distance_to_teacher_ode(trainer, batch):
    cond = Conditioning(batch.context_BLD, neg_context=batch.neg_context_BLD)
    noise = torch.randn(batch.latent_BCFHW.shape, generator=torch.Generator().manual_seed(7))
    ode = euler_sample(
        TrigFlowDenoiser(trainer.teacher, 1.0),
        noise,
        cond,
        guidance=trainer.cfg.distill.guidance,
        num_steps=20,
        shift=1.0,
    )
    return float((trainer.sample(1, batch, use_ema=False, noise=noise) - ode).square().mean())


def test_short_cosmos_rcm_run(tmp_path):
    cfg = load_config(None, [*TINY, "training.max_steps=40", f"training.output_dir={tmp_path}"])
    trainer = Trainer(cfg, teacher=_teacher(cfg))
    from megatron_rcm.models.cosmos import CosmosModel

    assert isinstance(trainer.student.module, CosmosModel)
    batch = trainer.data.next_batch()
    err0 = _distance_to_teacher_ode(trainer, batch)
    history = trainer.train()
    err1 = _distance_to_teacher_ode(trainer, batch)
    assert err1 < 0.8 * err0, (err0, err1)
    assert {m["is_student_step"] for m in history} == {0.0, 1.0}
    assert all(m["scm/nonfinite"] == 0 for m in history if "scm/nonfinite" in m)


V2W = [
    "model.preset=cosmos-tiny-v2w",
    "model.params_dtype=fp32",
    "model.overrides={in_channels: 3, out_channels: 2, text_dim: 16, num_layers: 1, hidden_size: 48,"
    " ffn_hidden_size: 96, num_attention_heads: 4, adaln_lora_dim: 8}",
    "data.source=mock",
    "data.micro_batch_size=2",
    "data.text_len=4",
    "data.text_dim=16",
    "data.latent_shape=[2,3,8,8]",
    "distill.algorithm=rcm",
    "distill.timestep_scale=1.0",
    "distill.guidance=null",
    "distill.tangent_warmup=2",
    "distill.student_update_freq=2",
    "distill.condition_frames=1",
    "distill.condition_mask_channel=true",
    "logging.progress_bar=false",
    "logging.log_every=1000",
    "training.seed=3",
]


def test_short_cosmos_video2world_rcm_run(tmp_path):
    """Video2World on CPU: sCM warm-up, student and critic steps with the first latent frame given; finite
    losses, and few-step samples whose conditioning frame is the given one bit for bit."""
    cfg = load_config(None, [*V2W, "training.max_steps=6", f"training.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    history = trainer.train()
    assert {m["is_student_step"] for m in history} == {0.0, 1.0}
    for m in history:
        for k, v in m.items():
            if k.startswith("loss/"):
                assert torch.isfinite(torch.tensor(v)), (k, v)
    assert any("loss/dmd" in m for m in history) and any("loss/critic" in m for m in history)
    batch = trainer.data.next_batch().to(trainer.device)
    for steps in (1, 2):
        out = trainer.sample(steps, batch, use_ema=False)
        assert torch.equal(out[:, :, :1], batch.latent_BCFHW[:, :, :1].to(out.dtype))
        assert not torch.equal(out[:, :, 1:], batch.latent_BCFHW[:, :, 1:].to(out.dtype))


def test_wrong_timestep_scale_and_video2world_settings_are_refused():
    cfg = load_config(None, [*TINY, "distill.timestep_scale=1000.0"])
    with pytest.raises(
        ConfigError, match=r"distill.timestep_scale=1000.0 .*cosmos-tiny-t2i.*timestep_scale=1"
    ):
        check_timestep_scale(cfg.model, cfg.distill)
    cfg = load_config(None, [*V2W, "distill.condition_frames=0", "distill.condition_mask_channel=false"])
    with pytest.raises(ConfigError, match="cosmos-tiny-v2w.*is Video2World: set distill.condition_frames"):
        check_condition_frames(cfg.model, cfg.distill, cfg.data)
    cfg = load_config(None, [*TINY, "distill.condition_frames=1", "distill.condition_mask_channel=true"])
    with pytest.raises(ConfigError, match="cosmos-tiny-t2i.*takes no condition-mask channel"):
        check_condition_frames(cfg.model, cfg.distill, cfg.data)
    cfg = load_config(None, [*V2W, "data.latent_shape=[2,1,8,8]"])
    with pytest.raises(ConfigError, match=r"condition_frames=1 leaves no frame to generate.*\[2, 1, 8, 8\]"):
        check_condition_frames(cfg.model, cfg.distill, cfg.data)
    cfg = load_config(None, [*V2W, "data.latent_shape=[3,3,8,8]"])
    with pytest.raises(ConfigError, match=r"3 channels .* in_channels=3 \(latents \+ the condition mask\)"):
        build_wan_config(cfg.model, cfg.data)


def test_teacher_from_an_original_layout_file(tmp_path):
    from megatron_rcm.convert.cosmos_keys import to_external
    from megatron_rcm.parallel.state import initialize_parallel

    initialize_parallel(1)
    cfg = load_config(None, TINY)
    src = build_model(build_wan_config(cfg.model, cfg.data), 11)
    sd = {k: v.detach() for k, v in src.named_parameters()}
    torch.save(to_external(sd, "original") | {"net.accum_iteration": torch.tensor(1)}, tmp_path / "model.pt")
    dst = build_model(build_wan_config(cfg.model, cfg.data), 12)
    load_weights(dst, tmp_path / "model.pt", cfg.model.preset)
    for k, v in dst.named_parameters():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("size,layers,hidden,lr", [("2b", 28, 2048, 2e-6), ("14b", 36, 5120, 1e-6)])
def test_example_configs_build(size, layers, hidden, lr):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"cosmos_predict2_{size}_t2i.yaml"
    cfg = load_config(path, ["data.source=mock"])
    wcfg = build_wan_config(cfg.model, cfg.data, recompute=False)
    check_timestep_scale(cfg.model, cfg.distill)
    assert (wcfg.num_layers, wcfg.hidden_size, wcfg.text_dim) == (layers, hidden, 1024)
    assert cfg.optimizer.lr == lr and cfg.distill.timestep_scale == 1.0


def test_video2world_example_config_builds():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cosmos_predict2_2b_v2w.yaml"
    cfg = load_config(path, ["data.source=mock"])
    wcfg = build_wan_config(cfg.model, cfg.data, recompute=False)
    check_timestep_scale(cfg.model, cfg.distill)
    check_condition_frames(cfg.model, cfg.distill, cfg.data)
    assert (wcfg.model_type, wcfg.in_channels, wcfg.num_layers) == ("v2w", 17, 28)
    assert cfg.distill.condition_frames == 1 and cfg.distill.condition_mask_channel
