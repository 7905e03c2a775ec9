"""Wan's 3D rotary position embedding.

The head dim d is split over (frame, row, column) as (d - 4*(d//6), 2*(d//6), 2*(d//6)) = (44, 42, 42) for
d = 128. Within each part, channel pairs (2i, 2i+1) are rotated (interleaved pairs, as Wan's complex view
``view_as_complex(x.reshape(..., -1, 2))``) by angle pos * theta^(-2i/part).
"""

from __future__ import annotations

import torch


def rope_angles(grid_fhw: tuple[int, int, int], dims: tuple[int, int, int], theta: float, device):
    """Angles [S, d/2] (float64) for tokens ordered (frame, row, column)."""
    f, h, w = grid_fhw
    parts = []
    for n, part, shape in zip((f, h, w), dims, ((f, 1, 1), (1, h, 1), (1, 1, w))):
        inv = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64, device=device) / part)
        ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None]  # [n, part/2]
        parts.append(ang.view(*shape, -1).expand(f, h, w, -1))
    return torch.cat(parts, dim=-1).reshape(f * h * w, -1)


def rope_cos_sin(grid_fhw, dims, theta, device, dtype):
    """cos/sin tables [S, 1, 1, d/2] for the Megatron layout [S, B, heads, d]."""
    ang = rope_angles(grid_fhw, dims, theta, device)
    return torch.cos(ang).to(dtype)[:, None, None], torch.sin(ang).to(dtype)[:, None, None]


def apply_rope(x_SBNd: torch.Tensor, cos, sin) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). Linear in x, so the
    tangent is rotated by the same call."""
    x = x_SBNd.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x_SBNd.dtype)
