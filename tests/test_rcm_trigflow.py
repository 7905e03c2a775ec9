"""TrigFlow wrapper (rcm_math.md sec. 1), CFG, dtypes and time distributions (sec. 2)."""

import math

import pytest
import torch

import megatron_rcm.rcm.trigflow as trigflow
from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.toy import ToyVelocityNet
from megatron_rcm.rcm.trigflow import (
    Conditioning,
    TrigFlowDenoiser,
    preconditioner_tangents,
    preconditioners,
    rf_to_trig,
    trig_to_rf,
)
from tests.test_rcm_reference import T_SCALE, bc, make_toy, ref_F, ref_guided, ref_x0

# float64 end to end: differences are round-off; 1e-10 leaves a wide margin
TOL = dict(rtol=1e-10, atol=1e-10)
T_B = torch.tensor([0.05, 0.8, 1.55], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_preconditioners_match_sec1():
    t = torch.linspace(0.01, math.pi / 2 - 0.01, 7, dtype=torch.float64)
    pc = preconditioners(t, T_SCALE)
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    x, v = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    x0 = x / (cos_t + sin_t) - sin_t / (cos_t + sin_t) * v
    torch.testing.assert_close(pc.c_skip * x + pc.c_out * v, x0, **TOL)
    torch.testing.assert_close(pc.c_skip_F * x + pc.c_out_F * v, (cos_t * x - x0) / sin_t, **TOL)
    torch.testing.assert_close(pc.c_noise, T_SCALE * sin_t / (cos_t + sin_t), **TOL)
    torch.testing.assert_close(pc.c_in, 1 / (cos_t + sin_t), **TOL)


def test_preconditioner_tangents_match_autodiff():
    t = torch.linspace(0.0, math.pi / 2, 9, dtype=torch.float64)
    exact = preconditioner_tangents(t, T_SCALE)
    for name in exact._fields:
        _, d = torch.func.jvp(
            lambda t_, name=name: getattr(preconditioners(t_, T_SCALE), name), (t,), (torch.ones_like(t),)
        )
        torch.testing.assert_close(getattr(exact, name), d, **TOL, msg=name)


def test_x0_and_F_match_reference_and_identity():
    toy = make_toy()
    den = TrigFlowDenoiser(toy.student, T_SCALE)
    x_t = torch.randn_like(toy.x0)
    out = den(x_t, T_B, Conditioning(toy.ctx))
    torch.testing.assert_close(out.x0, ref_x0(toy.student, x_t, T_B, toy.ctx), **TOL)
    torch.testing.assert_close(out.F, ref_F(toy.student, x_t, T_B, toy.ctx), **TOL)
    torch.testing.assert_close(out.x0, bc(torch.cos(T_B), x_t) * x_t - bc(torch.sin(T_B), x_t) * out.F, **TOL)
    # at t = 0 F_hat is finite (no 1/sin t in the wrapper) and x0_hat = x_t
    out0 = den(x_t, torch.zeros(toy.B, dtype=torch.float64), Conditioning(toy.ctx))
    torch.testing.assert_close(out0.x0, x_t, **TOL)
    assert torch.isfinite(out0.F).all()


def _dirs(toy):
    x_t = torch.randn_like(toy.x0)
    return x_t, torch.randn_like(x_t), torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)


def test_F_jvp_matches_torch_func_jvp():
    toy = make_toy()
    den, cond = TrigFlowDenoiser(toy.student, T_SCALE), Conditioning(toy.ctx)
    x_t, dx, dt = _dirs(toy)
    F, dF = den.F_jvp(x_t, T_B, dx, dt, cond)
    # (a) torch.func.jvp through the wrapper itself
    F_a, dF_a = torch.func.jvp(lambda x, t: den(x, t, cond).F, (x_t, T_B), (dx, dt))
    # (b) torch.func.jvp through the independent reference
    F_b, dF_b = torch.func.jvp(lambda x, t: ref_F(toy.student, x, t, toy.ctx), (x_t, T_B), (dx, dt))
    for Fr, dFr in ((F_a, dF_a), (F_b, dF_b)):
        torch.testing.assert_close(F, Fr, **TOL)
        torch.testing.assert_close(dF, dFr, **TOL)
    assert dF.grad_fn is None and F.grad_fn is not None


