"""sCM loss (rcm_math.md sec. 3) and finite-difference sCM (sec. 6) against a float64 reference."""

import math

import pytest
import torch

from megatron_rcm.rcm.engine import DistillBatch, DistillConfig, RCMEngine
from megatron_rcm.rcm.scm import (
    finite_difference_dF,
    scm_loss,
    scm_tangents,
    scm_target,
    tangent_warmup_ratio,
)
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser
from tests.test_rcm_reference import T_SCALE, bc, grads, make_toy, ref_F, ref_guided, zero_grads

pytestmark = pytest.mark.usefixtures("one_thread")


W = 5.0
P_MEAN, P_STD = 0.7, 1.6


def draws(toy, seed, gen=None):
    """The engine's draws for the sCM term, in its documented order: t ~ LogNormal, then eps."""
    gen = torch.Generator().manual_seed(seed) if gen is None else gen
    t = torch.atan(torch.exp(P_MEAN + P_STD * torch.randn(toy.B, generator=gen, dtype=torch.float64)))
    eps = torch.randn(toy.x0.shape, generator=gen, dtype=torch.float64)
    return t, eps


def ref_scm(toy, t, eps, r, scale=100.0, variant=None, form="release"):
    """Sec. 3 from the formulas: F_theta from a separate plain forward, (F_sg, dF) from torch.func.jvp.

    ``form``: "release" puts r on the x_t term only (rcm_math.md sec. 3), "paper" on the whole second
    term (sCM Sec. 4.2). ``variant`` injects a deliberate error for the negative controls.
    """
    x_t = bc(torch.cos(t), toy.x0) * toy.x0 + bc(torch.sin(t), toy.x0) * eps
    cos_t, sin_t = bc(torch.cos(t), x_t), bc(torch.sin(t), x_t)
    with torch.no_grad():
        F_T = ref_guided(ref_F, toy.teacher, x_t, t, toy.ctx, toy.neg, W)
        cs = torch.cos(t) * torch.sin(t)
        F_sg, dF = torch.func.jvp(
            lambda x, tt: ref_F(toy.student, x, tt, toy.ctx), (x_t, t), (bc(cs, x_t) * F_T, cs)
        )
    F_theta = ref_F(toy.student, x_t, t, toy.ctx)
    if variant == "flip_dF":
        dF = -dF
    if variant == "paper_warmup":  # the default engine must not match the sCM paper's form
        form = "paper"
    if form == "release":  # rcm_math.md sec. 3: - (r cos t sin t x_t + dF)
        g = -cos_t * torch.sqrt(1 - r**2 * sin_t**2) * (F_sg - F_T) - (r * cos_t * sin_t * x_t + dF)
    else:  # sCM Sec. 4.2: - r (cos t sin t x_t + dF)
        g = -cos_t * torch.sqrt(1 - r**2 * sin_t**2) * (F_sg - F_T) - r * (cos_t * sin_t * x_t + dF)
    norm = torch.sqrt((g**2).sum(dim=(1, 2, 3, 4), keepdim=True))
    if variant != "no_norm":
        g = g / (norm + 0.1)
    loss = scale * ((F_theta - F_sg - g) ** 2).sum() / toy.B
    return loss, norm.flatten()


def engine_scm(toy, step, warmup, seed, algorithm="scm", form=None):
    """The engine's loss; ``form=None`` leaves ``tangent_warmup_form`` at its default."""
    kw = {} if form is None else {"tangent_warmup_form": form}
    cfg = DistillConfig(algorithm=algorithm, guidance=W, tangent_warmup=warmup, **kw)
    batch = DistillBatch(toy.x0, Conditioning(toy.ctx, neg_context=toy.neg))
    gen = torch.Generator().manual_seed(seed)
    loss, logs = RCMEngine(cfg).student_loss(toy.student, None, toy.teacher, batch, step, gen)
    return loss, logs


