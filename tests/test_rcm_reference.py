"""Independent float64 reference of rcm_math.md, for the rcm tests.

Everything here is written from the formulas file directly and does not call megatron_rcm.rcm
helpers (only the toy networks, which play the role of the Wan DiT). The tests at the bottom check
the reference itself against closed forms.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rcm.rcm.toy import GaussianVelocity, ToyVelocityNet

pytestmark = pytest.mark.usefixtures("one_thread")


T_SCALE = 1000.0


def bc(c_B, x):
    """[B] -> [B, 1, 1, 1, 1]."""
    return c_B.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def ref_x0(net, x_t, t_B, ctx, T=T_SCALE, y=None):
    """Sec. 1: x0_hat = c_skip x_t + c_out v(c_in x_t, c_noise)."""
    cos_t, sin_t = torch.cos(t_B), torch.sin(t_B)
    c_in = 1 / (cos_t + sin_t)
    c_noise = sin_t / (cos_t + sin_t) * T
    x_in = bc(c_in, x_t) * x_t
    if y is not None:
        x_in = torch.cat([x_in, y], dim=1)
    v = net(x_in, c_noise, ctx).to(torch.float64)
    return bc(1 / (cos_t + sin_t), x_t) * x_t + bc(-sin_t / (cos_t + sin_t), x_t) * v


def ref_F(net, x_t, t_B, ctx, T=T_SCALE, y=None):
    """Sec. 1: F_hat = (cos t x_t - x0_hat) / sin t."""
    return (bc(torch.cos(t_B), x_t) * x_t - ref_x0(net, x_t, t_B, ctx, T, y)) / bc(torch.sin(t_B), x_t)


def ref_guided(fn, net, x_t, t_B, ctx, neg, w, T=T_SCALE):
    """Sec. 3 CFG: F_u + w (F_c - F_u) (same for x0_hat)."""
    c, u = fn(net, x_t, t_B, ctx, T), fn(net, x_t, t_B, neg, T)
    return u + w * (c - u)


def make_toy(B=3, C=2, D=8, L=5, frames=2, H=4, W=4, seed=0, dtype=torch.float64):
    """Float64 toy: random student/critic conv nets, an exact Gaussian teacher, data x0 and prompts."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = ToyVelocityNet(C, context_dim=D, hidden=16).to(dtype)
    critic = ToyVelocityNet(C, context_dim=D, hidden=16).to(dtype)
    teacher = GaussianVelocity(
        torch.tensor([0.8, -0.4][:C] + [0.0] * max(0, C - 2)),
        torch.tensor([0.6, 0.9][:C] + [1.0] * max(0, C - 2)),
        W_CD=0.5 * torch.randn(C, D, generator=gen),
    )
    ctx = torch.randn(B, L, D, generator=gen, dtype=dtype)
    neg = torch.randn(B, L, D, generator=gen, dtype=dtype)
    x0 = teacher.sample_x0((B, C, frames, H, W), ctx, gen).to(dtype)
    return SimpleNamespace(student=student, critic=critic, teacher=teacher, ctx=ctx, neg=neg, x0=x0, B=B, C=C)


def grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


# ---------------------------------------------------------------------------------------------------
# Checks of the reference itself
# ---------------------------------------------------------------------------------------------------


def test_reference_x0_of_exact_teacher_is_posterior_mean():
    """With the exact Gaussian velocity, ref_x0 must equal E[x0 | x_t] = mu + cos t sd^2 / var_t (x_t - cos t mu)."""
    toy = make_toy()
    t_B = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    x_t = torch.randn_like(toy.x0)
    mu, sd2 = toy.teacher.mu(toy.ctx), toy.teacher.std_C.view(1, -1, 1, 1, 1) ** 2
    cos_t, sin_t = bc(torch.cos(t_B), x_t), bc(torch.sin(t_B), x_t)
    post = mu + cos_t * sd2 / (cos_t**2 * sd2 + sin_t**2) * (x_t - cos_t * mu)
    torch.testing.assert_close(ref_x0(toy.teacher, x_t, t_B, toy.ctx), post, rtol=1e-10, atol=1e-10)
    # the F identity x0_hat = cos t x_t - sin t F_hat
    F = ref_F(toy.teacher, x_t, t_B, toy.ctx)
    torch.testing.assert_close(cos_t * x_t - sin_t * F, post, rtol=1e-10, atol=1e-10)
    # negative control: the RF time without the TrigFlow scaling c_in gives a different x0_hat
    wrong = bc(1 / (torch.cos(t_B) + torch.sin(t_B)), x_t) * x_t - bc(
        torch.sin(t_B) / (torch.cos(t_B) + torch.sin(t_B)), x_t
    ) * toy.teacher(x_t, torch.sin(t_B) / (torch.cos(t_B) + torch.sin(t_B)) * T_SCALE, toy.ctx)
    assert not torch.allclose(wrong, post, atol=1e-3)


def test_gaussian_exact_flow_solves_the_ode():
    """exact_x0 agrees with a fine RK4 integration of the exact velocity (checks the toy teacher)."""
    toy = make_toy()
    x = torch.randn_like(toy.x0)
    s0, N = 0.95, 400
    exact = toy.teacher.exact_x0(x, s0, toy.ctx)

    def v(x_, s):
        return toy.teacher(x_, torch.full((toy.B,), s * T_SCALE, dtype=torch.float64), toy.ctx)

    h = -s0 / N
    for i in range(N):
        s = s0 + i * h
        k1 = v(x, s)
        k2 = v(x + h / 2 * k1, s + h / 2)
        k3 = v(x + h / 2 * k2, s + h / 2)
        k4 = v(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-6)
    assert math.isfinite(float(x.abs().max()))
