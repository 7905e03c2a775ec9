"""Samplers (rcm_math.md sec. 8): teacher RF Euler / UniPC on a Gaussian with an exact velocity
field, UniPC against diffusers, and the few-step student sampler against a reference loop."""

import math

import pytest
import torch

from megatron_rcm.rcm.samplers import (
    euler_sample,
    flow_shift_sigmas,
    student_sample,
    student_times,
    unipc_sample,
)
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser
from tests.test_rcm_reference import T_SCALE, bc, make_toy, ref_x0

pytestmark = pytest.mark.usefixtures("one_thread")


STEPS = [10, 20, 40, 80]


def _errors(sampler, toy, noise, **kw):
    """RMS error of the final sample vs the exact ODE solution from the same start (s_0 of the grid)."""
    teacher = TrigFlowDenoiser(toy.teacher, T_SCALE)
    out = []
    for n in STEPS:
        exact = toy.teacher.exact_x0(noise, flow_shift_sigmas(n)[0], toy.ctx)
        x = sampler(teacher, noise, Conditioning(toy.ctx), guidance=None, num_steps=n, **kw)
        out.append((x - exact).pow(2).mean().sqrt().item())
    return out


def test_euler_is_first_order_and_unipc_is_more_accurate():
    toy = make_toy(B=4, H=8, W=8)
    noise = torch.randn(toy.x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e_euler = _errors(euler_sample, toy, noise)
    e_unipc = _errors(unipc_sample, toy, noise)
    print("RMS error vs exact, steps", STEPS, "euler", e_euler, "unipc", e_unipc)
    for a, b in zip(e_euler[1:], e_euler[2:]):  # the first pair is still pre-asymptotic
        assert 1.6 < a / b < 2.5  # O(1/N): halving the step halves the error
    # UniPC (order 2 + corrector) is far more accurate at equal steps and converges faster: 10 -> 40
    # steps gains ~46x (Euler ~3.7x). Its error has a bump at 40-80 steps from the first, order-1
    # step near s = 1 (alpha = 1 - s ~ 1e-3), then it falls as ~1/N^2 again (0.00084 at 160 steps).
    assert all(u < 0.2 * e for u, e in zip(e_unipc[2:], e_euler[2:]))
    assert e_unipc[0] / e_unipc[2] > 20 > e_euler[0] / e_euler[2]
    # negative control: UniPC's predictor alone (no corrector) at 80 steps is measurably worse
    e_nocorr = _errors(unipc_sample, toy, noise, use_corrector=False)
    assert e_nocorr[-1] > 1.5 * e_unipc[-1]


def test_unipc_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    toy = make_toy(B=2)
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double().tolist()
    x = noise = torch.randn(toy.x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(sched.timesteps):
        v = toy.teacher(x, torch.full((toy.B,), sigmas[i] * T_SCALE, dtype=torch.float64), toy.ctx)
        x = sched.step(v, t, x).prev_sample
    teacher = TrigFlowDenoiser(toy.teacher, T_SCALE)
    ours = unipc_sample(teacher, noise, Conditioning(toy.ctx), guidance=None, sigmas=sigmas)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)  # diffusers keeps its sigmas in float32
    other = unipc_sample(
        teacher, noise, Conditioning(toy.ctx), guidance=None, sigmas=sigmas, use_corrector=False
    )
    assert (other - x).abs().max() > 1e-3


def test_flow_shift_sigmas_are_wans_grid():
    s = flow_shift_sigmas(4, shift=5.0)
    u = [0.999, 0.999 * 3 / 4, 0.999 / 2, 0.999 / 4]
    assert s == pytest.approx([5 * a / (1 + 4 * a) for a in u] + [0.0], rel=1e-12)


def test_guided_euler_matches_manual_loop():
    toy = make_toy(B=2)
    teacher = TrigFlowDenoiser(toy.teacher, T_SCALE)
    noise = torch.randn(toy.x0.shape, dtype=torch.float64)
    sig = flow_shift_sigmas(6, shift=3.0)
    x = noise
    for a, b in zip(sig[:-1], sig[1:]):
        ts = torch.full((toy.B,), a * T_SCALE, dtype=torch.float64)
        v_c, v_u = toy.teacher(x, ts, toy.ctx), toy.teacher(x, ts, toy.neg)
        x = x + (b - a) * (v_u + 4.0 * (v_c - v_u))
    ours = euler_sample(
        teacher, noise, Conditioning(toy.ctx, neg_context=toy.neg), guidance=4.0, num_steps=6, shift=3.0
    )
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_student_sampler_matches_reference_loop(n):
    toy = make_toy(B=2)
    noise = torch.randn(toy.x0.shape, dtype=torch.float64)
    times = [math.atan(80.0), 1.5, 1.4, 1.0][:n] + [0.0]
    assert student_times(n) == pytest.approx(times)
    gen = torch.Generator().manual_seed(3)
    x = noise
    for a, b in zip(times[:-1], times[1:]):
        x0 = ref_x0(toy.student, x, torch.full((toy.B,), a, dtype=torch.float64), toy.ctx)
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = x0 if b == 0.0 else math.cos(b) * x0 + math.sin(b) * eps
    student = TrigFlowDenoiser(toy.student, T_SCALE)
    ours = student_sample(
        student, noise, Conditioning(toy.ctx), n, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ours, x.detach(), rtol=1e-10, atol=1e-10)
    if n > 1:  # negative control: other mid times give other samples
        other = student_sample(student, noise, Conditioning(toy.ctx), n, mid_t=(1.3, 1.0, 0.6))
        assert not torch.allclose(other, ours, atol=1e-4)
    with pytest.raises(ValueError):
        student_times(5)
    assert bc(torch.ones(2), x).shape == (2, 1, 1, 1, 1)