def test_F_jvp_comparison_catches_missing_chain_rule_term(monkeypatch):
    """Negative control: drop the c_noise' dt term of the chain rule; the comparison must fail."""
    toy = make_toy()
    den, cond = TrigFlowDenoiser(toy.student, T_SCALE), Conditioning(toy.ctx)
    x_t, dx, dt = _dirs(toy)
    _, dF_ref = torch.func.jvp(lambda x, t: ref_F(toy.student, x, t, toy.ctx), (x_t, T_B), (dx, dt))
    exact = trigflow.preconditioner_tangents
    monkeypatch.setattr(trigflow, "preconditioner_tangents", lambda t, s: exact(t, s)._replace(c_noise=0 * t))
    _, dF_bad = den.F_jvp(x_t, T_B, dx, dt, cond)
    assert not torch.allclose(dF_bad, dF_ref, rtol=1e-6, atol=1e-6)


def test_F_jvp_primal_carries_the_same_gradient_as_a_plain_forward():
    toy = make_toy()
    den, cond = TrigFlowDenoiser(toy.student, T_SCALE), Conditioning(toy.ctx)
    x_t, dx, dt = _dirs(toy)
    w = torch.randn_like(x_t)
    F, _ = den.F_jvp(x_t, T_B, dx, dt, cond)
    g_jvp = torch.autograd.grad((F * w).sum(), list(toy.student.parameters()))
    g_plain = torch.autograd.grad((den(x_t, T_B, cond).F * w).sum(), list(toy.student.parameters()))
    for a, b in zip(g_jvp, g_plain):
        torch.testing.assert_close(a, b, **TOL)


def test_i2v_condition_channels_are_concatenated_with_zero_tangent():
    toy = make_toy()
    Cy = 3
    net = ToyVelocityNet(toy.C + Cy, out_channels=toy.C, context_dim=8, hidden=16).double()
    y = torch.randn(toy.B, Cy, *toy.x0.shape[2:], dtype=torch.float64)
    den, cond = TrigFlowDenoiser(net, T_SCALE), Conditioning(toy.ctx, y=y)
    x_t, dx, dt = _dirs(toy)
    torch.testing.assert_close(den(x_t, T_B, cond).x0, ref_x0(net, x_t, T_B, toy.ctx, y=y), **TOL)
    F, dF = den.F_jvp(x_t, T_B, dx, dt, cond)
    F_r, dF_r = torch.func.jvp(lambda x, t: ref_F(net, x, t, toy.ctx, y=y), (x_t, T_B), (dx, dt))
    torch.testing.assert_close(F, F_r, **TOL)
    torch.testing.assert_close(dF, dF_r, **TOL)


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_cfg_matches_formula(batch_cfg):
    toy = make_toy()
    den = TrigFlowDenoiser(toy.student, T_SCALE, batch_cfg=batch_cfg)
    x_t = torch.randn_like(toy.x0)
    out = den(x_t, T_B, Conditioning(toy.ctx, neg_context=toy.neg), guidance=5.0)
    torch.testing.assert_close(out.F, ref_guided(ref_F, toy.student, x_t, T_B, toy.ctx, toy.neg, 5.0), **TOL)
    torch.testing.assert_close(
        out.x0, ref_guided(ref_x0, toy.student, x_t, T_B, toy.ctx, toy.neg, 5.0), **TOL
    )
    # negative control: the release's convention F_c + w (F_c - F_u) is a different guidance scale
    c, u = ref_F(toy.student, x_t, T_B, toy.ctx), ref_F(toy.student, x_t, T_B, toy.neg)
    assert not torch.allclose(out.F, c + 5.0 * (c - u), atol=1e-4)


