"""Per-sample coefficients over a batch, and the TrigFlow forward process that uses them.

Shape legend: B batch; ``like`` any [B, ...] tensor (latents [B, C, F, H, W]); ``*_B`` per-sample.

    per_sample(c_B, like)          [B] -> [B, 1, ..., 1], in like's dtype (promote=True: float64 stays float64)
    add_noise(x0, eps, t)          x_t = cos t x0 + sin t eps                       (rcm_math.md section 1)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["add_noise", "per_sample"]


def per_sample(c_B: Tensor, like: Tensor, promote: bool = False) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``. Cast to ``like.dtype``, or with ``promote`` to
    ``promote_types(c_B.dtype, like.dtype)`` (a float64 coefficient keeps float64 against float32 data)."""
    dtype = torch.promote_types(c_B.dtype, like.dtype) if promote else like.dtype
    return c_B.to(dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """x_t = cos t x0 + sin t eps (rcm_math.md section 1). ``t``: per-sample [B] (coefficients cast to x0's
    dtype) or one Python float for the whole batch."""
    if isinstance(t, float | int):
        return math.cos(t) * x0 + math.sin(t) * eps
    return per_sample(torch.cos(t), x0) * x0 + per_sample(torch.sin(t), x0) * eps
