"""Power EMA (rcm_math.md sec. 7) and the student/critic schedule (sec. 5)."""

import pytest
import torch

from megatron_rcm.rcm.ema import PowerEMA, power_ema_gamma
from megatron_rcm.rcm.schedule import StudentCriticSchedule


def cubic(g, s):
    return g**3 + 7 * g**2 + (16 - s**-2) * g + (12 - s**-2)


def bisect_largest_root(s):
    """Largest real root by bisection on [0, 100]: the cubic is increasing and negative at 0 there."""
    lo, hi = 0.0, 100.0
    assert cubic(lo, s) < 0 < cubic(hi, s)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cubic(mid, s) < 0 else (lo, mid)
    return lo


@pytest.mark.parametrize("s", [0.05, 0.1, 0.2])
def test_gamma_is_largest_real_root(s):
    gamma = power_ema_gamma(s)
    assert abs(gamma - bisect_largest_root(s)) < 1e-9
    assert abs(cubic(gamma, s)) < 1e-8
    if s == 0.1:
        assert round(gamma, 2) == 6.94


def _perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _ref_ema(history, gamma, exponent_offset=1.0):
    """float64: ema <- beta(n) ema + (1 - beta(n)) theta_n, beta(n) = (1 - 1/(n+1))^(gamma+1)."""
    ema = None
    for n, theta in enumerate(history):
        beta = (1 - 1 / (n + 1)) ** (gamma + exponent_offset)
        ema = theta.clone() if ema is None else beta * ema + (1 - beta) * theta
    return ema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_ema_matches_float64_reference(dtype):
    model = torch.nn.Linear(5, 4).to(dtype)
    ema = PowerEMA(model, std=0.1)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(7):
        _perturb(model, gen)
        history.append(model.weight.detach().double())
        ema.update(model)
    ref = _ref_ema(history, power_ema_gamma(0.1))
    assert ema.shadow["weight"].dtype == torch.float32 and ema.num_updates == 7
    torch.testing.assert_close(ema.shadow["weight"].double(), ref, rtol=1e-6, atol=1e-6)  # fp32 shadow
    # negative control: the exponent gamma instead of gamma + 1 gives a different average
    assert not torch.allclose(
        ema.shadow["weight"].double(), _ref_ema(history, power_ema_gamma(0.1), 0.0), atol=1e-3
    )


def test_power_ema_state_dict_resume_is_exact():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 3)
    b = torch.nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    ema_a, ema_b = PowerEMA(a), PowerEMA(b)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        _perturb(a, gen_a), ema_a.update(a)
        _perturb(b, gen_b), ema_b.update(b)
    state = ema_b.state_dict()
    ema_c = PowerEMA(torch.nn.Linear(3, 3))
    ema_c.load_state_dict(state)
    for _ in range(3):
        _perturb(a, gen_a), ema_a.update(a)
        _perturb(b, gen_b), ema_c.update(b)
    for k in ema_a.shadow:
        assert torch.equal(ema_a.shadow[k], ema_c.shadow[k])
    with pytest.raises(KeyError):
        PowerEMA(torch.nn.Linear(3, 3, bias=False)).load_state_dict(state)


def test_swapped_into_restores_weights():
    model = torch.nn.Linear(3, 2)
    ema = PowerEMA(model)
    ema.update(model)
    before = model.weight.detach().clone()
    _perturb(model, torch.Generator().manual_seed(0))
    after = model.weight.detach().clone()
    with ema.swapped_into(model):
        assert torch.equal(model.weight, before)
    assert torch.equal(model.weight, after)


@pytest.mark.parametrize("warmup,freq", [(0, 5), (7, 5), (3, 10), (4, 1)])
def test_schedule_matches_rule_and_counts(warmup, freq):
    sched = StudentCriticSchedule(has_critic=True, warmup=warmup, student_update_freq=freq)
    rule = [s < warmup or (s - warmup) % freq == 0 for s in range(60)]
    assert [sched.is_student_step(s) for s in range(60)] == rule
    for s in range(60):
        assert sched.num_student_steps(s) == sum(rule[:s])
        assert sched.num_critic_steps(s) == s - sum(rule[:s])
    no_critic = StudentCriticSchedule(has_critic=False, warmup=warmup, student_update_freq=freq)
    assert all(no_critic.is_student_step(s) for s in range(60)) and no_critic.num_student_steps(9) == 9
