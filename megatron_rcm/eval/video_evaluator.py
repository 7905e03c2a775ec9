"""A small clip evaluator trained on real procedural clips (``megatron_rcm.data.shapes``).

``ClipEvaluator``, trained on freshly drawn real clips, has a shape, a colour and a direction head on
its penultimate layer (64-d, the feature space of the Frechet distances, precision/recall and diversity
in ``megatron_rcm.eval.video_metrics``), and a frame-pair head that predicts the direction of motion
between two consecutive frames: motion consistency is scored frame to frame with it.
Light Gaussian input noise during training so that slightly noisy samples are not out of distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_rcm.data.shapes import (
    COLOURS,
    DIRECTIONS,
    NUM_CONDITIONS,
    SHAPES,
    condition_attributes,
    sample_clips,
)

HEADS = ("shape", "colour", "direction")


class ClipEvaluator(nn.Module):
    """Appearance: per frame Conv2d 3->16 (pool 2) -> 32 (pool to 4x4) -> Linear 512->64, mean over frames.
    Motion: per frame pair (f, f + 1) stacked as 6 channels, Conv2d 6->16 (pool 2) -> 16 (pool to 4x4) ->
    Linear 256->32, whose ``pair_head`` predicts that pair's direction; mean over pairs.
    Features: Linear(64 + 32 -> 64) of both, then the shape / colour / direction heads. 2D convs only: a
    3D conv net cost minutes of CPU to train."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.frame = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, 64), nn.ReLU())
        self.pair = nn.Sequential(
            nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * 16, 32), nn.ReLU())
        self.pair_head = nn.Linear(32, len(DIRECTIONS))
        self.proj = nn.Sequential(nn.Linear(64 + 32, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({"shape": nn.Linear(feature_dim, len(SHAPES)),
                                    "colour": nn.Linear(feature_dim, len(COLOURS)),
                                    "direction": nn.Linear(feature_dim, len(DIRECTIONS))})

    @staticmethod
    def pairs(x_BCFHW: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] -> [B * (F - 1), 6, H, W] (frames f and f + 1, f-major within each clip)."""
        B, C, F, H, W = x_BCFHW.shape
        x = x_BCFHW.float().permute(0, 2, 1, 3, 4)  # B F C H W
        return torch.cat([x[:, :-1], x[:, 1:]], dim=2).reshape(B * (F - 1), 2 * C, H, W)

    def encode(self, x_BCFHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, 64], pair-direction logits [B, F - 1, 4])."""
        B, C, F, H, W = x_BCFHW.shape
        frames = x_BCFHW.float().permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)
        look_BD = self.frame(frames).view(B, F, -1).mean(1)
        motion_BPD = self.pair(self.pairs(x_BCFHW)).view(B, F - 1, -1)
        feats = self.proj(torch.cat([look_BD, motion_BPD.mean(1)], dim=-1))
        return feats, self.pair_head(motion_BPD)

    def features(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        return self.encode(x_BCFHW)[0]

    def forward(self, x_BCFHW: torch.Tensor) -> dict[str, torch.Tensor]:
        f, pair_logits = self.encode(x_BCFHW)
        return {**{k: head(f) for k, head in self.heads.items()}, "pair_direction": pair_logits}


@dataclass
class VideoEvaluator:
    net: ClipEvaluator
    frames: int
    height: int
    width: int


def train_evaluator(frames: int, height: int, width: int, steps: int = 300, batch_size: int = 64, seed: int = 0,
                    noise_std: float = 0.1) -> VideoEvaluator:
    """Adam, cross entropy summed over the heads, ``steps`` batches of fresh real clips (uniform
    conditions). Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ClipEvaluator()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    ce = nn.functional.cross_entropy
    for _ in range(steps):
        cond = torch.randint(NUM_CONDITIONS, (batch_size,), generator=g)
        x = sample_clips(cond, frames, height, width, g)
        x = x + noise_std * torch.randn(x.shape, generator=g)
        s, c, d = condition_attributes(cond)
        out = net(x)
        loss = ce(out["shape"], s) + ce(out["colour"], c) + ce(out["direction"], d)
        loss = loss + ce(out["pair_direction"].flatten(0, 1), d.repeat_interleave(frames - 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return VideoEvaluator(net, frames, height, width)


@torch.no_grad()
def evaluate_clips(ev: VideoEvaluator, x_BCFHW: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Predictions on clips [N, 3, F, H, W]: ``shape``/``colour``/``direction`` class ids [N],
    ``pair_direction`` [N, F - 1] (frame to frame) and ``features`` [N, 64]."""
    if tuple(x_BCFHW.shape[1:]) != (3, ev.frames, ev.height, ev.width):
        raise ValueError(f"clips of shape {tuple(x_BCFHW.shape)} do not match the evaluator's "
                         f"[N, 3, {ev.frames}, {ev.height}, {ev.width}]")
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in (*HEADS, "pair_direction", "features")}
    for i in range(0, x_BCFHW.shape[0], batch_size):
        x = x_BCFHW[i : i + batch_size].float().cpu()
        f, pair_logits = ev.net.encode(x)
        outs["features"].append(f)
        for k, head in ev.net.heads.items():
            outs[k].append(head(f).argmax(-1))
        outs["pair_direction"].append(pair_logits.argmax(-1))
    return {k: torch.cat(v) for k, v in outs.items()}