def test_cfg_details():
    toy = make_toy()
    den, x_t = TrigFlowDenoiser(toy.student, T_SCALE), torch.randn_like(toy.x0)
    cond = Conditioning(toy.ctx, neg_context=toy.neg[:1])  # negative prompt of batch 1 is broadcast
    neg_b = toy.neg[:1].expand_as(toy.neg)
    torch.testing.assert_close(
        den(x_t, T_B, cond, 3.0).F, ref_guided(ref_F, toy.student, x_t, T_B, toy.ctx, neg_b, 3.0), **TOL
    )
    torch.testing.assert_close(den(x_t, T_B, cond, 1.0).F, den(x_t, T_B, cond).F, **TOL)
    torch.testing.assert_close(den(x_t, T_B, cond, 0.0).F, ref_F(toy.student, x_t, T_B, neg_b), **TOL)
    with pytest.raises(ValueError, match="neg_context"):
        den(x_t, T_B, Conditioning(toy.ctx), 5.0)


class _Recorder(torch.nn.Module):
    """Wraps a net and records the dtypes it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, timestep, context, clip_fea=None):
        self.seen.append((x.dtype, timestep.dtype, timestep.clone()))
        return self.net(x, timestep, context, clip_fea)


def test_bf16_network_gets_bf16_input_and_fp32_timestep():
    toy = make_toy()
    rec = _Recorder(ToyVelocityNet(toy.C, context_dim=8, hidden=16).to(torch.bfloat16))
    den = TrigFlowDenoiser(rec, T_SCALE)
    x_t = torch.randn(toy.x0.shape)
    t_B = torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64)
    out = den(x_t, t_B, Conditioning(toy.ctx.float()))
    x_dtype, ts_dtype, ts = rec.seen[0]
    assert (x_dtype, ts_dtype, out.x0.dtype, out.F.dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
        torch.float32,
    )
    # c_noise reaches the net at float32 precision, not bf16 (bf16 spacing near 1000 is 4)
    torch.testing.assert_close(ts.double(), T_SCALE * trig_to_rf(t_B), rtol=1e-6, atol=0)


def test_time_conversions():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    t = rf_to_trig(s)
    torch.testing.assert_close(trig_to_rf(t)[:-1], s[:-1], **TOL)
    assert math.isclose(float(t[-1]), math.atan((1 - 1e-6) / 1e-6), rel_tol=1e-12)  # clamp s <= 1 - 1e-6
    # the RF state is the TrigFlow state divided by cos t + sin t
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    t1 = torch.tensor(0.7, dtype=torch.float64)
    s1 = trig_to_rf(t1)
    x_trig = torch.cos(t1) * x0 + torch.sin(t1) * eps
    torch.testing.assert_close(x_trig / (torch.cos(t1) + torch.sin(t1)), (1 - s1) * x0 + s1 * eps, **TOL)


def test_lognormal_and_uniform_shift_distributions():
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    t = TimeDistribution.lognormal(0.7, 1.6).sample(n, generator=gen)
    log_sigma = torch.log(torch.tan(t))
    # standard errors: 1.6 / sqrt(n) = 0.0036 for the mean, ~0.0025 for the std
    assert abs(log_sigma.mean().item() - 0.7) < 0.02 and abs(log_sigma.std().item() - 1.6) < 0.02
    t = TimeDistribution.uniform_shift(5.0).sample(n, generator=gen)
    assert t.dtype == torch.float64 and (t > 0).all() and (t < math.pi / 2).all()
    s = torch.tan(t) / (1 + torch.tan(t))
    u = s / (5.0 - 4.0 * s)  # inverse of the shift
    for q in (0.1, 0.5, 0.9):  # uniform quantiles, standard error ~0.0007
        assert abs(torch.quantile(u[:50_000], q).item() - q) < 0.01
    assert abs(torch.quantile(s, 0.5).item() - 5 * 0.5 / (1 + 4 * 0.5)) < 0.01
    # negative control: without the shift the median of s would be 0.5, far from 0.833
    assert abs(torch.quantile(s, 0.5).item() - 0.5) > 0.2
    a = TimeDistribution.uniform_shift(5.0).sample(4, generator=torch.Generator().manual_seed(3))
    b = TimeDistribution.uniform_shift(5.0).sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        TimeDistribution(kind="uniform")
