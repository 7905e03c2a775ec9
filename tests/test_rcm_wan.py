"""The rCM engine on the real (tiny) Wan DiT: the TrigFlow JVP through ``WanModel.forward_jvp`` against a
central finite difference, I2V condition channels, batched CFG, and one student + critic step."""

import pytest
import torch

from megatron_rcm.parallel.state import initialize_parallel
from megatron_rcm.rcm.engine import DistillBatch, DistillConfig, RCMEngine
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser
from tests.wan_helpers import make_ours

T_SCALE = 1000.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def _inputs(kind, B=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 2, 4, 4, generator=gen, dtype=dtype)
    cond = Conditioning(
        context=torch.randn(B, 12, 32, generator=gen, dtype=dtype),
        neg_context=torch.randn(B, 12, 32, generator=gen, dtype=dtype),
        clip_fea=torch.randn(B, 5, 24, generator=gen, dtype=dtype) if kind == "i2v" else None,
        y=torch.randn(B, 4, 2, 4, 4, generator=gen, dtype=dtype) if kind == "i2v" else None,
    )
    return x, cond


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_F_jvp_through_wan_matches_finite_difference(kind):
    den = TrigFlowDenoiser(make_ours(kind, dtype=torch.float64, seed=3), T_SCALE)
    x_t, cond = _inputs(kind)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x_t), torch.tensor([0.8, -0.5], dtype=torch.float64)
    with torch.no_grad():
        F, dF = den.F_jvp(x_t, t, dx, dt, cond)
        h = 1e-6  # central difference in float64: truncation ~h^2, round-off ~1e-16 / h
        Fp = den(x_t + h * dx, t + h * dt, cond).F
        Fm = den(x_t - h * dx, t - h * dt, cond).F
        torch.testing.assert_close(F, den(x_t, t, cond).F, rtol=1e-12, atol=1e-12)
    fd = (Fp - Fm) / (2 * h)
    rel = ((dF - fd).norm() / fd.norm()).item()
    print(f"{kind}: |dF_jvp - dF_fd| / |dF_fd| = {rel:.1e}")
    assert rel < 1e-6, rel
    # negative control: ignoring the time tangent (dt = 0) is far off
    with torch.no_grad():
        _, dF_no_t = den.F_jvp(x_t, t, dx, torch.zeros_like(dt), cond)
    assert ((dF_no_t - fd).norm() / fd.norm()).item() > 1e-2


def test_batched_cfg_equals_separate_calls_on_wan():
    net = make_ours("t2v", dtype=torch.float64, seed=1)
    x_t, cond = _inputs("t2v")
    t = torch.tensor([0.3, 1.4], dtype=torch.float64)
    with torch.no_grad():
        a = TrigFlowDenoiser(net, T_SCALE, batch_cfg=True)(x_t, t, cond, 5.0).x0
        b = TrigFlowDenoiser(net, T_SCALE, batch_cfg=False)(x_t, t, cond, 5.0).x0
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_rcm_student_and_critic_steps_on_wan():
    student, critic, teacher = (make_ours("t2v", seed=s) for s in (0, 0, 7))
    x0, cond = _inputs("t2v", dtype=torch.float32)
    cfg = DistillConfig(algorithm="rcm", tangent_warmup=0, student_update_freq=2)
    engine = RCMEngine(cfg)
    batch = DistillBatch(x0, cond)
    gen = torch.Generator().manual_seed(0)
    loss, logs = engine.student_loss(student, critic, teacher, batch, 0, gen)
    loss.backward()
    assert torch.isfinite(loss) and {"loss/scm", "loss/dmd"} <= set(logs)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert sum(p.grad.abs().sum().item() for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in critic.parameters()) and all(
        p.grad is None for p in teacher.parameters()
    )
    assert not engine.is_student_step(1)
    loss, logs = engine.critic_loss(student, critic, batch, 1, gen)
    loss.backward()
    assert torch.isfinite(loss) and logs["critic/nonfinite"].item() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
