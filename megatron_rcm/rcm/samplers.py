"""Samplers: the few-step student (rcm_math.md section 8) and the teacher's RF Euler and UniPC.

Shape legend: B batch, C/F/H/W latent channels/frames/height/width. ``noise`` is [B, C, F, H, W];
the state is kept in float32 (float64 when the noise is float64).

Student (sec. 8):  t = [atan(sigma_max), mid_t[:n-1]..., 0]
    x = eps;  x0 = x0_hat(x, t_i);  x = cos t_{i+1} x0 + sin t_{i+1} eps_i'   (the last step returns x0)
Teacher (RF time s, x_s = (1 - s) x0 + s eps, v = eps - x0), Wan's shifted grid:
    s_i = shift(u_i, k), u = linspace(0.999, 0, N + 1)[:-1], then s_N = 0; x starts at the noise.
    Euler:  x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i)
    UniPC (Zhao et al. 2023, data prediction, B(h) = e^h - 1 "bh2", multistep predictor UniP-p and
    corrector UniC-p, lower order at the first and last steps), with alpha = 1 - s, sigma = s,
    lambda = log(alpha / sigma) and m_i = x0_hat_i = x_i - s_i v_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import add_noise
from megatron_rcm.rcm.time_sampling import shift_rf
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser

__all__ = ["euler_sample", "flow_shift_sigmas", "student_sample", "student_times", "unipc_sample"]


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------------------
# Few-step student (sec. 8)
# ---------------------------------------------------------------------------------------------------


def student_times(
    num_steps: int, sigma_max: float = 80.0, mid_t: Sequence[float] = (1.5, 1.4, 1.0)
) -> list[float]:
    """[atan(sigma_max), mid_t[:n-1]..., 0] (sec. 8)."""
    if not 1 <= num_steps <= len(mid_t) + 1:
        raise ValueError(f"num_steps must be in 1..{len(mid_t) + 1} for {len(mid_t)} mid times")
    return [math.atan(sigma_max), *[float(t) for t in mid_t[: num_steps - 1]], 0.0]


@torch.no_grad()
def student_sample(
    student: TrigFlowDenoiser,
    noise: Tensor,
    cond: Conditioning,
    num_steps: int,
    sigma_max: float = 80.0,
    mid_t: Sequence[float] = (1.5, 1.4, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Few-step student generation (sec. 8). One fresh noise (from ``generator``) per intermediate step."""
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    times = student_times(num_steps, sigma_max, mid_t)
    B = x.shape[0]
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x0 = student(x, torch.full((B,), t_cur, dtype=torch.float64, device=x.device), cond).x0
        if t_next == 0.0:
            return x0
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = add_noise(x0, eps, t_next)
    raise AssertionError("unreachable: the time list ends at 0")


# ---------------------------------------------------------------------------------------------------
# Teacher: rectified-flow Euler and UniPC
# ---------------------------------------------------------------------------------------------------


def flow_shift_sigmas(num_steps: int, shift: float = 5.0, sigma_max: float = 0.999) -> list[float]:
    """Wan's sampling grid in RF time: shift(linspace(sigma_max, 0, N + 1)[:-1]) followed by 0."""
    u = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return [*shift_rf(u, shift).tolist(), 0.0]


def _v(teacher: TrigFlowDenoiser, x: Tensor, s: float, cond: Conditioning, guidance: float | None) -> Tensor:
    return teacher.velocity(
        x, torch.full((x.shape[0],), s, dtype=torch.float64, device=x.device), cond, guidance
    )


@torch.no_grad()
def euler_sample(
    teacher: TrigFlowDenoiser,
    noise: Tensor,
    cond: Conditioning,
    guidance: float | None = 5.0,
    num_steps: int = 50,
    shift: float = 5.0,
    sigmas: Sequence[float] | None = None,
    progress: bool = False,
) -> Tensor:
    """RF Euler from the noise at sigmas[0] to 0 with CFG ``guidance`` (None: conditional only)."""
    sigmas = flow_shift_sigmas(num_steps, shift) if sigmas is None else list(sigmas)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    for i in _progress(range(len(sigmas) - 1), progress, "euler"):
        x = x + (sigmas[i + 1] - sigmas[i]) * _v(teacher, x, sigmas[i], cond, guidance)
    return x


def _lambda(s: float) -> float:
    """log-SNR of the RF path, lambda = log((1 - s) / s); +inf at s = 0."""
    return math.inf if s == 0.0 else math.log1p(-s) - math.log(s)


