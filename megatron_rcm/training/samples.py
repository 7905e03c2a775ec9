"""Labelled PNG grids of samples: one row per label, one column per sample.

Latents are shown as images: channel 0 of the middle frame for 1-channel data (the quickstart digits,
which *are* pixels), the first three channels as RGB otherwise (a latent preview: no VAE decoding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def latent_to_images(x_BCFHW: torch.Tensor, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray:
    """[B, C, F, H, W] -> uint8 [B, H, W, 3]. ``value_range`` None: per-sample min-max."""
    x = x_BCFHW.detach().float().cpu()
    x = x[:, :3, x.shape[2] // 2]  # B c H W
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    if value_range is None:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
    else:
        lo, hi = value_range
    x = ((x - lo) / (hi - lo + 1e-12)).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_grid(rows: dict[str, torch.Tensor], path: str | Path, scale: int = 4, pad: int = 2,
              value_range: tuple[float, float] | None = (-1.0, 1.0), label_width: int = 150) -> Path:
    """Save ``{row label: samples [B, C, F, H, W]}`` as one PNG with the labels on the left."""
    imgs = {k: latent_to_images(v, value_range) for k, v in rows.items()}
    n_cols = max(v.shape[0] for v in imgs.values())
    h, w = next(iter(imgs.values())).shape[1:3]
    ch, cw = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_width + n_cols * cw + pad, len(imgs) * ch + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, arr) in enumerate(imgs.items()):
        y = pad + r * ch
        draw.text((4, y + ch // 2 - 6), label, fill=(0, 0, 0))
        for c in range(arr.shape[0]):
            tile = Image.fromarray(arr[c]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * cw, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
