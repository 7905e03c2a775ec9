"""TrigFlow view of a rectified-flow (RF) velocity network (rcm_math.md section 1).

Shape legend: B batch, C latent channels, Cy condition channels (I2V), F latent frames, H/W latent
height/width, L text tokens, N CLIP tokens, D embedding width. ``t_B`` is TrigFlow time in [0, pi/2]
(float64); ``s_B`` is RF time in [0, 1].

The RF network predicts ``v = eps - x0`` at ``x_s = (1 - s) x0 + s eps``. With sigma_data = 1 the
TrigFlow state ``x_t = cos t x0 + sin t eps`` is the RF state scaled by ``cos t + sin t``, so

    c_in    = 1 / (cos t + sin t)                  x_in = c_in x_t              (sec. 1)
    c_noise = T_scale * sin t / (cos t + sin t)    (= T_scale * s_rf)
    x0_hat  = c_skip x_t + c_out v,   c_skip = 1 / (cos t + sin t),  c_out = -sin t / (cos t + sin t)
    F_hat   = (cos t x_t - x0_hat) / sin t = c_skip_F x_t + c_out_F v
              c_skip_F = (cos t - sin t) / (cos t + sin t),  c_out_F = 1 / (cos t + sin t)

The second form of F_hat is the first one simplified (cos^2 t + cos t sin t - 1 = sin t (cos t - sin t));
it has no 1/sin t, so it is exact at t = 0. With ``Conditioning.frames`` (Video2World, Wan2.2 TI2V) the
first k latent frames stay clean in the network input, x0_hat and F_hat (``rcm.condition_frames``). All coefficients are evaluated in float64; tensors are
combined in float32 (or float64 when the inputs are float64) and cast to the network's parameter
dtype only at the network input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import per_sample
from megatron_rcm.rcm.condition_frames import ConditionFrames, frame_timestep_fn

__all__ = [
    "Conditioning",
    "Preconditioners",
    "TrigFlowDenoiser",
    "TrigFlowOutput",
    "VelocityNet",
    "guided",
    "preconditioner_tangents",
    "preconditioners",
    "rf_to_trig",
    "trig_to_rf",
]

WAN_TIMESTEP_SCALE = 1000.0
COSMOS_TIMESTEP_SCALE = 1.0
_S_MAX = 1.0 - 1e-6  # sec. 1: clamp s to 1 - 1e-6 before atan(s / (1 - s))


class VelocityNet(Protocol):
    """The network interface the wrapper needs (the Wan DiT in ``megatron_rcm.models.wan`` has it).

    ``__call__(x_BCFHW, timestep_B, context_BLD, clip_fea_BND=None) -> v_BCFHW`` predicts the RF
    velocity ``eps - x0``; ``timestep`` is the raw ``c_noise``. ``forward_jvp`` additionally pushes the
    tangents ``(t_x, t_timestep)`` forward; its primal keeps the autograd graph when grad is enabled,
    its tangent carries none.
    """

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor, clip_fea: Tensor | None = None
    ) -> Tensor: ...

    def forward_jvp(
        self,
        x: Tensor,
        t_x: Tensor,
        timestep: Tensor,
        t_timestep: Tensor,
        context: Tensor,
        clip_fea: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...


# ---------------------------------------------------------------------------------------------------
# Time conversion (sec. 1)
# ---------------------------------------------------------------------------------------------------


def rf_to_trig(s: Tensor) -> Tensor:
    """RF time s -> TrigFlow time t = atan(s / (1 - s)), in float64 (s clamped to 1 - 1e-6)."""
    s = s.to(torch.float64).clamp(0.0, _S_MAX)
    return torch.atan(s / (1.0 - s))


def trig_to_rf(t: Tensor) -> Tensor:
    """TrigFlow time t -> RF time s = sin t / (cos t + sin t), in float64."""
    t = t.to(torch.float64)
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


# ---------------------------------------------------------------------------------------------------
# Preconditioners and their exact time derivatives (float64)
# ---------------------------------------------------------------------------------------------------


class Preconditioners(NamedTuple):
    """Per-sample TrigFlow preconditioners (all float64, shape of ``t``)."""

    c_in: Tensor
    c_noise: Tensor
    c_skip: Tensor
    c_out: Tensor
    c_skip_F: Tensor
    c_out_F: Tensor


def preconditioners(t: Tensor, timestep_scale: float) -> Preconditioners:
    """Sec. 1: c_in, c_noise, c_skip, c_out of x0_hat and the matching c_skip_F, c_out_F of F_hat."""
    t = t.to(torch.float64)
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    D = cos_t + sin_t
    return Preconditioners(
        c_in=1.0 / D,
        c_noise=timestep_scale * sin_t / D,
        c_skip=1.0 / D,
        c_out=-sin_t / D,
        c_skip_F=(cos_t - sin_t) / D,
        c_out_F=1.0 / D,
    )


def preconditioner_tangents(t: Tensor, timestep_scale: float) -> Preconditioners:
    """d/dt of every preconditioner (float64), derived by hand from ``preconditioners``.

    With D = cos t + sin t, D' = cos t - sin t, D'' = -D and D^2 + D'^2 = 2:
        c_in'   = -D'/D^2            c_noise' = T_scale / D^2       (d/dt of sin t / D is 1/D^2)
        c_skip' = -D'/D^2            c_out'   = -1/D^2
        c_skip_F' = (D'' D - D'^2)/D^2 = -2/D^2                      c_out_F' = -D'/D^2
    """
    t = t.to(torch.float64)
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    D, dD = cos_t + sin_t, cos_t - sin_t
    inv_D2 = 1.0 / (D * D)
    return Preconditioners(
        c_in=-dD * inv_D2,
        c_noise=timestep_scale * inv_D2,
        c_skip=-dD * inv_D2,
        c_out=-inv_D2,
        c_skip_F=-2.0 * inv_D2,
        c_out_F=-dD * inv_D2,
    )


# ---------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """What the network is conditioned on, besides x and the time.

    ``neg_context`` is the negative-prompt embedding of the unconditional CFG branch (Wan uses the
    embedding of its default negative prompt); it may have batch size 1 and is then broadcast. The
    unconditional branch keeps ``clip_fea`` and ``y`` (as Wan I2V does).
    """

    context: Tensor
    """[B, L, D] text embedding of the prompt."""
    clip_fea: Tensor | None = None
    """[B, N, D] CLIP image features (Wan I2V), or None."""
    y: Tensor | None = None
    """[B, Cy, F, H, W] condition channels (I2V mask + image latent) concatenated to x along channels
    before the network; they are not scaled by c_in and have zero tangent."""
    neg_context: Tensor | None = None
    """[B or 1, L', D] negative-prompt embedding for the unconditional branch of CFG, or None."""
    frames: ConditionFrames | None = None
    """The clean conditioning frames (the first k latent frames) kept clean through the wrapper, or None."""

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def uncond(self) -> Conditioning:
        """The unconditional branch: the negative-prompt embedding in place of the prompt."""
        if self.neg_context is None:
            raise ValueError(
                "classifier-free guidance needs Conditioning.neg_context (negative-prompt embedding)"
            )
        neg = self.neg_context
        if neg.shape[0] == 1 and self.batch_size > 1:
            neg = neg.expand(self.batch_size, *neg.shape[1:])
        return replace(self, context=neg, neg_context=None)


def _cat_cond(a: Conditioning, b: Conditioning) -> Conditioning | None:
    """Both branches batched in one network call, or None when their shapes differ."""
    if a.context.shape[1:] != b.context.shape[1:]:
        return None
    return Conditioning(
        context=torch.cat([a.context, b.context]),
        clip_fea=None if a.clip_fea is None else torch.cat([a.clip_fea, b.clip_fea]),
        y=None if a.y is None else torch.cat([a.y, b.y]),
        frames=None if a.frames is None else a.frames.cat(b.frames),
    )


def guided(v_cond: Tensor, v_uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance (sec. 3): v_u + w (v_c - v_u). w = 1 is the conditional model.

    x0_hat and F_hat are affine in v with coefficients that do not depend on the branch, so guiding
    v, x0_hat or F_hat gives the same result.
    """
    return v_uncond + w * (v_cond - v_uncond)


# ---------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------


class TrigFlowOutput(NamedTuple):
    x0: Tensor
    """x0_hat, the clean-data prediction [B, C, F, H, W]."""
    F: Tensor
    """F_hat, the TrigFlow velocity [B, C, F, H, W]; x0_hat = cos t x_t - sin t F_hat."""


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _param_dtype(net: torch.nn.Module) -> torch.dtype | None:
    for p in net.parameters():
        return p.dtype
    return None


def _forward_jvp_fn(net):
    """``net.forward_jvp``, looking through wrappers (Megatron/torch DDP, Float16Module) via ``.module``."""
    mod = net
    while not hasattr(mod, "forward_jvp"):
        if not hasattr(mod, "module"):
            raise AttributeError(f"{type(net).__name__} has no forward_jvp (needed for the sCM JVP)")
        mod = mod.module
    return mod.forward_jvp


class TrigFlowDenoiser:
    """A rectified-flow velocity network seen as a TrigFlow denoiser (sec. 1).

    Args:
        net: the RF velocity network (see ``VelocityNet``); may be wrapped by DDP.
        timestep_scale: T_scale of c_noise = s_rf * T_scale (Wan2.1: 1000, Cosmos-Predict2: 1).
        param_dtype: dtype that x (and its tangent) is cast to at the network input; default the
            dtype of the network's first parameter (or of x when the network has none).
        batch_cfg: run the conditional and unconditional CFG branches in one network call when
            their shapes allow (halves the number of calls, doubles the batch).

    The timestep goes to the network in float32 (float64 for a float64 network): c_noise up to 1000
    is too coarse in bf16. The network output is read back in float32/float64.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        timestep_scale: float,
        param_dtype: torch.dtype | None = None,
        batch_cfg: bool = True,
    ):
        self.net = net
        self.timestep_scale = float(timestep_scale)
        self.param_dtype = param_dtype
        self.batch_cfg = batch_cfg

    # -- network calls ------------------------------------------------------------------------------

    def _dtypes(self, x: Tensor) -> tuple[torch.dtype, torch.dtype]:
        p_dtype = self.param_dtype or _param_dtype(self.net) or x.dtype
        return p_dtype, torch.promote_types(p_dtype, torch.float32)

    def _net_input(self, x_in: Tensor, cond: Conditioning, p_dtype: torch.dtype) -> Tensor:
        if cond.y is not None:
            x_in = torch.cat([x_in, cond.y.to(x_in.dtype)], dim=1)
        return x_in.to(p_dtype)

    def _timestep(self, c_noise_B: Tensor, x_in: Tensor, cond: Conditioning) -> Tensor:
        """c_noise as the network takes it: [B], or with conditioning frames a time per frame (0 on them) in
        the network's layout (``frame_timestep``: Cosmos [B, F], Wan2.2 TI2V [B, S])."""
        if cond.frames is None:
            return c_noise_B
        return frame_timestep_fn(self.net)(cond.frames.c_noise(c_noise_B, x_in.shape[2]), tuple(x_in.shape))

    def _call(self, x_in: Tensor, c_noise_B: Tensor, cond: Conditioning) -> Tensor:
        """v = net(x_in, c_noise) for one conditioning branch, in the compute dtype of x_in."""
        p_dtype, ts_dtype = self._dtypes(x_in)
        if cond.frames is not None:
            x_in = cond.frames.keep_clean(x_in)
        timestep = self._timestep(c_noise_B, x_in, cond)
        v = self.net(self._net_input(x_in, cond, p_dtype), timestep.to(ts_dtype), cond.context, cond.clip_fea)
        return v.to(_compute_dtype(x_in))

    def raw_velocity(
        self, x_in: Tensor, c_noise_B: Tensor, cond: Conditioning, guidance: float | None
    ) -> Tensor:
        """The network's RF velocity at network input ``x_in`` and raw time ``c_noise``, CFG-combined.

        ``guidance=None`` evaluates the conditional branch only; a float w returns v_u + w (v_c - v_u)
        with the unconditional branch on ``cond.neg_context``.
        """
        if guidance is None or guidance == 1.0:
            return self._call(x_in, c_noise_B, cond)
        uncond = cond.uncond()
        if guidance == 0.0:
            return self._call(x_in, c_noise_B, uncond)
        both = _cat_cond(cond, uncond) if self.batch_cfg else None
        if both is not None:
            v_c, v_u = self._call(torch.cat([x_in, x_in]), torch.cat([c_noise_B, c_noise_B]), both).chunk(2)
        else:
            v_c, v_u = self._call(x_in, c_noise_B, cond), self._call(x_in, c_noise_B, uncond)
        return guided(v_c, v_u, guidance)

    def velocity(self, x_s: Tensor, s_B: Tensor, cond: Conditioning, guidance: float | None = None) -> Tensor:
        """RF velocity v(x_s, s) = eps - x0 at RF time ``s_B`` (what the teacher's RF samplers step with)."""
        x_s = x_s.to(_compute_dtype(x_s))
        s_B = torch.as_tensor(s_B, dtype=torch.float64, device=x_s.device).expand(x_s.shape[0])
        return self.raw_velocity(x_s, s_B * self.timestep_scale, cond, guidance)

    # -- TrigFlow ------------------------------------------------------------------------------------

    def __call__(
        self, x_t: Tensor, t_B: Tensor, cond: Conditioning, guidance: float | None = None
    ) -> TrigFlowOutput:
        """x0_hat and F_hat at TrigFlow time ``t_B`` (sec. 1), optionally classifier-free guided."""
        x_t = x_t.to(_compute_dtype(x_t))
        t_B = torch.as_tensor(t_B, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        pc = preconditioners(t_B, self.timestep_scale)
        v = self.raw_velocity(per_sample(pc.c_in, x_t) * x_t, pc.c_noise, cond, guidance)
        x0 = per_sample(pc.c_skip, x_t) * x_t + per_sample(pc.c_out, x_t) * v
        F = per_sample(pc.c_skip_F, x_t) * x_t + per_sample(pc.c_out_F, x_t) * v
        if cond.frames is not None:  # clean frames: x0_hat = the data, F_hat = 0 (condition_frames)
            x0, F = cond.frames.keep_clean(x0), cond.frames.zero(F)
        return TrigFlowOutput(x0=x0, F=F)

    def F_jvp(
        self, x_t: Tensor, t_B: Tensor, dx_t: Tensor, dt_B: Tensor, cond: Conditioning
    ) -> tuple[Tensor, Tensor]:
        """(F_hat, dF_hat): F_hat at (x_t, t) and its directional derivative along (dx_t, dt).

        Chain rule through the preconditioners (tangents from ``preconditioner_tangents``):
            dx_in = c_in dx_t + c_in' dt x_t              dc_noise = c_noise' dt
            (v, dv) = net.forward_jvp(x_in, dx_in, c_noise, dc_noise)
            dF = c_skip_F dx_t + c_skip_F' dt x_t + c_out_F dv + c_out_F' dt v
        F keeps the network's autograd graph (when grad is enabled); dF has none. No guidance: the
        JVP is taken through the (conditional) student only.
        """
        cdt = _compute_dtype(x_t)
        x_t, dx_t = x_t.to(cdt), dx_t.to(cdt)
        t_B = torch.as_tensor(t_B, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        dt_B = torch.as_tensor(dt_B, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        pc = preconditioners(t_B, self.timestep_scale)
        dpc = preconditioner_tangents(t_B, self.timestep_scale)

        x_in = per_sample(pc.c_in, x_t) * x_t
        dx_in = per_sample(pc.c_in, x_t) * dx_t + per_sample(dpc.c_in * dt_B, x_t) * x_t
        dc_noise = dpc.c_noise * dt_B

        p_dtype, ts_dtype = self._dtypes(x_t)
        c_noise = pc.c_noise
        if cond.frames is not None:  # clean frames: constant input, time 0 with zero tangent
            x_in, dx_in = cond.frames.keep_clean(x_in), cond.frames.zero(dx_in)
            c_noise, dc_noise = self._timestep(c_noise, x_in, cond), self._timestep(dc_noise, x_in, cond)
        x_net = self._net_input(x_in, cond, p_dtype)
        dx_net = dx_in if cond.y is None else torch.cat([dx_in, torch.zeros_like(cond.y, dtype=cdt)], dim=1)
        v, dv = _forward_jvp_fn(self.net)(
            x_net,
            dx_net.to(p_dtype),
            c_noise.to(ts_dtype),
            dc_noise.to(ts_dtype),
            cond.context,
            cond.clip_fea,
        )
        v, dv = v.to(cdt), dv.detach().to(cdt)

        F = per_sample(pc.c_skip_F, x_t) * x_t + per_sample(pc.c_out_F, x_t) * v
        dF = (
            per_sample(pc.c_skip_F, x_t) * dx_t
            + per_sample(dpc.c_skip_F * dt_B, x_t) * x_t
            + per_sample(pc.c_out_F, x_t) * dv
            + per_sample(dpc.c_out_F * dt_B, x_t) * v.detach()
        )
        if cond.frames is not None:
            F, dF = cond.frames.zero(F), cond.frames.zero(dF)
        return F, dF
