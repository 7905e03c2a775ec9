"""sCM: continuous-time consistency loss through a JVP of the student (rcm_math.md section 3).

Shape legend: B batch, C/F/H/W latent channels/frames/height/width; ``*_B`` per-sample, float64.

With the (guided) teacher's TrigFlow velocity F_T at x_t = cos t x0 + sin t eps:

    dx_t = cos t sin t F_T,   dt = cos t sin t                    (JVP rearrangement, sCM Sec. 5.1)
    (F_sg, dF) = JVP of the student F_theta- at (x_t, t) along (dx_t, dt)
    g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_T) - (r cos t sin t x_t + dF)    ("release", default)
    g <- g / (||g||_2 + 0.1)                                     (per sample, float64)
    L_sCM = loss_scale * sum((F_theta - F_sg - g)^2)

On the tangent warm-up r = min(1, step / tangent_warmup), two forms exist (``TANGENT_WARMUP_FORMS``):

    "release"  - (r cos t sin t x_t + dF)       rcm_math.md sec. 3 and the authors' release (since
                                                January 2026): r ramps in the x_t term only.
    "paper"    - r (cos t sin t x_t + dF)       sCM (arXiv 2410.11081, Sec. 4.2): r replaces the
                                                coefficient cos t sin t of the whole second term, so r
                                                multiplies dF as well.

The default is the release's form (the one rcm_math.md states); the paper's is kept, as
``DistillConfig.tangent_warmup_form = "paper"``, to reproduce runs made with it. The two agree once
r = 1 (after the warm-up, or with tangent_warmup = 0). The JVP and the finite-difference dF
(``finite_difference_dF``) both go through ``scm_target``, so they use the same form.

Since d/dF_theta of the loss is -2 loss_scale g (F_theta == F_sg numerically), the loss value is
about loss_scale * ||g_normalized||^2 < loss_scale whatever the student; ``g_norm`` (before the
normalization) is the quantity that tracks progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import per_sample

__all__ = [
    "SCMLoss",
    "TANGENT_WARMUP_FORMS",
    "bcast_mask",
    "finite_mask",
    "finite_difference_dF",
    "normalize_per_sample",
    "scm_loss",
    "scm_tangents",
    "scm_target",
    "tangent_warmup_ratio",
]


TANGENT_WARMUP_FORMS = ("release", "paper")
"""Where the warm-up ratio r enters g (module docstring): "release" (default) or "paper" (sCM)."""


def bcast_mask(mask_B: Tensor, like: Tensor) -> Tensor:
    """[B] bool -> [B, 1, 1, ...] bool matching ``like``."""
    return mask_B.view(-1, *([1] * (like.dim() - 1)))


def finite_mask(*tensors: Tensor) -> Tensor:
    """[B] bool: True for samples whose every element in every tensor is finite."""
    mask = None
    for x in tensors:
        m = torch.isfinite(x).flatten(1).all(dim=1)
        mask = m if mask is None else mask & m
    return mask


def tangent_warmup_ratio(step: int, tangent_warmup: int) -> float:
    """r = min(1, step / tangent_warmup); no warm-up (0 steps) means r = 1 (sec. 3)."""
    if tangent_warmup <= 0:
        return 1.0
    return min(1.0, step / tangent_warmup)


def scm_tangents(t_B: Tensor, F_T: Tensor) -> tuple[Tensor, Tensor]:
    """Tangents of the JVP (sCM Sec. 5.1 rearrangement): dx_t = cos t sin t F_T, dt = cos t sin t."""
    t_B = t_B.to(torch.float64)
    cs_B = torch.cos(t_B) * torch.sin(t_B)
    return per_sample(cs_B, F_T, promote=True).to(F_T.dtype) * F_T, cs_B


def scm_target(
    x_t: Tensor, t_B: Tensor, F_sg: Tensor, F_T: Tensor, dF: Tensor, r: float, form: str = "release"
) -> Tensor:
    """Unnormalized g of sec. 3 (float64), with the warm-up ratio r placed as ``form`` says:

    "release": -cos t sqrt(1 - r^2 sin^2 t)(F_sg - F_T) - (r cos t sin t x_t + dF)     (sec. 3)
    "paper":   -cos t sqrt(1 - r^2 sin^2 t)(F_sg - F_T) - r (cos t sin t x_t + dF)     (sCM Sec. 4.2)
    """
    if form not in TANGENT_WARMUP_FORMS:
        raise ValueError(f"tangent warm-up form must be one of {TANGENT_WARMUP_FORMS}, got {form!r}")
    x_t, F_sg, F_T, dF = (x.to(torch.float64) for x in (x_t, F_sg, F_T, dF))
    t_B = t_B.to(torch.float64)
    cos_t, sin_t = (
        per_sample(torch.cos(t_B), x_t, promote=True),
        per_sample(torch.sin(t_B), x_t, promote=True),
    )
    first = -cos_t * torch.sqrt(1.0 - r**2 * sin_t**2) * (F_sg - F_T)
    if form == "release":
        return first - (r * cos_t * sin_t * x_t + dF)
    return first - r * (cos_t * sin_t * x_t + dF)


def normalize_per_sample(g: Tensor, eps: float = 0.1) -> tuple[Tensor, Tensor]:
    """(g / (||g||_2 + eps), ||g||_2) per sample, in float64 (sec. 3)."""
    g = g.to(torch.float64)
    norm_B = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / per_sample(norm_B + eps, g, promote=True), norm_B


class SCMLoss(NamedTuple):
    loss: Tensor
    """Scalar float64: loss_scale * mean over the batch of the per-sample sum of squares."""
    g_norm: Tensor
    """Mean ||g||_2 (before normalization) over the finite samples (0 when there are none)."""
    num_nonfinite: Tensor
    """Number of samples dropped because g or F_theta was not finite."""


def scm_loss(
    F_theta: Tensor, g: Tensor, loss_scale: float, eps: float = 0.1, mask: Tensor | None = None
) -> SCMLoss:
    """L_sCM = loss_scale * sum((F_theta - sg(F_theta) - g_normalized)^2)  (sec. 3).

    ``F_theta`` carries the student graph; ``g`` is the unnormalized target of ``scm_target``. Samples
    whose g or F_theta is non-finite are zeroed out of the loss (their gradient is exactly 0) and
    counted; the batch mean still divides by the full batch size. ``mask`` (broadcastable to g, e.g. the
    generated-frame mask [1, 1, F, 1, 1] of ``rcm.condition_frames``) restricts g, its norm and the loss to
    where it is 1.
    """
    B = F_theta.shape[0]
    ok_B = finite_mask(g, F_theta.detach())
    g = torch.where(bcast_mask(ok_B, g), g.to(torch.float64), 0.0)
    if mask is not None:
        g = g * mask.to(torch.float64)
    g_n, norm_B = normalize_per_sample(g, eps)
    F64 = F_theta.to(torch.float64)
    diff = torch.where(bcast_mask(ok_B, g_n), F64 - F64.detach() - g_n, 0.0)
    if mask is not None:
        diff = diff * mask.to(torch.float64)
    loss = loss_scale * diff.square().flatten(1).sum(dim=1).sum() / B
    n_ok = ok_B.sum()
    g_norm = torch.where(ok_B, norm_B, 0.0).sum() / n_ok.clamp_min(1)
    return SCMLoss(loss=loss, g_norm=g_norm.detach(), num_nonfinite=(B - n_ok).detach())


def finite_difference_dF(
    F_fn: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t_B: Tensor, F_sg: Tensor, F_T: Tensor, h: float
) -> Tensor:
    """dF of sec. 3 by a finite difference along the teacher ODE (sec. 6), without a JVP.

        x_{t-h} = cos h x_t - sin h F_T                       (one TrigFlow DDIM step of the teacher)
        dF/dt  ~= (cos h F(x_t, t) - F(x_{t-h}, t-h)) / sin h
        dF      = cos t sin t dF/dt                           (same scaling as the JVP tangent dt)

    ``F_fn(x, t_B)`` evaluates the student's F_hat (called under no grad); ``F_sg`` is F at (x_t, t).
    The step is h per sample, or t/2 where t < 2h so that t - h stays positive. The error is O(h);
    in float32 the cancellation adds O(1e-7 / h), so this needs an fp32 (not bf16) student.
    """
    t_B = t_B.to(torch.float64)
    h_B = torch.clamp(t_B / 2, max=h)
    x64, F_T64 = x_t.to(torch.float64), F_T.to(torch.float64)
    cos_h, sin_h = (
        per_sample(torch.cos(h_B), x64, promote=True),
        per_sample(torch.sin(h_B), x64, promote=True),
    )
    x_prev = (cos_h * x64 - sin_h * F_T64).to(x_t.dtype)
    with torch.no_grad():
        F_prev = F_fn(x_prev, t_B - h_B).to(torch.float64)
    dF_dt = (cos_h * F_sg.detach().to(torch.float64) - F_prev) / sin_h
    return per_sample(torch.cos(t_B) * torch.sin(t_B), x64, promote=True) * dF_dt
