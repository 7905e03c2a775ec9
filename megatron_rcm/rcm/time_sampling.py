"""Training-time distributions over TrigFlow time t (rcm_math.md section 2).

All draws are float64 tensors of shape [B] in (0, pi/2). Random numbers come from the ``generator``
passed in (which must live on ``device``), or from the global RNG when it is None, so that a trainer
that saves and restores its generators resumes bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rcm.rcm.trigflow import rf_to_trig

__all__ = ["TimeDistribution", "lognormal_t", "shift_rf", "uniform_shift_t"]

_S_MIN = 1e-6  # keeps t > 0: the critic loss divides by sin^2 t


def shift_rf(u: Tensor, shift: float) -> Tensor:
    """Timestep shift of RF time (sec. 2): s = k u / (1 + (k - 1) u). k = 1 is the identity."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def lognormal_t(n: Tensor, P_mean: float, P_std: float) -> Tensor:
    """Sec. 2 LogNormal: sigma = exp(P_mean + P_std n), t = atan(sigma), for n ~ N(0, 1)."""
    sigma = torch.exp(P_mean + P_std * n.to(torch.float64))
    return torch.atan(sigma)


def uniform_shift_t(u: Tensor, shift: float) -> Tensor:
    """Sec. 2 UniformShift: s_rf = k u / (1 + (k - 1) u), t = atan(s_rf / (1 - s_rf)), for u ~ U[0, 1)."""
    s = shift_rf(u.to(torch.float64), shift).clamp_min(_S_MIN)
    return rf_to_trig(s)


@dataclass
class TimeDistribution:
    """A time distribution p(t) of sec. 2, as a config value.

    Reference: generator times p_G = LogNormal(0.7, 1.6) (Wan 1.3B) / LogNormal(1.5, 1.6) (14B);
    critic and DMD times p_D = UniformShift(5).
    """

    kind: str = "lognormal"
    """"lognormal" (uses P_mean, P_std) or "uniform_shift" (uses shift)."""
    P_mean: float = 0.7
    """Mean of log sigma for "lognormal"."""
    P_std: float = 1.6
    """Standard deviation of log sigma for "lognormal"."""
    shift: float = 5.0
    """Timestep shift k for "uniform_shift"."""

    def __post_init__(self):
        if self.kind not in ("lognormal", "uniform_shift"):
            raise ValueError(
                f"TimeDistribution.kind must be 'lognormal' or 'uniform_shift', got {self.kind!r}"
            )

    @classmethod
    def lognormal(cls, P_mean: float, P_std: float) -> TimeDistribution:
        return cls(kind="lognormal", P_mean=P_mean, P_std=P_std)

    @classmethod
    def uniform_shift(cls, shift: float) -> TimeDistribution:
        return cls(kind="uniform_shift", shift=shift)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw t_B (float64, [batch_size]): one randn (lognormal) or one rand (uniform_shift) per sample."""
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        if self.kind == "lognormal":
            return lognormal_t(torch.randn(batch_size, **kw), self.P_mean, self.P_std)
        return uniform_shift_t(torch.rand(batch_size, **kw), self.shift)
