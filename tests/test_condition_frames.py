"""Conditioning frames kept clean through the TrigFlow wrapper and the rCM engine (rcm/condition_frames.py),
on the tiny Cosmos Video2World DiT in float64 (and the Wan2.2 TI2V per-token time layout)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.rcm.batch import add_noise
from megatron_rcm.rcm.condition_frames import ConditionFrames, condition_mask_channel
from megatron_rcm.rcm.dmd import dmd_loss
from megatron_rcm.rcm.engine import DistillBatch, DistillConfig, RCMEngine
from megatron_rcm.rcm.scm import scm_loss, scm_tangents, scm_target
from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser, preconditioners
from tests.cosmos_helpers import make_ours, rel_err
from tests.test_wan_parity import plain_linears

K = 1  # conditioning frames
B, C, F_, S = 2, 4, 3, 8


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _setup(seed=0):
    net = make_ours("v2w", dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(B, C, F_, S, S, generator=gen, dtype=torch.float64)
    context = torch.randn(B, 7, 32, generator=gen, dtype=torch.float64)
    neg = torch.randn(1, 7, 32, generator=gen, dtype=torch.float64)
    cond = Conditioning(
        context=context,
        neg_context=neg,
        frames=ConditionFrames(x0[:, :, :K]),
        y=condition_mask_channel(x0.shape, K, torch.float64),
    )
    return net, x0, cond, gen


def test_denoiser_matches_the_video2world_pipeline_formula():
    """Independent reference, diffusers' Cosmos2VideoToWorldPipeline step written out: the network input is
    cond_indicator * x0_c + (1 - cond_indicator) * c_in x_t, the timestep [B, F] is 0 on conditioning frames,
    the condition mask is a channel, and x0_hat = cond_indicator * x0_c + (1 - cond_indicator)(c_skip x_t + c_out v)."""
    net, x0, cond, gen = _setup()
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)
    out = TrigFlowDenoiser(net, 1.0)(x_t, t, cond)

    pc = preconditioners(t, 1.0)
    ind = torch.zeros(1, 1, F_, 1, 1, dtype=torch.float64)
    ind[:, :, :K] = 1
    c = lambda v: v.view(-1, 1, 1, 1, 1)  # noqa: E731
    x_in = ind * x0 + (1 - ind) * c(pc.c_in) * x_t
    ts = (1 - ind[0, 0, :, 0, 0])[None] * pc.c_noise[:, None]
    with torch.no_grad():
        v = net(torch.cat([x_in, ind.expand(B, 1, F_, S, S)], dim=1), ts, cond.context)
    x0_ref = ind * x0 + (1 - ind) * (c(pc.c_skip) * x_t + c(pc.c_out) * v)
    assert torch.equal(out.x0[:, :, :K], x0[:, :, :K])  # bit for bit
    assert rel_err(out.x0, x0_ref) <= 1e-13
    assert torch.equal(out.F[:, :, :K], torch.zeros_like(out.F[:, :, :K]))
    # not vacuous: the clean time matters (the per-sample time everywhere moves the output)
    with torch.no_grad():
        v_bad = net(torch.cat([x_in, ind.expand(B, 1, F_, S, S)], dim=1), pc.c_noise, cond.context)
    assert rel_err((1 - ind) * v_bad, (1 - ind) * v) > 1e-3


def test_F_jvp_matches_torch_func_jvp_with_clean_frames():
    net, x0, cond, gen = _setup(seed=2)
    den = TrigFlowDenoiser(net, 1.0)
    t = torch.tensor([0.3, 1.0], dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)
    dx = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    dt = torch.tensor([0.7, -0.2], dtype=torch.float64)
    with torch.no_grad():
        F, dF = den.F_jvp(x_t, t, dx, dt, cond)
    with plain_linears():
        F_ref, dF_ref = torch.func.jvp(lambda x, tt: den(x, tt, cond).F, (x_t, t), (dx, dt))
    assert rel_err(F, F_ref) <= 1e-12
    assert dF_ref.abs().max() > 1e-3
    assert rel_err(dF, dF_ref) <= 1e-10  # float64 round-off
    assert torch.equal(dF[:, :, :K], torch.zeros_like(dF[:, :, :K]))


def test_scm_loss_mask_equals_the_loss_on_the_generated_frames():
    gen = torch.Generator().manual_seed(3)
    F_theta = torch.randn(B, C, F_, S, S, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, C, F_, S, S, generator=gen, dtype=torch.float64)
    mask = (torch.arange(F_) >= K).to(torch.float64).view(1, 1, F_, 1, 1)
    out = scm_loss(F_theta, g, 100.0, 0.1, mask)
    ref = scm_loss(F_theta[:, :, K:], g[:, :, K:], 100.0, 0.1)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.g_norm, ref.g_norm, rtol=1e-14, atol=0)
    assert rel_err(scm_loss(F_theta, g, 100.0).g_norm, ref.g_norm) > 1e-2  # over all frames differs


def test_dmd_loss_mask_equals_the_loss_on_the_generated_frames():
    gen = torch.Generator().manual_seed(4)
    G, x_fake, x_real = (torch.randn(B, C, F_, S, S, generator=gen, dtype=torch.float64) for _ in range(3))
    x_fake[:, :, :K] = x_real[:, :, :K] = G[:, :, :K]  # clean frames: all three equal the data there
    mask = (torch.arange(F_) >= K).to(torch.float64).view(1, 1, F_, 1, 1)
    G = G.requires_grad_()
    out = dmd_loss(G, x_fake, x_real, 1.0, 1e-5, mask)
    ref = dmd_loss(G[:, :, K:], x_fake[:, :, K:], x_real[:, :, K:], 1.0, 1e-5)
    torch.testing.assert_close(out.weight, ref.weight, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-14, atol=0)
    assert rel_err(dmd_loss(G, x_fake, x_real, 1.0).loss, ref.loss) > 1e-2  # weight over all frames differs


def _engine(**kw):
    cfg = DistillConfig(
        timestep_scale=1.0,
        tangent_warmup=0,
        condition_frames=K,
        condition_mask_channel=True,
        student_time=TimeDistribution.lognormal(0.7, 1.6),
        **kw,
    )
    return RCMEngine(cfg)


def test_engine_scm_term_is_normalized_over_the_generated_frames():
    """The engine's sCM term against the sCM pieces with g taken on the generated frames only."""
    net, x0, cond, _ = _setup(seed=5)
    teacher = make_ours("v2w", dtype=torch.float64, seed=6)
    engine = _engine(algorithm="scm")
    batch = DistillBatch(x0=x0, cond=Conditioning(context=cond.context, neg_context=cond.neg_context))
    terms, logs = engine.student_loss_terms(net, None, teacher, batch, 5, torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)  # the engine's draws, in its order: t, then eps
    t = engine.config.student_time.sample(B, generator=gen)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)
    with torch.no_grad():
        F_T = TrigFlowDenoiser(teacher, 1.0)(x_t, t, cond, 5.0).F
        dx, dt = scm_tangents(t, F_T)
        F_s, dF = TrigFlowDenoiser(net, 1.0).F_jvp(x_t, t, dx, dt, cond)
    g = scm_target(x_t, t, F_s, F_T, dF, 1.0)
    ref = scm_loss(F_s[:, :, K:], g[:, :, K:], 100.0, 0.1)
    torch.testing.assert_close(logs["scm/g_norm"], ref.g_norm, rtol=1e-10, atol=0)
    assert math.isfinite(terms["scm"].item())