@pytest.mark.parametrize("form", [None, "paper"])
@pytest.mark.parametrize("step,warmup", [(50, 100), (0, 100), (200, 100), (0, 0)])
def test_scm_loss_and_gradient_match_reference(step, warmup, form):
    """One JVP pass (primal with graph) gives the loss and gradient of a separate plain forward; the
    default warm-up form is the release's (r on x_t only), the "paper" option the sCM paper's."""
    toy = make_toy()
    loss, logs = engine_scm(toy, step, warmup, seed=7, form=form)
    loss.backward()
    g_engine = grads(toy.student)
    zero_grads(toy.student)

    r = tangent_warmup_ratio(step, warmup)
    t, eps = draws(toy, 7)
    ref, norm = ref_scm(toy, t, eps, r, form=form or "release")
    ref.backward()
    # the engine returns a float32 loss (its float64 value rounded); gradients are float64 throughout
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    for a, b in zip(g_engine, grads(toy.student)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logs["scm/g_norm"], norm.mean(), rtol=1e-9, atol=0)
    assert logs["scm/nonfinite"].item() == 0 and logs["scm/warmup_ratio"].item() == r


@pytest.mark.parametrize("variant", ["flip_dF", "no_norm", "paper_warmup"])
def test_scm_comparison_catches_wrong_target(variant):
    """Negative controls: a flipped dF sign, a missing normalization, or r multiplying dF as well
    (the sCM paper's form; r = 0.5 here) changes the gradient beyond tolerance."""
    toy = make_toy()
    loss, _ = engine_scm(toy, 50, 100, seed=7)
    loss.backward()
    g_engine = grads(toy.student)
    zero_grads(toy.student)
    t, eps = draws(toy, 7)
    ref_scm(toy, t, eps, 0.5, variant=variant)[0].backward()
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(g_engine, grads(toy.student)))


def test_jvp_target_matches_finite_difference_as_h_goes_to_zero():
    """g from the JVP vs g with dF by finite difference: first-order convergence in h."""
    toy = make_toy()
    student, teacher = TrigFlowDenoiser(toy.student, T_SCALE), TrigFlowDenoiser(toy.teacher, T_SCALE)
    cond = Conditioning(toy.ctx, neg_context=toy.neg)
    t, eps = draws(toy, 3)
    t = t.clamp(0.05, 1.5)  # keep t - h > 0 for every h below
    x_t = bc(torch.cos(t), toy.x0) * toy.x0 + bc(torch.sin(t), toy.x0) * eps
    with torch.no_grad():
        F_T = teacher(x_t, t, cond, W).F
        dx, dt = scm_tangents(t, F_T)
        F, dF = student.F_jvp(x_t, t, dx, dt, cond)
        g_jvp = scm_target(x_t, t, F, F_T, dF, 1.0)
        errs = []
        hs = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
        for h in hs:
            dF_fd = finite_difference_dF(lambda x, tt: student(x, tt, cond).F, x_t, t, F, F_T, h)
            g_fd = scm_target(x_t, t, F, F_T, dF_fd, 1.0)
            errs.append(((g_fd - g_jvp).norm() / g_jvp.norm()).item())
    print("relative |g_fd - g_jvp| / |g_jvp| for h =", dict(zip(hs, [f"{e:.2e}" for e in errs])))
    for e_big, e_small in zip(errs[:-1], errs[1:]):
        assert 5 < e_big / e_small < 20, errs  # O(h): a factor ~10 per decade
    assert errs[-1] < 1e-4
    # negative control: dropping the cos t sin t scaling of the finite difference does not converge
    dF_bad = dF_fd / bc(torch.cos(t) * torch.sin(t), dF_fd)
    assert ((scm_target(x_t, t, F, F_T, dF_bad, 1.0) - g_jvp).norm() / g_jvp.norm()) > 0.1


