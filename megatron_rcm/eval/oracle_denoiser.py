"""The posterior-mean ("oracle") denoiser over a bank of real clips: a reference for a teacher's x0 estimate.

For data uniform over a bank {c_k} (K clips of one condition) and the RF path x_s = (1 - s) x0 + s eps
(rcm_math.md sec. 1), the minimum-MSE estimate of x0 is the posterior mean (Tweedie):

    w_k(x_s) = softmax_k( -|x_s - (1 - s) c_k|^2 / (2 s^2) ),    x0*(x_s) = sum_k w_k c_k,    v* = (x_s - x0*) / s

With a large bank this is the best any denoiser trained on the condition can do at noise level s, so
``mse(teacher x0, x0*)`` on noised real clips says how far the teacher is from a perfect fit at that level.
Sampling with v* (any RF sampler) ends on bank clips: an end-to-end check of a sampler's time and sign
conventions that needs no trained network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_rcm.data.shapes import sample_clips


def posterior_mean_x0(x_s_BCFHW: torch.Tensor, s: float, bank_KCFHW: torch.Tensor) -> torch.Tensor:
    """x0*(x_s) above, computed in float64, returned in x_s's dtype."""
    if not 0.0 < s <= 1.0:
        raise ValueError(f"posterior_mean_x0: RF time s={s} must be in (0, 1]")
    if x_s_BCFHW.shape[1:] != bank_KCFHW.shape[1:]:
        raise ValueError(f"posterior_mean_x0: x_s clips {tuple(x_s_BCFHW.shape[1:])} and bank clips "
                         f"{tuple(bank_KCFHW.shape[1:])} differ in shape")
    x_BP = x_s_BCFHW.flatten(1).double()
    c_KP = bank_KCFHW.flatten(1).double().to(x_BP.device)
    d2_BK = (x_BP.square().sum(1, keepdim=True) - 2 * (1 - s) * x_BP @ c_KP.T
             + (1 - s) ** 2 * c_KP.square().sum(1)[None])  # |x_s - (1 - s) c_k|^2
    w_BK = torch.softmax(-d2_BK / (2 * s * s), dim=1)
    return (w_BK @ c_KP).view_as(x_s_BCFHW).to(x_s_BCFHW.dtype)


@torch.no_grad()
def oracle_gap(x0_fn: Callable[[torch.Tensor, float, int], torch.Tensor], conditions: Sequence[int],
               frames: int, height: int, width: int, levels: Sequence[float] = (0.5, 0.7, 0.85, 0.95),
               clips_per_condition: int = 8, bank_size: int = 2048, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per RF time s: mean squared distance of ``x0_fn(x_s, s, condition)`` (the network's x0 estimate, [B, C,
    F, H, W]) to the oracle's, and of each to the clean clip, on real clips of ``conditions`` noised to s.

    Returns ``{"s=0.85": {"teacher_vs_oracle": ..., "oracle_vs_clean": ..., "teacher_vs_clean": ...}, ...}``.
    """
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, float]] = {f"s={s:g}": dict.fromkeys(
        ("teacher_vs_oracle", "oracle_vs_clean", "teacher_vs_clean"), 0.0) for s in levels}
    for c in conditions:
        bank = sample_clips(torch.full((bank_size,), int(c)), frames, height, width, g)
        clips = sample_clips(torch.full((clips_per_condition,), int(c)), frames, height, width, g)
        for s in levels:
            x_s = (1 - s) * clips + s * torch.randn(clips.shape, generator=g)
            oracle, net = posterior_mean_x0(x_s, s, bank), x0_fn(x_s, s, int(c)).float().cpu()
            row = sums[f"s={s:g}"]
            row["teacher_vs_oracle"] += float((net - oracle).square().mean()) / len(conditions)
            row["oracle_vs_clean"] += float((oracle - clips).square().mean()) / len(conditions)
            row["teacher_vs_clean"] += float((net - clips).square().mean()) / len(conditions)
    return sums
