"""Wan2.2 A14B: two expert DiTs switched by time, seen as one velocity network.

Shape legend: B batch, C/F/H/W latent channels/frames/height/width, L text tokens, D text width.

The Wan team's sampler (``wan/text2video.py``) and diffusers' ``WanPipeline`` pick the expert per step by
the raw timestep: the high-noise expert (diffusers ``transformer``, original ``high_noise_model``) when
``timestep >= boundary_ratio * num_train_timesteps``, the low-noise one (``transformer_2`` /
``low_noise_model``) below. The raw timestep is this framework's ``c_noise = T_scale * s_rf`` (rcm_math.md
sec. 1, T_scale = 1000 for Wan), so the switch is

    high  <=>  c_noise >= boundary_ratio * T_scale  <=>  s_rf >= boundary_ratio
          <=>  t >= t_b = atan(boundary_ratio / (1 - boundary_ratio))       (TrigFlow time, sec. 1)

t_b = atan(7) = 1.42890 for T2V-A14B (ratio 0.875) and atan(9) = 1.46014 for I2V-A14B (ratio 0.9). The
comparison is made on the c_noise the network receives (float32 from ``TrigFlowDenoiser``), as the Wan
sampler compares its timestep; ``boundary_t`` is the TrigFlow form for documentation and tests.

Each sample of a batch goes to its own expert (a batch may straddle the boundary: the rCM engine draws one
time per sample); the tangent path routes the same way, so ``forward_jvp`` is each expert's own JVP.
Parameters: ``high.*`` and ``low.*`` (checkpoint keys ``<prefix>high.`` / ``<prefix>low.``).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

__all__ = ["TwoExpertNet", "boundary_t"]


def boundary_t(boundary_ratio: float) -> float:
    """The switch in TrigFlow time: t_b = atan(s_b / (1 - s_b)) with s_b = boundary_ratio (sec. 1)."""
    return math.atan(boundary_ratio / (1.0 - boundary_ratio))


class TwoExpertNet(MegatronModule):
    """``high`` for timesteps >= ``boundary_ratio * timestep_scale``, ``low`` below (module docstring).

    Args:
        high, low: two velocity networks of one architecture (``WanModel``).
        boundary_ratio: the model's boundary in RF time (``WAN22_BOUNDARY``: 0.875 T2V, 0.9 I2V).
        timestep_scale: T_scale of the c_noise the networks are fed (1000 for Wan).
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary_ratio: float,
                 timestep_scale: float = 1000.0):
        super().__init__(config=high.config)
        if not 0.0 < boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio}")
        self.high, self.low = high, low
        self.boundary_ratio = float(boundary_ratio)
        self.timestep_scale = float(timestep_scale)

    @property
    def boundary_timestep(self) -> float:
        """The switch in the networks' raw timestep (c_noise): boundary_ratio * T_scale."""
        return self.boundary_ratio * self.timestep_scale

    def uses_high(self, timestep_B: Tensor) -> Tensor:
        """[B] bool: which samples the high-noise expert serves."""
        return timestep_B >= self.boundary_timestep

    def set_input_tensor(self, input_tensor) -> None:
        raise NotImplementedError("TwoExpertNet has no pipeline stages (run the Wan2.2 experts at PP=1)")

    def forward(self, x_BCFHW, timestep_B, context_BLD, clip_fea_BND=None):
        return self.forward_jvp(x_BCFHW, None, timestep_B, None, context_BLD, clip_fea_BND)[0]

    def forward_jvp(self, x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND=None):
        """(v, t_v) with each sample through its expert; tangents as in ``WanModel.forward_jvp``."""
        high_B = self.uses_high(timestep_B)
        if bool(high_B.all()):
            return self.high.forward_jvp(x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND)
        if not bool(high_B.any()):
            return self.low.forward_jvp(x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND)
        outs, order = [], []
        for expert, mask in ((self.high, high_B), (self.low, ~high_B)):
            idx = mask.nonzero().squeeze(1)
            pick = (lambda a, i=idx: None if a is None else a.index_select(0, i))
            outs.append(expert.forward_jvp(pick(x_BCFHW), pick(t_x_BCFHW), pick(timestep_B), pick(t_timestep_B),
                                           pick(context_BLD), pick(clip_fea_BND)))
            order.append(idx)
        back = torch.argsort(torch.cat(order))  # concatenated (high, low) rows -> the batch order
        v = torch.cat([o[0] for o in outs])[back]
        t_v = None if outs[0][1] is None else torch.cat([o[1] for o in outs])[back]
        return v, t_v
