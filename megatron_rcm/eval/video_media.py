"""Pictures of clips: a labelled PNG contact sheet (one row per method, the frames of each sample side by
side) and animated GIFs (a grid of samples playing their frames). Files are written atomically (a
temporary file in the same folder, then renamed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def clips_to_uint8(x_BCFHW: torch.Tensor) -> np.ndarray:
    """[B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    x = ((x_BCFHW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


def _save_atomic(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    img.save(tmp, format=path.suffix.lstrip(".").upper(), **kwargs)
    os.replace(tmp, path)
    return path


def save_contact_sheet(rows: dict[str, torch.Tensor], path: str | Path, scale: int = 3, pad: int = 1,
                       gap: int = 8, label_width: int = 150) -> Path:
    """``{row label: clips [S, 3, F, H, W]}`` -> PNG: per row, S samples, each its F frames left to right."""
    arrs = {k: clips_to_uint8(v) for k, v in rows.items()}
    S = max(a.shape[0] for a in arrs.values())
    F, H, W = next(iter(arrs.values())).shape[1:4]
    fw, fh = W * scale + pad, H * scale + pad
    sample_w = F * fw + gap
    canvas = Image.new("RGB", (label_width + S * sample_w, len(arrs) * fh + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, a) in enumerate(arrs.items()):
        y = pad + r * fh
        draw.text((4, y + fh // 2 - 6), label, fill=(0, 0, 0))
        for s in range(a.shape[0]):
            for f in range(F):
                tile = Image.fromarray(a[s, f]).resize((W * scale, H * scale), Image.NEAREST)
                canvas.paste(tile, (label_width + s * sample_w + f * fw, y))
    return _save_atomic(canvas, Path(path))


def save_gif(grid: list[list[torch.Tensor]], path: str | Path, scale: int = 4, pad: int = 2,
             frame_ms: int = 150) -> Path:
    """Animated GIF of a grid of clips (``grid[row][col]``: [3, F, H, W]); every cell plays its frames."""
    cells = [[clips_to_uint8(c[None])[0] for c in row] for row in grid]
    F, H, W = cells[0][0].shape[:3]
    n_cols = max(len(r) for r in cells)
    cw, ch = W * scale + pad, H * scale + pad
    frames = []
    for f in range(F):
        canvas = Image.new("RGB", (n_cols * cw + pad, len(cells) * ch + pad), (255, 255, 255))
        for r, row in enumerate(cells):
            for c, clip in enumerate(row):
                canvas.paste(Image.fromarray(clip[f]).resize((W * scale, H * scale), Image.NEAREST),
                             (pad + c * cw, pad + r * ch))
        frames.append(canvas)
    return _save_atomic(frames[0], Path(path), save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
