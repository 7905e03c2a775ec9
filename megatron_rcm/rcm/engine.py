"""The distillation engine: one object computing every algorithm's losses, selected by config.

Shape legend: B batch, C/F/H/W latent channels/frames/height/width, L text tokens, D text width.

Per training step the trainer calls::

    if engine.is_student_step(step):
        loss, logs = engine.student_loss(student, critic, teacher, batch, step, generator)
        loss.backward(); student_optimizer.step(); ema.update(student)
    else:
        loss, logs = engine.critic_loss(student, critic, batch, step, generator)
        loss.backward(); critic_optimizer.step()

Algorithms (``DistillConfig.algorithm``) and the terms of their student loss:

    rcm     L_sCM (JVP) + L_DMD (from step tangent_warmup on), critic steps interleaved   (sec. 3-5)
    scm     L_sCM (JVP), no critic                                                       (sec. 3)
    dmd     L_DMD, critic steps interleaved (optionally fixed rollout times)             (sec. 4-6)
    dcm     discrete-time CM with a teacher Euler step on a shifted 48-step grid          (sec. 6)
    scm_fd  L_sCM with dF by finite difference instead of a JVP                          (sec. 6)

Random numbers: every draw comes from ``generator`` (or the global RNG when None), in a fixed order,
so restoring the generator state resumes exactly. Order in ``student_loss``: the consistency term
(scm / scm_fd: t ~ p_G, eps; dcm: k ~ U{1..N}, eps), then the DMD term (rollout: eps_0, then
(t_i, eps_i) for i = 1..n-1; then t_D ~ p_D, eps_D). ``critic_loss``: rollout, then t_D, eps_D.
Under context parallelism every rank must pass a generator in the same state (same t and eps).

Conditioning frames (``DistillConfig.condition_frames`` = k > 0: Cosmos-Predict2 Video2World, Wan2.2 TI2V):
the first k latent frames of ``batch.x0`` are given, kept clean in the student's, teacher's and critic's
inputs and outputs, in the rollout and in few-step sampling, and every loss is taken over the generated
frames only (``rcm.condition_frames`` holds the math). k = 0 is the unconditioned engine, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from megatron_rcm.rcm.batch import add_noise
from megatron_rcm.rcm.condition_frames import ConditionFrames, condition_mask_channel, frame_mask
from megatron_rcm.rcm.dcm import dcm_grid, dcm_loss, teacher_euler_step
from megatron_rcm.rcm.dmd import critic_loss as fake_score_loss
from megatron_rcm.rcm.dmd import dmd_loss, draw_rollout, rollout_steps, student_rollout
from megatron_rcm.rcm.samplers import student_sample
from megatron_rcm.rcm.schedule import StudentCriticSchedule
from megatron_rcm.rcm.scm import (
    TANGENT_WARMUP_FORMS,
    finite_difference_dF,
    scm_loss,
    scm_tangents,
    scm_target,
    tangent_warmup_ratio,
)
from megatron_rcm.rcm.time_sampling import TimeDistribution
from megatron_rcm.rcm.trigflow import Conditioning, TrigFlowDenoiser

__all__ = ["ALGORITHMS", "DistillBatch", "DistillConfig", "RCMEngine"]

ALGORITHMS = ("rcm", "scm", "dmd", "dcm", "scm_fd")


@dataclass
class DistillConfig:
    """Hyperparameters of the distillation losses (rcm_math.md); defaults are the Wan2.1 1.3B reference."""

    algorithm: str = "rcm"
    """One of "rcm", "scm", "dmd", "dcm", "scm_fd" (see the module docstring)."""
    timestep_scale: float = 1000.0
    """T_scale of c_noise = s_rf * T_scale: 1000 for Wan2.1, 1 for Cosmos-Predict2 (sec. 1)."""
    guidance: float | None = 5.0
    """CFG scale w of the teacher, F_T = F_u + w (F_c - F_u) (sec. 3); None: conditional teacher only."""
    scm_loss_scale: float = 100.0
    """Scale of L_sCM (and of L_sCM by finite difference) (sec. 3); 0 skips the term."""
    dmd_loss_scale: float = 1.0
    """Scale of L_DMD (sec. 4); lambda = dmd_loss_scale / scm_loss_scale = 0.01 in the paper."""
    critic_loss_scale: float = 1.0
    """Scale of the critic (fake-score) loss (sec. 5)."""
    dcm_loss_scale: float = 1.0
    """Scale of the discrete-time CM loss (sec. 6)."""
    tangent_warmup: int = 1000
    """Steps of the sCM tangent warm-up r = min(1, step / tangent_warmup); 0 means r = 1. In rCM these
    steps are all student steps without the DMD term (the critic has not been trained yet)."""
    tangent_warmup_form: str = "release"
    """Where r enters the sCM target g during the warm-up (``rcm.scm``): "release" (default; rcm_math.md
    sec. 3 and the authors' release) g = ... - (r cos t sin t x_t + dF); "paper" (sCM Sec. 4.2)
    g = ... - r (cos t sin t x_t + dF). Identical once r = 1."""
    student_update_freq: int = 5
    """With a critic, one student step every this many steps after the warm-up (5: 1.3B, 10: 14B)."""
    N_max: int = 4
    """Maximum number of student steps of the DMD/critic rollout; n = (count mod N_max) + 1 (sec. 4)."""
    rollout_times: tuple[float, ...] | None = None
    """Fixed intermediate rollout times (e.g. (1.5, 1.4, 1.0)) instead of draws from p_D (sec. 6)."""
    student_time: TimeDistribution = field(default_factory=lambda: TimeDistribution.lognormal(0.7, 1.6))
    """p_G, times of the consistency (sCM) term: LogNormal(0.7, 1.6) for 1.3B, (1.5, 1.6) for 14B."""
    critic_time: TimeDistribution = field(default_factory=lambda: TimeDistribution.uniform_shift(5.0))
    """p_D, times of the rollout, of the DMD term and of the critic: UniformShift(5)."""
    g_norm_eps: float = 0.1
    """c of the per-sample normalization g / (||g||_2 + c) (sec. 3)."""
    dmd_weight_min: float = 1e-5
    """Lower clip of the DMD normalizer mean(|G - x_real|) (sec. 4)."""
    fd_h: float = 1e-4
    """Step h of the finite-difference sCM (algorithm "scm_fd") (sec. 6)."""
    dcm_num_steps: int = 48
    """Number of intervals of the discrete-time CM grid (sec. 6)."""
    dcm_shift: float = 5.0
    """Timestep shift of the discrete-time CM grid (sec. 6)."""
    sigma_max: float = 80.0
    """Few-step sampling starts at t = atan(sigma_max): 80 for 1.3B, 200 for 14B (sec. 8)."""
    mid_t: tuple[float, ...] = (1.5, 1.4, 1.0)
    """Intermediate times of few-step sampling, mid_t[:n-1] for n steps (sec. 8)."""
    batch_cfg: bool = True
    """Evaluate the teacher's conditional and unconditional branches in one network call."""
    condition_frames: int = 0
    """k: the first k latent frames of every sample are given and stay clean (``rcm.condition_frames``):
    Cosmos-Predict2 Video2World (e.g. 1 or 2), Wan2.2 TI2V (1). 0: none (text-to-video/image)."""
    condition_mask_channel: bool = False
    """Feed the network the condition-mask channel (1 on the conditioning frames) as ``Conditioning.y``
    (Cosmos Video2World, whose ``in_channels`` count it); needs ``condition_frames`` > 0."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.tangent_warmup_form not in TANGENT_WARMUP_FORMS:
            raise ValueError(
                f"tangent_warmup_form must be one of {TANGENT_WARMUP_FORMS}, got {self.tangent_warmup_form!r}"
            )
        if isinstance(self.student_time, dict):
            self.student_time = TimeDistribution(**self.student_time)
        if isinstance(self.critic_time, dict):
            self.critic_time = TimeDistribution(**self.critic_time)
        if self.rollout_times is not None:
            self.rollout_times = tuple(float(t) for t in self.rollout_times)
            if len(self.rollout_times) < self.N_max - 1:
                raise ValueError(f"rollout_times needs N_max - 1 = {self.N_max - 1} entries")
        self.mid_t = tuple(float(t) for t in self.mid_t)
        if self.condition_frames < 0 or (self.condition_mask_channel and self.condition_frames == 0):
            raise ValueError(
                f"condition_frames={self.condition_frames} must be >= 0, and > 0 with condition_mask_channel"
            )
        if self.N_max < 1 or self.dcm_num_steps < 1 or self.tangent_warmup < 0:
            raise ValueError("N_max and dcm_num_steps must be >= 1 and tangent_warmup >= 0")

    @classmethod
    def wan_1p3b(cls, **overrides: Any) -> DistillConfig:
        """Reference rCM hyperparameters for Wan2.1 T2V 1.3B (sec. 2, 5, 7, 8)."""
        return cls(**overrides)

    @classmethod
    def wan_14b(cls, **overrides: Any) -> DistillConfig:
        """Reference rCM hyperparameters for Wan2.1 T2V 14B (sec. 2, 5, 8)."""
        kw = dict(student_time=TimeDistribution.lognormal(1.5, 1.6), student_update_freq=10, sigma_max=200.0)
        return cls(**{**kw, **overrides})

    @property
    def has_critic(self) -> bool:
        """Whether the algorithm trains a fake-score critic (rcm, dmd)."""
        return self.algorithm in ("rcm", "dmd")

    @property
    def consistency(self) -> str | None:
        """The consistency term of the student loss: "scm", "scm_fd", "dcm" or None."""
        return {"rcm": "scm", "scm": "scm", "dmd": None, "dcm": "dcm", "scm_fd": "scm_fd"}[self.algorithm]

    @property
    def dmd_start(self) -> int:
        """First step with the DMD term: after the tangent warm-up in rCM, from step 0 in pure DMD."""
        return self.tangent_warmup if self.algorithm == "rcm" else 0

    def schedule(self) -> StudentCriticSchedule:
        return StudentCriticSchedule(
            has_critic=self.has_critic, warmup=self.dmd_start, student_update_freq=self.student_update_freq
        )


@dataclass
class DistillBatch:
    """One training batch."""

    x0: Tensor
    """[B, C, F, H, W] clean latents (real or teacher-generated); DMD/critic only use their shape."""
    cond: Conditioning
    """Prompt embedding (+ negative prompt for CFG, + I2V condition)."""


def _as_denoiser(net, cfg: DistillConfig) -> TrigFlowDenoiser | None:
    if net is None or isinstance(net, TrigFlowDenoiser):
        return net
    return TrigFlowDenoiser(net, cfg.timestep_scale, batch_cfg=cfg.batch_cfg)


class RCMEngine:
    """Losses of one distillation algorithm (``DistillConfig.algorithm``) for a given step.

    ``student``, ``critic`` and ``teacher`` are RF velocity networks (``trigflow.VelocityNet``,
    possibly DDP-wrapped) or ``TrigFlowDenoiser`` wrappers of them. The student needs ``forward_jvp``
    for rcm/scm. The engine keeps no state between steps: everything derives from ``step``.
    Returned losses are float32 scalars ready for ``backward()``; logs are detached 0-d tensors
    (call ``.item()`` when printing; that synchronizes the device).
    """

    def __init__(self, config: DistillConfig):
        self.config = config
        self.schedule = config.schedule()

    # -- schedule ------------------------------------------------------------------------------------

    def is_student_step(self, step: int) -> bool:
        """True: update the student with ``student_loss``; False: the critic with ``critic_loss``."""
        return self.schedule.is_student_step(step)

    @property
    def has_critic(self) -> bool:
        """Whether the trainer must build a critic (fake score, initialized from the teacher) and its optimizer."""
        return self.config.has_critic

    # -- conditioning frames -------------------------------------------------------------------------

    def with_condition_frames(self, cond: Conditioning, x0: Tensor) -> Conditioning:
        """``cond`` with the first ``condition_frames`` frames of ``x0`` [B, C, F, H, W] as its clean frames
        (and, with ``condition_mask_channel``, the mask channel as ``y``); unchanged when k = 0."""
        k = self.config.condition_frames
        if k == 0:
            return cond
        if x0.ndim != 5 or x0.shape[2] <= k:
            raise ValueError(
                f"distill.condition_frames={k} needs latents [B, C, F > {k}, H, W], got shape {tuple(x0.shape)}"
            )
        cond = replace(cond, frames=ConditionFrames(x0[:, :, :k]))
        if self.config.condition_mask_channel:
            if cond.y is not None:
                raise ValueError("condition_mask_channel: Conditioning.y is already set (the I2V condition)")
            cond = replace(cond, y=condition_mask_channel(x0.shape, k, x0.dtype, x0.device))
        return cond

    def _mask(self, x: Tensor) -> Tensor | None:
        """The generated-frame mask [1, 1, F, 1, 1] (None without conditioning frames)."""
        k = self.config.condition_frames
        return None if k == 0 else frame_mask(x.shape[2], k, x)

    # -- student -------------------------------------------------------------------------------------

    def student_loss_terms(
        self,
        student,
        critic,
        teacher,
        batch: DistillBatch,
        step: int,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({term name: scaled float64 loss with graph}, logs). For a trainer that back-propagates each
        term separately to free its activations early; ``student_loss`` sums them."""
        cfg = self.config
        student, critic, teacher = (_as_denoiser(n, cfg) for n in (student, critic, teacher))
        x0 = batch.x0.to(torch.promote_types(batch.x0.dtype, torch.float32))
        cond = self.with_condition_frames(batch.cond, x0)
        terms: dict[str, Tensor] = {}
        logs: dict[str, Tensor] = {}
        kind = cfg.consistency
        if kind in ("scm", "scm_fd") and cfg.scm_loss_scale != 0:
            terms["scm"] = self._scm_term(student, teacher, x0, cond, step, generator, kind == "scm_fd", logs)
        elif kind == "dcm":
            terms["dcm"] = self._dcm_term(student, teacher, x0, cond, generator, logs)
        if cfg.has_critic and step >= cfg.dmd_start and cfg.dmd_loss_scale != 0:
            terms["dmd"] = self._dmd_term(student, critic, teacher, x0, cond, step, generator, logs)
        for name, value in terms.items():
            logs[f"loss/{name}"] = value.detach()
        return terms, logs

    def student_loss(
        self,
        student,
        critic,
        teacher,
        batch: DistillBatch,
        step: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(student loss, logs) of a student step; logs hold "loss/<term>", "loss/student" and per-term
        diagnostics ("scm/g_norm", "scm/nonfinite", "scm/warmup_ratio", "dmd/nonfinite",
        "dmd/weight", "dmd/rollout_steps", "dcm/nonfinite")."""
        terms, logs = self.student_loss_terms(student, critic, teacher, batch, step, generator)
        if not terms:  # e.g. every active term has scale 0: a configuration error, not a zero loss
            raise ValueError(f"no student loss term is active at step {step} for {self.config.algorithm!r}")
        loss = sum(terms.values()).float()
        logs["loss/student"] = loss.detach()
        return loss, logs

    def _scm_term(self, student, teacher, x0, cond, step, generator, use_fd, logs) -> Tensor:
        """Sec. 3: one student pass gives F_theta (with graph), F_sg and dF."""
        cfg = self.config
        B = x0.shape[0]
        t_B = cfg.student_time.sample(B, generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = add_noise(x0, eps, t_B)
        with torch.no_grad():
            F_T = teacher(x_t, t_B, cond, cfg.guidance).F
        if use_fd:
            F_theta = student(x_t, t_B, cond).F
            dF = finite_difference_dF(
                lambda x, t: student(x, t, cond).F, x_t, t_B, F_theta.detach(), F_T, cfg.fd_h
            )
        else:
            dx_t, dt_B = scm_tangents(t_B, F_T)
            F_theta, dF = student.F_jvp(x_t, t_B, dx_t, dt_B, cond)
        r = tangent_warmup_ratio(step, cfg.tangent_warmup)
        g = scm_target(x_t, t_B, F_theta.detach(), F_T, dF, r, cfg.tangent_warmup_form)
        out = scm_loss(F_theta, g, cfg.scm_loss_scale, cfg.g_norm_eps, self._mask(x0))
        logs["scm/g_norm"] = out.g_norm
        logs["scm/nonfinite"] = out.num_nonfinite
        logs["scm/warmup_ratio"] = torch.tensor(r)
        return out.loss

    def _dcm_term(self, student, teacher, x0, cond, generator, logs) -> Tensor:
        """Sec. 6: target = sg(student) after one guided teacher Euler step on the shifted grid."""
        cfg = self.config
        B = x0.shape[0]
        grid = dcm_grid(cfg.dcm_num_steps, cfg.dcm_shift, device=x0.device)
        k_B = torch.randint(1, cfg.dcm_num_steps + 1, (B,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t_B, t_prev_B = grid[k_B], grid[k_B - 1]
        x_t = add_noise(x0, eps, t_B)
        with torch.no_grad():
            x_prev = teacher_euler_step(teacher, x_t, t_B, t_prev_B, cond, cfg.guidance)
            target = student(x_prev, t_prev_B, cond).x0
        loss, nonfinite = dcm_loss(student(x_t, t_B, cond).x0, target, cfg.dcm_loss_scale)
        logs["dcm/nonfinite"] = nonfinite
        return loss

    def _rollout(self, student, x0, cond, count, generator, grad_last) -> tuple[Tensor, int]:
        cfg = self.config
        n = rollout_steps(count, cfg.N_max)
        ro = draw_rollout(n, x0.shape, cfg.critic_time, cfg.rollout_times, generator, x0.device, x0.dtype)
        return student_rollout(student, ro, cond, grad_last=grad_last), n

    def _noised_for_critic(self, G, generator) -> tuple[Tensor, Tensor]:
        t_D = self.config.critic_time.sample(G.shape[0], generator=generator, device=G.device)
        eps = torch.randn(G.shape, generator=generator, device=G.device, dtype=G.dtype)
        return add_noise(G.detach(), eps, t_D), t_D

    def _dmd_term(self, student, critic, teacher, x0, cond, step, generator, logs) -> Tensor:
        """Sec. 4: rollout G (last step with graph), x_D, critic and guided teacher under no grad."""
        cfg = self.config
        if critic is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} needs a critic (fake-score) network")
        G, n = self._rollout(student, x0, cond, self.schedule.num_student_steps(step), generator, True)
        x_D, t_D = self._noised_for_critic(G, generator)
        with torch.no_grad():
            x_fake = critic(x_D, t_D, cond).x0
            x_real = teacher(x_D, t_D, cond, cfg.guidance).x0
        out = dmd_loss(G, x_fake, x_real, cfg.dmd_loss_scale, cfg.dmd_weight_min, self._mask(G))
        logs["dmd/nonfinite"] = out.num_nonfinite
        logs["dmd/weight"] = out.weight
        logs["dmd/rollout_steps"] = torch.tensor(n)
        return out.loss

    # -- critic --------------------------------------------------------------------------------------

    def critic_loss(
        self, student, critic, batch: DistillBatch, step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(critic loss, logs) of a critic step (sec. 5): "loss/critic", "critic/nonfinite",
        "critic/rollout_steps"."""
        cfg = self.config
        if not cfg.has_critic:
            raise ValueError(f"algorithm {cfg.algorithm!r} has no critic")
        student, critic = _as_denoiser(student, cfg), _as_denoiser(critic, cfg)
        x0 = batch.x0.to(torch.promote_types(batch.x0.dtype, torch.float32))
        cond = self.with_condition_frames(batch.cond, x0)
        with torch.no_grad():
            G, n = self._rollout(student, x0, cond, self.schedule.num_critic_steps(step), generator, False)
        x_D, t_D = self._noised_for_critic(G, generator)
        loss, nonfinite = fake_score_loss(
            G, critic(x_D, t_D, cond).x0, t_D, cfg.critic_loss_scale, self._mask(G)
        )
        loss = loss.float()
        return loss, {
            "loss/critic": loss.detach(),
            "critic/nonfinite": nonfinite,
            "critic/rollout_steps": torch.tensor(n),
        }

    # -- sampling ------------------------------------------------------------------------------------

    def sample(
        self,
        student,
        noise: Tensor,
        cond: Conditioning,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Few-step student samples with the configured sigma_max and mid_t (sec. 8). With
        ``condition_frames`` k > 0, ``cond`` carries the given frames (``with_condition_frames``), which the
        samples keep bit for bit."""
        cfg = self.config
        if cfg.condition_frames and (cond.frames is None or cond.frames.k != cfg.condition_frames):
            raise ValueError(
                f"distill.condition_frames={cfg.condition_frames}: sampling needs the given frames in cond "
                "(RCMEngine.with_condition_frames(cond, latents))"
            )
        return student_sample(
            _as_denoiser(student, cfg), noise, cond, num_steps, cfg.sigma_max, cfg.mid_t, generator
        )
