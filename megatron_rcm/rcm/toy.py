"""Tiny velocity networks with the Wan DiT interface, for tests and CPU smoke runs.

Both follow ``trigflow.VelocityNet``: ``net(x_BCFHW, timestep_B, context_BLD, clip_fea_BND=None)``
returns an RF velocity ``eps - x0``, and ``forward_jvp`` pushes tangents forward with
``torch.func.jvp`` (primal with graph, tangent without).

- ``ToyVelocityNet``: a small conv net with time and text conditioning, random weights.
- ``GaussianVelocity``: the exact velocity field of Gaussian data x0 ~ N(mu(context), diag(std^2)),
  so that samplers can be checked against the exact ODE solution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GaussianVelocity", "ToyVelocityNet"]


def _jvp(fn, x: Tensor, t_x: Tensor, timestep: Tensor, t_timestep: Tensor) -> tuple[Tensor, Tensor]:
    v, dv = torch.func.jvp(fn, (x, timestep), (t_x.to(x.dtype), t_timestep.to(timestep.dtype)))
    return v, dv.detach()


class ToyVelocityNet(nn.Module):
    """conv(1x3x3) -> +time/text embedding -> SiLU -> conv(1x1) -> SiLU -> conv(1x3x3), plus a 1x1 skip.

    Args:
        in_channels: channels of the network input (latent + I2V condition channels).
        out_channels: velocity channels (default ``in_channels``).
        context_dim: width D of the text embedding [B, L, D] (mean-pooled over L).
        hidden: hidden width.
        timestep_scale: the network sees timestep / timestep_scale in [0, 1].
        clip_dim: width of the optional CLIP features [B, N, clip_dim].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        context_dim: int = 8,
        hidden: int = 32,
        timestep_scale: float = 1000.0,
        clip_dim: int | None = None,
        num_freqs: int = 4,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.timestep_scale = float(timestep_scale)
        self.register_buffer(
            "freqs", math.pi * torch.arange(1, num_freqs + 1, dtype=torch.float32), persistent=False
        )
        self.conv_in = nn.Conv3d(in_channels, hidden, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.t_embed = nn.Sequential(
            nn.Linear(2 * num_freqs + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.ctx_embed = nn.Linear(context_dim, hidden)
        self.clip_embed = nn.Linear(clip_dim, hidden) if clip_dim else None
        self.mid = nn.Conv3d(hidden, hidden, kernel_size=1)
        self.conv_out = nn.Conv3d(hidden, out_channels, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.skip = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_fea: Tensor | None = None) -> Tensor:
        dtype = self.conv_in.weight.dtype
        s_B1 = (timestep / self.timestep_scale).to(dtype)[:, None]
        ang = s_B1 * self.freqs.to(dtype)
        emb = self.t_embed(torch.cat([s_B1, torch.sin(ang), torch.cos(ang)], dim=1))
        emb = emb + self.ctx_embed(context.to(dtype).mean(dim=1))
        if self.clip_embed is not None and clip_fea is not None:
            emb = emb + self.clip_embed(clip_fea.to(dtype).mean(dim=1))
        h = nn.functional.silu(self.conv_in(x) + emb[:, :, None, None, None])
        h = nn.functional.silu(self.mid(h))
        return self.conv_out(h) + self.skip(x)

    def forward_jvp(self, x, t_x, timestep, t_timestep, context, clip_fea=None) -> tuple[Tensor, Tensor]:
        return _jvp(lambda x_, ts_: self(x_, ts_, context, clip_fea), x, t_x, timestep, t_timestep)


class GaussianVelocity(nn.Module):
    """Exact RF velocity of x0 ~ N(mu, diag(std^2)) per channel, mu = mean + W context.mean(L).

    With x_s = (1 - s) x0 + s eps: m(s) = (1 - s) mu, var(s) = (1 - s)^2 std^2 + s^2 and
        v(x, s) = E[eps - x0 | x_s = x] = -mu + (s - (1 - s) std^2) / var(s) * (x - m(s)).
    The probability-flow ODE keeps z = (x - m(s)) / sqrt(var(s)) constant, which gives the exact
    solution ``exact_x0``. Float64 throughout; it has no parameters.
    """

    def __init__(
        self, mean_C: Tensor, std_C: Tensor, W_CD: Tensor | None = None, timestep_scale: float = 1000.0
    ):
        super().__init__()
        self.register_buffer("mean_C", mean_C.to(torch.float64))
        self.register_buffer("std_C", std_C.to(torch.float64))
        self.register_buffer("W_CD", None if W_CD is None else W_CD.to(torch.float64))
        self.timestep_scale = float(timestep_scale)

    def mu(self, context: Tensor, ndim: int = 5) -> Tensor:
        """[B, C, 1, 1, 1] conditional mean."""
        mu_BC = self.mean_C.expand(context.shape[0], -1)
        if self.W_CD is not None:
            mu_BC = mu_BC + context.to(torch.float64).mean(dim=1) @ self.W_CD.T
        return mu_BC.view(*mu_BC.shape, *([1] * (ndim - 2)))

    def _std(self, ndim: int) -> Tensor:
        return self.std_C.view(1, -1, *([1] * (ndim - 2)))

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_fea: Tensor | None = None) -> Tensor:
        x = x.to(torch.float64)
        s = (timestep.to(torch.float64) / self.timestep_scale).view(-1, *([1] * (x.dim() - 1)))
        mu, sd2 = self.mu(context, x.dim()), self._std(x.dim()) ** 2
        var = (1 - s) ** 2 * sd2 + s**2
        return -mu + (s - (1 - s) * sd2) / var * (x - (1 - s) * mu)

    def forward_jvp(self, x, t_x, timestep, t_timestep, context, clip_fea=None) -> tuple[Tensor, Tensor]:
        return _jvp(lambda x_, ts_: self(x_, ts_, context, clip_fea), x, t_x, timestep, t_timestep)

    def sample_x0(self, shape, context: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw data x0 of ``shape`` [B, C, ...] (float64)."""
        z = torch.randn(*shape, generator=generator, dtype=torch.float64, device=context.device)
        return self.mu(context, len(shape)) + self._std(len(shape)) * z

    def exact_x0(self, x_s: Tensor, s: float, context: Tensor) -> Tensor:
        """Solution at s = 0 of the probability-flow ODE started from x_s at RF time s."""
        x_s = x_s.to(torch.float64)
        mu, sd = self.mu(context, x_s.dim()), self._std(x_s.dim())
        std_s = torch.sqrt((1 - s) ** 2 * sd**2 + s**2)
        return mu + sd * (x_s - (1 - s) * mu) / std_s
