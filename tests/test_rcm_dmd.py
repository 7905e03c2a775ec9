"""DMD loss with the stochastic rollout (rcm_math.md sec. 4) and the critic loss (sec. 5),
through the engine, against a float64 reference that replays the engine's documented draw order."""

import math

import pytest
import torch

from megatron_rcm.rcm.dmd import critic_loss, dmd_loss
from megatron_rcm.rcm.engine import DistillBatch, DistillConfig, RCMEngine
from megatron_rcm.rcm.trigflow import Conditioning
from tests.test_rcm_reference import bc, grads, make_toy, ref_guided, ref_x0, zero_grads
from tests.test_rcm_scm import draws as scm_draws
from tests.test_rcm_scm import ref_scm

pytestmark = pytest.mark.usefixtures("one_thread")


W = 5.0
SHIFT = 5.0


def draw_t_D(gen, B):
    """UniformShift(5) from its formula (sec. 2)."""
    u = torch.rand(B, generator=gen, dtype=torch.float64)
    s = SHIFT * u / (1 + (SHIFT - 1) * u)
    return torch.atan(s / (1 - s))


def ref_rollout_draws(gen, n, shape, fixed=None):
    """eps_0, then (t_i, eps_i) for i = 1..n-1 with t_i = min(draw, t_{i-1}) (sec. 4)."""
    B = shape[0]
    times = [torch.full((B,), math.pi / 2, dtype=torch.float64)]
    noises = [torch.randn(shape, generator=gen, dtype=torch.float64)]
    for i in range(1, n):
        t_new = draw_t_D(gen, B) if fixed is None else torch.full((B,), fixed[i - 1], dtype=torch.float64)
        times.append(torch.minimum(t_new, times[-1]))
        noises.append(torch.randn(shape, generator=gen, dtype=torch.float64))
    return times, noises


def ref_rollout(net, ctx, times, noises, grad_all=False):
    x = noises[0]
    for i in range(len(times) - 1):
        with torch.set_grad_enabled(grad_all):
            x0 = ref_x0(net, x, times[i], ctx)
        x = bc(torch.cos(times[i + 1]), x0) * x0 + bc(torch.sin(times[i + 1]), x0) * noises[i + 1]
    return ref_x0(net, x, times[-1], ctx)


def ref_dmd(toy, gen, n, scale=1.0, fixed=None, grad_all=False):
    times, noises = ref_rollout_draws(gen, n, toy.x0.shape, fixed)
    G = ref_rollout(toy.student, toy.ctx, times, noises, grad_all)
    t_D = draw_t_D(gen, toy.B)
    x_D = bc(torch.cos(t_D), G) * G.detach() + bc(torch.sin(t_D), G) * torch.randn(
        G.shape, generator=gen, dtype=torch.float64
    )
    with torch.no_grad():
        x_fake = ref_x0(toy.critic, x_D, t_D, toy.ctx)
        x_real = ref_guided(ref_x0, toy.teacher, x_D, t_D, toy.ctx, toy.neg, W)
        weight = (G - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-5)
        grad = (x_fake - x_real) / weight
    return scale * ((G - (G - grad).detach()) ** 2).sum() / toy.B


def run_engine(toy, cfg, step, seed):
    batch = DistillBatch(toy.x0, Conditioning(toy.ctx, neg_context=toy.neg))
    eng = RCMEngine(cfg)
    gen = torch.Generator().manual_seed(seed)
    if eng.is_student_step(step):
        return eng.student_loss(toy.student, toy.critic, toy.teacher, batch, step, gen)
    return eng.critic_loss(toy.student, toy.critic, batch, step, gen)


@pytest.mark.parametrize("fixed", [None, (1.5, 1.4, 1.0)])
def test_pure_dmd_matches_reference(fixed):
    toy = make_toy()
    cfg = DistillConfig(algorithm="dmd", guidance=W, student_update_freq=5, rollout_times=fixed)
    step = 10  # student steps 0, 5 before it: n = 2 mod 4 + 1 = 3
    loss, logs = run_engine(toy, cfg, step, seed=11)
    assert logs["dmd/rollout_steps"].item() == 3 and set(logs) >= {"loss/dmd", "dmd/weight", "dmd/nonfinite"}
    loss.backward()
    g_engine = grads(toy.student)
    assert toy.critic.conv_in.weight.grad is None  # the critic is not touched by a student step
    zero_grads(toy.student)
    ref = ref_dmd(toy, torch.Generator().manual_seed(11), 3, fixed=fixed)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    for a, b in zip(g_engine, grads(toy.student)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    # negative control: keeping the graph through every rollout step changes the gradient
    zero_grads(toy.student)
    ref_dmd(toy, torch.Generator().manual_seed(11), 3, fixed=fixed, grad_all=True).backward()
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(g_engine, grads(toy.student)))


