"""A pipeline stage model seen by the rCM engine as a whole velocity network (``forward``/``forward_jvp``).

Legend: B samples of one network call, m micro-batches (``parallel.pipeline_microbatches``), b = B / m.

Every call runs Megatron-Core's schedule (``parallel/pipeline_schedule.py``) over the m micro-batches of b
samples. The engine itself is unchanged and runs on every pipeline rank with the same generator state, so
it needs each network's full output on every rank:

* **Forward-only** (teacher CFG forward, DMD/critic rollouts, the critic and teacher in the DMD term,
  sampling; any call under ``no_grad`` or of a frozen network): the schedule runs forward-only, the last
  stage concatenates the micro-batch outputs (v [B, C, F, H, W], and t_v in the JVP pass) and broadcasts
  them over the pipeline group.
* **Calls that carry the gradient** (the student's JVP pass, the DMD rollout's last step, the critic's
  forward in a critic step): the output is returned as a leaf that requires grad and the call is recorded.
  Once the engine's loss L (computed from the full outputs, identical on every stage) is back-propagated,
  ``backward_pending`` replays each recorded call through the 1F1B schedule with the last stage's loss
  ``<v, dL/dv>`` per micro-batch, whose parameter gradient is exactly ``dL/dv . dv/dtheta``
  (the chain rule; Megatron scales each micro-batch's loss by CP / m, ``forward_step_calc_loss`` in
  ``megatron/core/pipeline_parallel/schedules.py``, so the replayed loss is multiplied by m / CP).
  Exact because no recorded output feeds another recorded call with a graph (the engine detaches the
  inputs: x_t, the rollout's earlier steps, x_D from sg(G)) and the tangent carries no gradient. The replay
  recomputes the forward (as full activation recompute would), primal alone: the primal of a JVP pass
  does not depend on its tangent, so the JVP pass's t_v (stacked with the primal at the stage boundaries)
  is computed once, forward-only.

With ``parallel.virtual_pipeline`` V > 1 the module is this rank's V model chunks (``ModelChunks``) and every
call runs Megatron's interleaved schedule over them (m must then be a multiple of PP); the last chunk of the
last stage (the head) computes the loss, the rest is unchanged.

Under context parallelism (PP x CP) each CP rank runs the same engine on the same sample; the stage
boundaries carry this CP rank's token shard ([2,] s, b, D with s = S_pad / CP, S_pad the sequence padded as
``parallel/context.py: token_shard`` pads it) and the last stage's head gathers the whole output over the CP
group. Megatron's schedule multiplies each loss by CP, expecting a loss over this rank's tokens, which DDP's
average over the DP x CP ranks then undoes; here the caller's loss is already the whole sample's and already
scaled for that average (the trainer backpropagates L x CP, as at PP=1), so the replay divides by CP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from megatron_rcm.parallel.context import cp_world_size
from megatron_rcm.parallel.pipeline import boundary_seq_length
from megatron_rcm.parallel.pipeline_schedule import run_schedule

__all__ = ["PipelinedNet"]


def _unwrapped(model):
    """The stage model (or model chunk) inside DDP-style wrappers (``.module``)."""
    while not hasattr(model, "forward_jvp"):
        model = model.module
    return model


def _split(t, m):
    return [None] * m if t is None else list(t.chunk(m))


class PipelinedNet(nn.Module):
    """See the module docstring. ``module`` is the stage model (possibly DDP-wrapped), or under the interleaved
    schedule this rank's ``ModelChunks`` (each chunk possibly DDP-wrapped)."""

    def __init__(self, module: nn.Module, num_microbatches: int):
        super().__init__()
        self.module = module
        self.num_microbatches = num_microbatches
        self._pending: list = []

    def forward(self, x_BCFHW, timestep_B, context_BLD, clip_fea_BND=None):
        return self.forward_jvp(x_BCFHW, None, timestep_B, None, context_BLD, clip_fea_BND)[0]

    def forward_jvp(self, x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND=None):
        B, m = x_BCFHW.shape[0], self.num_microbatches
        if B % m:
            raise ValueError(
                f"a network call of {B} samples does not split into parallel.pipeline_microbatches = {m} "
                "micro-batches; choose a number that divides the batch (CFG calls double it)"
            )
        with_tangent = t_x_BCFHW is not None or t_timestep_B is not None
        if with_tangent:
            t_x_BCFHW = torch.zeros_like(x_BCFHW) if t_x_BCFHW is None else t_x_BCFHW
            t_timestep_B = torch.zeros_like(timestep_B, dtype=torch.float32) if t_timestep_B is None else t_timestep_B
        args = (x_BCFHW, t_x_BCFHW, timestep_B, t_timestep_B, context_BLD, clip_fea_BND)
        mbs = list(zip(*(_split(a, m) for a in args), strict=True))
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters())
        with torch.no_grad():
            v, t_v = self._forward_only(mbs, x_BCFHW, with_tangent)
        if needs_grad:
            v = v.requires_grad_(True)
            self._pending.append((mbs, x_BCFHW, with_tangent, v))
        return v, t_v

    # ------------------------------------------------------------------------------------------------
    def _schedule(self, mbs, x_BCFHW, with_tangent, forward_only, loss_of):
        cfg = self.module.config
        _, _, F, H, W = x_BCFHW.shape
        pt, ph, pw = cfg.patch_size

        def step(mb, model):  # model: the stage model, or under the interleaved schedule the chunk to run
            stage = _unwrapped(model)
            out = stage.forward_jvp(*mb)
            if not stage.post_process:
                return out[0], None
            return out, lambda vt: loss_of(mb, vt)

        return run_schedule(
            self.module, step, mbs, seq_length=boundary_seq_length((F // pt) * (H // ph) * (W // pw), cfg),
            micro_batch_size=x_BCFHW.shape[0] // len(mbs), with_tangent=with_tangent, forward_only=forward_only,
        )

    def _forward_only(self, mbs, x_BCFHW, with_tangent):
        cfg = self.module.config
        zero = torch.zeros((), device=x_BCFHW.device)
        reduced = self._schedule(mbs, x_BCFHW, with_tangent, True, lambda mb, vt: (zero, vt))
        B, _, F, H, W = x_BCFHW.shape
        shape, dtype = (B, cfg.out_channels, F, H, W), cfg.params_dtype
        if parallel_state.is_pipeline_last_stage():
            v = torch.cat([vt[0] for vt in reduced]).to(dtype)
            t_v = torch.cat([vt[1] for vt in reduced]).to(dtype) if with_tangent else None
        else:
            v = torch.empty(shape, dtype=dtype, device=x_BCFHW.device)
            t_v = torch.empty(shape, dtype=dtype, device=x_BCFHW.device) if with_tangent else None
        src, group = parallel_state.get_pipeline_model_parallel_last_rank(), parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(v, src=src, group=group)
        if with_tangent:
            dist.broadcast(t_v, src=src, group=group)
        return v, t_v

    def backward_pending(self) -> None:
        """Replay each recorded call with the gradient its output received (module docstring)."""
        pending, self._pending = self._pending, []
        for mbs, x_BCFHW, _, v in pending:
            if v.grad is None:
                continue
            m, cp = len(mbs), cp_world_size()
            grads = list(v.grad.chunk(m))
            # primal alone: the primal does not depend on the tangent, which dL/dv already accounts for
            primal = [(x, None, ts, None, ctx, clip) for x, _, ts, _, ctx, clip in mbs]
            index = {id(mb): i for i, mb in enumerate(primal)}

            def loss_of(mb, vt, grads=grads, index=index, m=m, cp=cp):
                g = grads[index[id(mb)]]
                # Megatron scales each micro-batch's loss by CP / m; v.grad already holds the caller's scaling
                return (vt[0].float() * g.float()).sum() * (m / cp), {}

            self._schedule(primal, x_BCFHW, False, False, loss_of)