def _unipc_coefficients(
    hh: float, rks: list[float], order: int
) -> tuple[float, float, list[float], list[list[float]]]:
    """(h phi_1(hh), B(hh), b, R) of UniPC-bh2 for step hh = -h and ratios rks (last one is 1)."""
    h_phi_1 = math.expm1(hh)  # h phi_1(h) = e^h - 1
    B_h = math.expm1(hh)  # bh2
    h_phi_k = h_phi_1 / hh - 1.0
    fact, b, R = 1, [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, B_h, b, R


def _unipc_update(
    x: Tensor, sigmas: Sequence[float], idx: list[int], ms: list[Tensor], m_new: Tensor | None, s_t: float
) -> Tensor:
    """UniP (m_new None) or UniC (m_new = model output at s_t) step from sigmas[idx[-1]] to s_t.

    ``ms`` are the data predictions at sigmas[idx] (oldest first); the step order is len(ms) for
    UniP and len(ms) (previous step's order) for UniC.
    """
    s0, m0 = sigmas[idx[-1]], ms[-1]
    order = len(ms)
    lam_t, lam_0 = _lambda(s_t), _lambda(s0)
    h = lam_t - lam_0
    rks, D1s = [], []
    for k in range(1, order):
        rk = (_lambda(sigmas[idx[-1 - k]]) - lam_0) / h
        rks.append(rk)
        D1s.append((ms[-1 - k] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1, B_h, b, R = _unipc_coefficients(hh, rks, order)
    alpha_t = 1.0 - s_t
    x_t = (s_t / s0) * x - alpha_t * h_phi_1 * m0
    if m_new is None:  # predictor UniP-p: order 2 uses rho = 1/2, higher orders solve R rho = b
        if not D1s:
            return x_t
        rhos = (
            [0.5]
            if order == 2
            else torch.linalg.solve(
                torch.tensor(R, dtype=torch.float64)[:-1, :-1], torch.tensor(b, dtype=torch.float64)[:-1]
            ).tolist()
        )
        return x_t - alpha_t * B_h * sum(r * d for r, d in zip(rhos, D1s))
    # corrector UniC-p: order 1 uses rho = 1/2, higher orders solve R rho = b
    rhos = (
        [0.5]
        if order == 1
        else torch.linalg.solve(
            torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        ).tolist()
    )
    corr = sum((r * d for r, d in zip(rhos[:-1], D1s)), torch.zeros_like(x))
    return x_t - alpha_t * B_h * (corr + rhos[-1] * (m_new - m0))


@torch.no_grad()
def unipc_sample(
    teacher: TrigFlowDenoiser,
    noise: Tensor,
    cond: Conditioning,
    guidance: float | None = 5.0,
    num_steps: int = 50,
    shift: float = 5.0,
    order: int = 2,
    sigmas: Sequence[float] | None = None,
    use_corrector: bool = True,
    progress: bool = False,
) -> Tensor:
    """Multistep UniPC-bh2 in data prediction (as Wan's FlowUniPCMultistepScheduler, order 2).

    Per step i: evaluate v at x_i and form m_i = x_i - s_i v_i; correct x_i with UniC (from x_{i-1}
    and the new m_i) unless i = 0; then predict x_{i+1} with UniP of order min(order, i + 1,
    N - i) (warm-up and lower order at the final step, which lands on s = 0 and returns m_{N-1}).
    """
    sigmas = flow_shift_sigmas(num_steps, shift) if sigmas is None else list(sigmas)
    if not 0.0 < sigmas[0] < 1.0:
        raise ValueError("UniPC needs 0 < sigmas[0] < 1 (lambda is infinite at s = 1)")
    N = len(sigmas) - 1
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    ms: list[Tensor] = []
    idx: list[int] = []
    x_prev, prev_order = None, 0
    for i in _progress(range(N), progress, "unipc"):
        m = x - sigmas[i] * _v(teacher, x, sigmas[i], cond, guidance)
        if use_corrector and x_prev is not None:
            x = _unipc_update(x_prev, sigmas, idx[-prev_order:], ms[-prev_order:], m, sigmas[i])
        ms, idx = (ms + [m])[-order:], (idx + [i])[-order:]
        this_order = min(order, i + 1, N - i)
        x_prev, prev_order = x, this_order
        x = _unipc_update(x, sigmas, idx[-this_order:], ms[-this_order:], None, sigmas[i + 1])
    return x