def test_rcm_student_step_is_scm_plus_dmd():
    toy = make_toy()
    cfg = DistillConfig(algorithm="rcm", guidance=W, tangent_warmup=4, student_update_freq=5)
    step = 9  # (9 - 4) % 5 == 0: student; earlier student steps 0..3 and 4: n = 5 mod 4 + 1 = 2
    eng = RCMEngine(cfg)
    assert eng.is_student_step(step) and not eng.is_student_step(8) and eng.is_student_step(3)
    loss, logs = run_engine(toy, cfg, step, seed=2)
    assert logs["dmd/rollout_steps"].item() == 2
    loss.backward()
    g_engine = grads(toy.student)
    zero_grads(toy.student)

    gen = torch.Generator().manual_seed(2)
    t, eps = scm_draws(toy, None, gen=gen)
    l_scm, _ = ref_scm(toy, t, eps, r=1.0)
    l_dmd = ref_dmd(toy, gen, 2)
    (l_scm + l_dmd).backward()
    torch.testing.assert_close(logs["loss/scm"], l_scm.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(logs["loss/dmd"], l_dmd.detach(), rtol=1e-9, atol=0)
    for a, b in zip(g_engine, grads(toy.student)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_rcm_has_no_dmd_term_during_tangent_warmup():
    toy = make_toy()
    _, logs = run_engine(toy, DistillConfig(algorithm="rcm", tangent_warmup=4), 3, seed=0)
    assert "loss/dmd" not in logs and "loss/scm" in logs


def ref_critic(toy, gen, n, inv_sin2=True):
    times, noises = ref_rollout_draws(gen, n, toy.x0.shape)
    with torch.no_grad():
        G = ref_rollout(toy.student, toy.ctx, times, noises)
    t_D = draw_t_D(gen, toy.B)
    x_D = bc(torch.cos(t_D), G) * G + bc(torch.sin(t_D), G) * torch.randn(
        G.shape, generator=gen, dtype=torch.float64
    )
    sq = (G - ref_x0(toy.critic, x_D, t_D, toy.ctx)) ** 2
    if inv_sin2:
        sq = sq / bc(torch.sin(t_D) ** 2, sq)
    return sq.sum() / toy.B


def test_critic_loss_matches_reference():
    toy = make_toy()
    cfg = DistillConfig(algorithm="dmd", student_update_freq=5)
    step = 3  # critic steps 1, 2 before it: n = 2 mod 4 + 1 = 3
    loss, logs = run_engine(toy, cfg, step, seed=4)
    assert logs["critic/rollout_steps"].item() == 3
    loss.backward()
    g_engine = grads(toy.critic)
    assert all(p.grad is None for p in toy.student.parameters())  # the student is not touched
    zero_grads(toy.critic)
    ref = ref_critic(toy, torch.Generator().manual_seed(4), 3)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    for a, b in zip(g_engine, grads(toy.critic)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # negative control: without the 1 / sin^2 t_D weight the loss differs
    zero_grads(toy.critic)
    assert not torch.allclose(ref_critic(toy, torch.Generator().manual_seed(4), 3, inv_sin2=False), ref)


def test_dmd_and_critic_mask_nonfinite_samples():
    B = 3
    G = torch.randn(B, 2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    x_fake, x_real = torch.randn_like(G), torch.randn_like(G)
    x_real[1, 0, 0, 0, 0] = float("nan")
    out = dmd_loss(G, x_fake, x_real, loss_scale=1.0)
    out.loss.backward()
    assert out.num_nonfinite.item() == 1
    assert torch.isfinite(G.grad).all() and (G.grad[1] == 0).all()
    ok = torch.tensor([True, False, True])
    weight = (G[ok] - x_real[ok]).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(G.grad[ok], 2 * (x_fake[ok] - x_real[ok]) / weight / B)

    x_hat = torch.randn_like(G, requires_grad=True)
    t_D = torch.tensor([0.3, 1.0, 1.4], dtype=torch.float64)
    loss, nonfinite = critic_loss(torch.where(ok.view(-1, 1, 1, 1, 1), G.detach(), math.inf), x_hat, t_D)
    loss.backward()
    assert nonfinite.item() == 1 and torch.isfinite(x_hat.grad).all() and (x_hat.grad[1] == 0).all()
