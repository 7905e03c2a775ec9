"""DMD score regularizer and its fake-score critic (rcm_math.md sections 4 and 5).

Shape legend: B batch, C/F/H/W latent channels/frames/height/width; ``*_B`` per-sample, float64.

Stochastic rollout of the student (sec. 4), n in 1..N_max steps:
    x = eps_0, t_0 = pi/2;  t_i = min(t_i', t_{i-1}) with t_i' ~ p_D (or fixed times), i = 1..n-1
    x0 = x0_hat_student(x, t_i);  x = cos t_{i+1} x0 + sin t_{i+1} eps_{i+1}      (i < n-1)
    G = x0_hat_student(x, t_{n-1})         (only this last call keeps the graph)
DMD (sec. 4), at x_D = cos t_D G + sin t_D eps_D with t_D ~ p_D:
    weight = mean(|G - x_real|) (per sample, >= 1e-5),  grad = (x_fake - x_real) / weight
    L_DMD  = loss_scale * sum((G - sg(G - grad))^2)                                (float64)
Critic (sec. 5), G from the same rollout without grad:
    L_critic = sum((G - x_fake_hat(x_D, t_D))^2 / sin^2 t_D)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import add_noise, per_sample
from megatron_rcm.rcm.scm import bcast_mask, finite_mask
from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser

__all__ = [
    "DMDLoss",
    "Rollout",
    "critic_loss",
    "dmd_loss",
    "draw_rollout",
    "rollout_steps",
    "student_rollout",
]


def rollout_steps(count: int, N_max: int) -> int:
    """n = (count mod N_max) + 1, with count the number of earlier student (or critic) steps (sec. 4)."""
    return count % N_max + 1


class Rollout(NamedTuple):
    """The random inputs of one rollout: times t_0 = pi/2 > ... (each [B]) and noises eps_0.. (each x-shaped)."""

    times: list[Tensor]
    noises: list[Tensor]


def draw_rollout(
    n: int,
    shape: Sequence[int],
    p_D: TimeDistribution,
    fixed_times: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Rollout:
    """Draw an n-step rollout, in this order: eps_0, then (t_i', eps_i) for i = 1..n-1.

    ``fixed_times`` (e.g. [1.5, 1.4, 1.0]) replaces the draws t_i' by fixed_times[i-1]; t_i is still
    min(t_i', t_{i-1}).
    """
    B = shape[0]
    t = torch.full((B,), math.pi / 2, dtype=torch.float64, device=device)
    times = [t]
    noises = [torch.randn(*shape, generator=generator, device=device, dtype=dtype)]
    for i in range(1, n):
        if fixed_times is None:
            t_new = p_D.sample(B, generator=generator, device=device)
        else:
            t_new = torch.full((B,), float(fixed_times[i - 1]), dtype=torch.float64, device=device)
        t = torch.minimum(t_new, t)
        times.append(t)
        noises.append(torch.randn(*shape, generator=generator, device=device, dtype=dtype))
    return Rollout(times=times, noises=noises)


def student_rollout(
    student: TrigFlowDenoiser, rollout: Rollout, cond: Conditioning, grad_last: bool
) -> Tensor:
    """G of sec. 4: few-step student generation; only the last x0_hat keeps the graph (if ``grad_last``)."""
    x = rollout.noises[0]
    n = len(rollout.times)
    for i in range(n - 1):
        with torch.no_grad():
            x0 = student(x, rollout.times[i], cond).x0
        t_next = rollout.times[i + 1]
        x = add_noise(x0, rollout.noises[i + 1], t_next)
    with torch.set_grad_enabled(grad_last and torch.is_grad_enabled()):
        return student(x, rollout.times[n - 1], cond).x0


class DMDLoss(NamedTuple):
    loss: Tensor
    """Scalar float64: loss_scale * mean over the batch of the per-sample sum."""
    weight: Tensor
    """Mean DMD normalizer mean(|G - x_real|) over the finite samples."""
    num_nonfinite: Tensor
    """Number of samples dropped because G, x_fake or x_real was not finite."""


def dmd_loss(
    G: Tensor,
    x_fake: Tensor,
    x_real: Tensor,
    loss_scale: float,
    weight_min: float = 1e-5,
    mask: Tensor | None = None,
) -> DMDLoss:
    """L_DMD = loss_scale * sum((G - sg(G - grad))^2), grad = (x_fake - x_real) / weight  (sec. 4, float64).

    ``G`` carries the student graph; ``x_fake`` (critic) and ``x_real`` (guided teacher) are x0 predictions
    at x_D without graph. d L / d G = 2 loss_scale grad. ``mask`` (broadcastable to G, the generated-frame
    mask of ``rcm.condition_frames``) restricts the weight's mean and the loss to where it is 1.
    """
    B = G.shape[0]
    G64 = G.to(torch.float64)
    x_fake, x_real = x_fake.detach().to(torch.float64), x_real.detach().to(torch.float64)
    ok_B = finite_mask(G64.detach(), x_fake, x_real)
    with torch.no_grad():
        m = torch.ones_like(G64) if mask is None else mask.to(torch.float64).expand_as(G64)
        weight_B = ((G64 - x_real).abs() * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1)
        weight_B = weight_B.clamp_min(weight_min)
        weight_B = torch.where(ok_B, weight_B, 1.0)
        grad = (x_fake - x_real) / per_sample(weight_B, G64)
    diff = torch.where(bcast_mask(ok_B, G64), G64 - (G64 - grad).detach(), 0.0) * m
    loss = loss_scale * diff.square().flatten(1).sum(dim=1).sum() / B
    n_ok = ok_B.sum()
    weight = torch.where(ok_B, weight_B, 0.0).sum() / n_ok.clamp_min(1)
    return DMDLoss(loss=loss, weight=weight, num_nonfinite=(B - n_ok).detach())


def critic_loss(
    G: Tensor, x_fake_hat: Tensor, t_D: Tensor, loss_scale: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(L_critic, number of non-finite samples): sum((G - x_fake_hat)^2 / sin^2 t_D)  (sec. 5, float64).

    ``x_fake_hat`` carries the critic graph, ``G`` has none. Non-finite samples are zeroed and counted.
    """
    B = G.shape[0]
    G64, xf64 = G.detach().to(torch.float64), x_fake_hat.to(torch.float64)
    ok_B = finite_mask(G64, xf64.detach())
    sin2 = per_sample(torch.sin(t_D.to(torch.float64)) ** 2, G64)
    # mask before squaring: d(x^2) at a masked inf would be inf * 0 = nan
    diff = torch.where(bcast_mask(ok_B, G64), G64 - xf64, 0.0)
    if mask is not None:  # the generated frames only (rcm.condition_frames)
        diff = diff * mask.to(torch.float64)
    loss = loss_scale * (diff.square() / sin2).flatten(1).sum(dim=1).sum() / B
    return loss, (B - ok_B.sum()).detach()
