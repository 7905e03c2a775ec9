"""Discrete-time consistency model baseline (rcm_math.md section 6).

Shape legend: B batch, C/F/H/W latent channels/frames/height/width; ``*_B`` per-sample, float64.

Grid of N + 1 shifted RF times (N = 48, shift k = 5), mapped to TrigFlow:
    s_k = k' u_k / (1 + (k' - 1) u_k),  u_k = k / N,  t_k = atan(s_k / (1 - s_k)),   k = 0..N
For k ~ U{1..N} and x_{t_k} = cos t_k x0 + sin t_k eps, one guided teacher Euler step in RF time
(the teacher's own ODE) gives x_{t_{k-1}}; the target is the student at that point under no grad:
    x_s = c_in(t_k) x_{t_k},  x_s' = x_s + (s_{k-1} - s_k) v_T(x_s, s_k),  x_{t_{k-1}} = (cos + sin)(t_{k-1}) x_s'
    L_dCM = loss_scale * sum((x0_hat_theta(x_{t_k}, t_k) - sg(x0_hat_theta(x_{t_{k-1}}, t_{k-1})))^2)
At k = 1 the target is at t_0 = 0, where x0_hat(x, 0) = x (c_out = 0): the boundary condition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import per_sample
from megatron_rcm.rcm.scm import bcast_mask, finite_mask
from megatron_rcm.rcm.time_sampling import shift_rf
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser, rf_to_trig, trig_to_rf

__all__ = ["dcm_grid", "dcm_loss", "teacher_euler_step"]


def dcm_grid(num_steps: int, shift: float, device: torch.device | str | None = None) -> Tensor:
    """TrigFlow times t_0 = 0 < t_1 < ... < t_N (~pi/2) of the shifted RF grid (float64, [N + 1])."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64, device=device)
    return rf_to_trig(shift_rf(u, shift))


def teacher_euler_step(
    teacher: TrigFlowDenoiser,
    x_t: Tensor,
    t_B: Tensor,
    t_next_B: Tensor,
    cond: Conditioning,
    guidance: float | None,
) -> Tensor:
    """One RF Euler step of the (guided) teacher from TrigFlow time t to t_next, in TrigFlow coordinates."""
    s_B, s_next_B = trig_to_rf(t_B), trig_to_rf(t_next_B)
    x_s = x_t / per_sample(torch.cos(t_B) + torch.sin(t_B), x_t)
    v = teacher.velocity(x_s, s_B, cond, guidance)
    x_s_next = x_s + per_sample(s_next_B - s_B, x_s) * v
    return x_s_next * per_sample(torch.cos(t_next_B) + torch.sin(t_next_B), x_s_next)


def dcm_loss(x0_theta: Tensor, target: Tensor, loss_scale: float) -> tuple[Tensor, Tensor]:
    """(L_dCM, number of non-finite samples): loss_scale * sum((x0_theta - sg(target))^2), batch mean."""
    B = x0_theta.shape[0]
    x64, tgt = x0_theta.to(torch.float64), target.detach().to(torch.float64)
    ok_B = finite_mask(x64.detach(), tgt)
    diff = torch.where(bcast_mask(ok_B, x64), x64 - tgt, 0.0)
    return loss_scale * diff.square().flatten(1).sum(dim=1).sum() / B, (B - ok_B.sum()).detach()