@pytest.mark.parametrize("form", [None, "paper"])
@pytest.mark.parametrize("step", [50, 200])
def test_scm_fd_algorithm_agrees_with_jvp_algorithm(step, form):
    """scm_fd uses the same warm-up form as scm: during the warm-up (step 50 of 100) and after it."""
    toy = make_toy()
    loss_jvp, _ = engine_scm(toy, step, 100, seed=5, algorithm="scm", form=form)
    loss_jvp.backward()
    g_jvp = grads(toy.student)
    zero_grads(toy.student)
    loss_fd, _ = engine_scm(toy, step, 100, seed=5, algorithm="scm_fd", form=form)
    loss_fd.backward()
    torch.testing.assert_close(loss_fd, loss_jvp, rtol=1e-3, atol=0)  # h = 1e-4: O(h) error
    for a, b in zip(grads(toy.student), g_jvp):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3 * b.abs().max().item())


def test_nonfinite_samples_are_masked_and_counted():
    B = 4
    F_theta = torch.randn(B, 2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, 2, 1, 3, 3, dtype=torch.float64)
    g[0, 1, 0, 0, 0] = float("nan")
    F_in = F_theta * 1.0
    F_in = torch.where(torch.arange(B).view(-1, 1, 1, 1, 1) == 1, torch.full_like(F_in, math.inf), F_in)
    out = scm_loss(F_in, g, loss_scale=100.0)
    out.loss.backward()
    assert out.num_nonfinite.item() == 2
    ok = torch.tensor([False, False, True, True])
    g_ok = g[ok] / (g[ok].flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) + 0.1)
    torch.testing.assert_close(out.loss, 100.0 * (g_ok**2).sum() / B)
    assert torch.isfinite(F_theta.grad).all() and (F_theta.grad[~ok] == 0).all()
    torch.testing.assert_close(F_theta.grad[ok], -2 * 100.0 * g_ok / B)
    torch.testing.assert_close(out.g_norm, g[ok].flatten(1).norm(dim=1).mean())


def test_tangent_warmup_ratio():
    assert tangent_warmup_ratio(0, 0) == 1.0 and tangent_warmup_ratio(5, 0) == 1.0
    assert tangent_warmup_ratio(0, 10) == 0.0 and tangent_warmup_ratio(5, 10) == 0.5
    assert tangent_warmup_ratio(20, 10) == 1.0


@pytest.mark.parametrize("form", ["release", "paper"])
@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_scm_target_forms_match_written_out_formulas(form, r):
    """scm_target against sec. 3 written out in float64 numpy-style arithmetic on random inputs."""
    g = torch.Generator().manual_seed(11)
    shape = (3, 2, 1, 4, 4)
    x_t, F_sg, F_T, dF = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.1, 0.8, 1.5], dtype=torch.float64)
    out = scm_target(x_t, t, F_sg, F_T, dF, r, form)
    for i in range(3):
        c, s = math.cos(t[i].item()), math.sin(t[i].item())
        first = -c * math.sqrt(1 - r * r * s * s) * (F_sg[i] - F_T[i])
        if form == "release":
            want = first - r * c * s * x_t[i] - dF[i]
        else:
            want = first - r * c * s * x_t[i] - r * dF[i]
        torch.testing.assert_close(out[i], want, rtol=1e-13, atol=1e-13)
    other = scm_target(x_t, t, F_sg, F_T, dF, r, "paper" if form == "release" else "release")
    assert torch.equal(out, other) == (r == 1.0)  # the forms agree exactly after the warm-up only


def test_default_warmup_form_is_the_release_and_bad_forms_are_refused():
    assert DistillConfig().tangent_warmup_form == "release"
    with pytest.raises(ValueError, match="tangent_warmup_form must be one of .*'sCM'"):
        DistillConfig(tangent_warmup_form="sCM")
    with pytest.raises(ValueError, match="form must be one of"):
        scm_target(*(torch.zeros(1, 1) for _ in range(5)), 0.5, form="sCM")
    from megatron_rcm.config import load_config
    from megatron_rcm.config.schema import ConfigError

    with pytest.raises(ConfigError, match="tangent_warmup_form"):
        load_config(None, ["data.source=mock", "distill.tangent_warmup_form=sCM"])
    cfg = load_config(None, ["data.source=mock", "distill.tangent_warmup_form=paper"])
    assert cfg.distill.tangent_warmup_form == "paper"
