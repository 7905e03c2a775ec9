"""Rectified-flow pre-training of a (small) Wan teacher, with classifier-free-guidance dropout.

Used by the quickstart to make a real teacher from scratch. RF path and target (rcm_math.md sec. 1):
    x_s = (1 - s) x0 + s eps,   v* = eps - x0,   loss = mean (net(x_s, T_scale * s, c) - v*)^2
s ~ logit-normal(time_mean, 1) (SD3; a positive ``time_mean`` puts more of the steps at high noise, where the
layout and motion of a clip are decided); with probability ``cfg_dropout`` the prompt is replaced by the negative-prompt
embedding so that the same network also gives the unconditional branch of CFG.
AdamW (betas 0.9, 0.99), linear warm-up then cosine decay to 10 % of the peak learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def pretrain_teacher(model, data, steps: int, lr: float = 1e-3, cfg_dropout: float = 0.1,
                     timestep_scale: float = 1000.0, warmup_steps: int = 50, seed: int = 0, time_mean: float = 0.0,
                     device: torch.device | str = "cpu",
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``steps`` batches of ``data`` (a source with ``next_batch()``).
    Returns the per-step losses."""
    g = torch.Generator(device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        progress = step / max(1, steps - 1)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        batch = data.next_batch().to(device)
        x0 = batch.latent_BCFHW
        B = x0.shape[0]
        eps = torch.randn(x0.shape, generator=g, device=device)
        s_B = torch.sigmoid(time_mean + torch.randn(B, generator=g, device=device))
        s = s_B.view(B, 1, 1, 1, 1)
        x_s = (1 - s) * x0 + s * eps
        ctx = batch.context_BLD
        if batch.neg_context_BLD is not None and cfg_dropout > 0:
            drop = torch.rand(B, generator=g, device=device) < cfg_dropout
            ctx = torch.where(drop.view(B, 1, 1), batch.neg_context_BLD.expand_as(ctx), ctx)
        v = model(x_s, s_B * timestep_scale, ctx)
        loss = (v.float() - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1], time.perf_counter() - t0)
    model.eval()
    return losses
