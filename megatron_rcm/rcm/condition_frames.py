"""Conditioning frames kept clean through the TrigFlow wrapper and every rCM loss (Video2World, TI2V).

Shape legend: B batch, C latent channels, F latent frames, k conditioning frames (the first k), H/W latent
height/width, S network tokens; ``*_B`` per sample.

The first k latent frames of a sample are given (Cosmos-Predict2 Video2World: k from the input video;
Wan2.2 TI2V: k = 1, the image). With m the generated-frame mask (m = 0 on frames < k, 1 after):

    x_in   = (1 - m) x0_c + m c_in x_t                   network input: the clean frames as they are
    c_noise_f = 0 on frames < k, c_noise(t) after        the clean frames at the clean time (per frame; Wan
                                                         TI2V: per token, ``frame_timestep`` of the network)
    x0_hat = (1 - m) x0_c + m (c_skip x_t + c_out v)     bit-equal to the data on the conditioning frames
    F_hat  = m (c_skip_F x_t + c_out_F v)                the conditioning frames do not move: F = 0 there
    dx_in  = m dx_in,  dc_noise_f = 0 on frames < k,  dF = m dF            (the JVP pass)
    g      = m g before g / (||g||_2 + c)                sCM: the norm over the generated frames only
    weight = sum(m |G - x_real|) / sum(m)                DMD normalizer: the mean over the generated frames
    L_DMD, L_critic, L_DCM: sums over m                  (their conditioning-frame terms are 0 anyway)

Choices where rcm_math.md is silent: the clean time is 0 (c_noise = 0), as diffusers' Wan2.2 TI2V pipeline
(``expand_timesteps``); diffusers' Cosmos2 Video2World pipeline feeds sigma_conditioning = 1e-4
(c_noise ~ 1e-4) instead, a difference of that size in one embedding input. F_hat is 0 on conditioning
frames (their state does not change with t), so the teacher's F_T, the JVP tangent dx_t = cos t sin t F_T
and the student's F_theta all vanish there and the consistency target needs only the mask on g. The
Video2World condition-mask input channel (1 on conditioning frames) is ``Conditioning.y`` as diffusers'
pipeline builds it (``condition_mask_channel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ConditionFrames", "condition_mask_channel", "frame_mask", "frame_timestep_fn"]


@dataclass
class ConditionFrames:
    """The clean conditioning frames of a batch (the first ``k`` latent frames)."""

    x0: Tensor
    """[B, C, k, H, W] clean latents of the conditioning frames (float32 or float64, the data's values)."""

    @property
    def k(self) -> int:
        return self.x0.shape[2]

    def check(self, x: Tensor) -> None:
        B, C, k, H, W = self.x0.shape
        if x.ndim != 5 or (x.shape[0], x.shape[1], x.shape[3], x.shape[4]) != (B, C, H, W) or x.shape[2] <= k:
            raise ValueError(
                f"conditioning frames [B, C, k, H, W] = {tuple(self.x0.shape)} do not fit the latent "
                f"{tuple(x.shape)}: need the same B, C, H, W and more than k = {k} frames"
            )

    def keep_clean(self, x_BCFHW: Tensor) -> Tensor:
        """x with its first k frames replaced by the clean frames (bit-equal, in x's dtype)."""
        self.check(x_BCFHW)
        return torch.cat([self.x0.to(x_BCFHW.dtype), x_BCFHW[:, :, self.k :]], dim=2)

    def zero(self, x_BCFHW: Tensor) -> Tensor:
        """x with its first k frames set to 0 (tangents and velocities of the conditioning frames)."""
        return x_BCFHW * frame_mask(x_BCFHW.shape[2], self.k, x_BCFHW)

    def c_noise(self, c_noise_B: Tensor, num_frames: int) -> Tensor:
        """[B] -> [B, F]: the clean time 0 on the conditioning frames, ``c_noise_B`` after (also the tangent)."""
        m_F = torch.arange(num_frames, device=c_noise_B.device) >= self.k
        return c_noise_B[:, None] * m_F.to(c_noise_B.dtype)

    def cat(self, other: ConditionFrames) -> ConditionFrames:
        return ConditionFrames(torch.cat([self.x0, other.x0]))


def frame_mask(num_frames: int, k: int, like: Tensor) -> Tensor:
    """[1, 1, F, 1, 1] generated-frame mask m (0 on the first k frames, 1 after), in like's dtype."""
    m = (torch.arange(num_frames, device=like.device) >= k).to(like.dtype)
    return m.view(1, 1, -1, 1, 1)


def condition_mask_channel(shape_BCFHW, k: int, dtype=torch.float32, device=None) -> Tensor:
    """[B, 1, F, H, W]: 1 on the first k frames, 0 after (Cosmos Video2World's condition-mask input channel,
    diffusers ``Cosmos2VideoToWorldPipeline``'s ``cond_mask``)."""
    B, _, F_, H, W = shape_BCFHW
    m = (torch.arange(F_, device=device) < k).to(dtype)
    return m.view(1, 1, F_, 1, 1).expand(B, 1, F_, H, W).contiguous()


def frame_timestep_fn(net):
    """The network's ``frame_timestep(c_noise_BF, x_shape) -> timestep`` (a time per latent frame in the
    layout the network takes: Cosmos [B, F], Wan2.2 TI2V [B, S]), looking through wrappers via ``.module``."""
    mod = net
    while not hasattr(mod, "frame_timestep"):
        if not hasattr(mod, "module"):
            raise NotImplementedError(
                f"{type(net).__name__} takes no time per latent frame (no frame_timestep): conditioning frames "
                "need a Cosmos-Predict2 or Wan DiT"
            )
        mod = mod.module
    return mod.frame_timestep