def test_rcm_steps_and_samples_keep_the_given_frames():
    net, x0, cond, _ = _setup(seed=8)
    teacher = make_ours("v2w", dtype=torch.float64, seed=9)
    critic = make_ours("v2w", dtype=torch.float64, seed=9)
    engine = _engine(algorithm="rcm")
    batch = DistillBatch(x0=x0, cond=Conditioning(context=cond.context, neg_context=cond.neg_context))
    loss, logs = engine.student_loss(net, critic, teacher, batch, 0, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and "loss/dmd" in logs
    closs, _ = engine.critic_loss(net, critic, batch, 1, torch.Generator().manual_seed(2))
    assert torch.isfinite(closs)
    sample_cond = engine.with_condition_frames(batch.cond, x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out = engine.sample(net, noise, sample_cond, 2, torch.Generator().manual_seed(4))
    assert torch.equal(out[:, :, :K], x0[:, :, :K])
    assert not torch.equal(out[:, :, K:], x0[:, :, K:])
    with pytest.raises(ValueError, match="sampling needs the given frames"):
        engine.sample(net, noise, batch.cond, 2)


def test_k0_is_the_unconditioned_engine():
    with pytest.raises(
        ValueError, match="condition_frames=0 must be >= 0, and > 0 with condition_mask_channel"
    ):
        DistillConfig(condition_mask_channel=True)
    _, x0, cond, _ = _setup()
    plain = Conditioning(context=cond.context)
    assert RCMEngine(DistillConfig()).with_condition_frames(plain, x0) is plain


def test_wan_frame_timestep_is_ti2v_expand_timesteps():
    """Wan2.2 TI2V: diffusers builds the per-token time as (mask[:, ::2, ::2] * t).flatten() with mask 0 on
    the first latent frame; our layout hook gives the same from the per-frame time."""
    from megatron_rcm.models.wan import WanModel, wan_config

    net = WanModel(wan_config("wan-tiny-t2v"))
    t = torch.tensor([500.0, 250.0])
    fr = ConditionFrames(torch.zeros(2, 4, 1, 8, 8))
    ts = net.frame_timestep(fr.c_noise(t, 3), (2, 4, 3, 8, 8))
    mask = torch.ones(3, 8, 8)
    mask[0] = 0
    ref = torch.stack([(mask[:, ::2, ::2] * ti).flatten() for ti in t])
    assert torch.equal(ts, ref)


def test_wan_ti2v_first_frame_clean_and_jvp():
    """Wan (TI2V's mechanism): the denoiser keeps the first frame and its F_jvp matches torch.func.jvp."""
    from megatron_rcm.models.wan import WanModel, wan_config

    torch.manual_seed(0)
    net = WanModel(wan_config("wan-tiny-t2v", params_dtype=torch.float64)).double()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, C, F_, S, S, generator=gen, dtype=torch.float64)
    cond = Conditioning(
        context=torch.randn(B, 5, 32, generator=gen, dtype=torch.float64),
        frames=ConditionFrames(x0[:, :, :1]),
    )
    den = TrigFlowDenoiser(net, 1000.0)
    t = torch.tensor([0.5, 1.1], dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)
    dx = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    dt = torch.tensor([0.3, 0.9], dtype=torch.float64)
    with torch.no_grad():
        out = den(x_t, t, cond)
        F, dF = den.F_jvp(x_t, t, dx, dt, cond)
    assert torch.equal(out.x0[:, :, :1], x0[:, :, :1])
    with plain_linears():
        F_ref, dF_ref = torch.func.jvp(lambda x, tt: den(x, tt, cond).F, (x_t, t), (dx, dt))
    assert rel_err(F, F_ref) <= 1e-12
    assert rel_err(dF, dF_ref) <= 1e-10  # float64 round-off
