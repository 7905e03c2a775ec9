"""Cosmos' 3D rotary position embedding: per-axis NTK-scaled bases, rotate-half pairing.

The head dim d is split over (frame, row, column) as (d - 4*(d//6), 2*(d//6), 2*(d//6)), like Wan. Unlike
Wan, each axis has its own base theta_a = 10000 * rope_scale_a^(d_a / (d_a - 2)) (NTK scaling) and the
pairs are (i, i + d/2) (the "rotate half" layout: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]),
with the first half of the angles ordered [frame freqs, row freqs, col freqs]. Temporal positions are
frame indices, or frame * base_fps / fps for video (``rope_fps``).
"""

from __future__ import annotations

import torch


def rope_angles(grid_fhw, dims, rope_scale, fps, base_fps: float, device):
    """Angles [S, d/2] (float64) for tokens ordered (frame, row, column)."""
    f, h, w = grid_fhw
    parts = []
    for axis, (n, part, scale, shape) in enumerate(
        zip((f, h, w), dims, rope_scale, ((f, 1, 1), (1, h, 1), (1, 1, w)))
    ):
        theta = 10000.0 * scale ** (part / (part - 2))
        inv = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64, device=device) / part)
        pos = torch.arange(n, dtype=torch.float64, device=device)
        if axis == 0 and fps is not None:
            pos = pos / fps * base_fps
        parts.append((pos[:, None] * inv[None]).view(*shape, -1).expand(f, h, w, -1))
    return torch.cat(parts, dim=-1).reshape(f * h * w, -1)


def rope_cos_sin(grid_fhw, dims, rope_scale, fps, base_fps, device, dtype):
    """cos/sin tables [S, 1, 1, d/2] for the Megatron layout [S, B, heads, d]."""
    ang = rope_angles(grid_fhw, dims, rope_scale, fps, base_fps, device)
    return torch.cos(ang).to(dtype)[:, None, None], torch.sin(ang).to(dtype)[:, None, None]


def apply_rope_half(x_SBNd: torch.Tensor, cos, sin) -> torch.Tensor:
    """[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (halves of the head dim), in the table's dtype
    (float32 at least, as Cosmos); linear in x, so the tangent is rotated by the same call."""
    x = x_SBNd.to(torch.promote_types(x_SBNd.dtype, cos.dtype))
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_SBNd.dtype)
