"""How much a video denoiser's output at one frame depends on the other frames (a teacher diagnostic).

Resample frame f of the input x [B, C, F, H, W] (fresh noise: x' = x except x'[:, :, f] ~ N(0, 1)) and compare
the output change at the other frames with the change at frame f:

    coupling = mean_{g != f} |v(x')_g - v(x)_g|  /  mean |v(x')_f - v(x)_f|

0 = every frame is denoised on its own (no temporal attention at work: samples from pure noise put the
object at an independent place in every frame); a denoiser that reads the clip as a whole gives a ratio
of the order of one. Reference: for v(x) = x + a mean_frames(x) the ratio is (a/F) / (1 + a/F).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def frame_coupling(velocity: Callable[[torch.Tensor], torch.Tensor], x_BCFHW: torch.Tensor, frame: int,
                   generator: torch.Generator | None = None) -> float:
    """The ratio above for ``velocity(x) -> [B, C, F, H, W]`` at input ``x_BCFHW``, resampling ``frame``."""
    if x_BCFHW.dim() != 5:
        raise ValueError(f"frame_coupling expects x [B, C, F, H, W], got shape {tuple(x_BCFHW.shape)}")
    F = x_BCFHW.shape[2]
    if F < 2 or not 0 <= frame < F:
        raise ValueError(f"frame_coupling: frame {frame} of a clip with {F} frames (needs F >= 2, 0 <= frame < F)")
    x2 = x_BCFHW.clone()
    x2[:, :, frame] = torch.randn(x2[:, :, frame].shape, generator=generator, dtype=x2.dtype).to(x2.device)
    diff_F = (velocity(x2) - velocity(x_BCFHW)).abs().double().mean(dim=(0, 1, 3, 4))
    others = torch.cat([diff_F[:frame], diff_F[frame + 1:]])
    return float(others.mean() / diff_F[frame])
