"""The distillation trainer: Megatron DDP student + critic, frozen teacher, the rCM engine's losses.

One ``train_step``:
    net = student if engine.is_student_step(step) else critic
    for each of grad_accumulation_steps micro-batches: loss / accum -> backward (fp32 main_grad buffers)
    finalize_model_grads (DP all-reduce, sequence-parallel norm grads) -> optimizer step (clip, AdamW)
    student steps also update the power EMA.

Parallelism (docs/parallelism.md): world = TP x CP x PP x DP, validated before anything is built. The process
groups come from ``megatron_rcm.parallel.state``; batches are split over the pure data-parallel ranks by
the data source (the CP and TP ranks of one replica read the same sample); the engine's generator is
seeded per DP rank (so CP/TP ranks of one DP replica draw the same t and eps). Under context parallelism
the model shards the token sequence inside and returns the full latent, so the engine's losses are the
CP=1 numbers on every CP rank; each CP rank's gradients hold its tokens' share, and Megatron's DDP
averages them over the data-parallel-with-context group (DP x CP ranks): the loss is multiplied by CP
before the backward, as Megatron's GPT does, so that the average is the DP mean of the full gradient.
Under pipeline parallelism each network is this rank's stage, seen by the engine through ``PipelinedNet``
(``training/pipelined_net.py``: Megatron's schedules, whole outputs on every stage); after the backward of
the engine's loss, the gradient-carrying calls are replayed through the 1F1B schedule. With
``parallel.virtual_pipeline`` V > 1 each network is this rank's V model chunks (``ModelChunks``: DDP per chunk,
one optimizer and one EMA over all chunks, ``finalize_model_grads`` over the chunk list), run through
Megatron's interleaved schedule.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rcm.config.loader import to_dict
from megatron_rcm.config.preflight import preflight
from megatron_rcm.config.schema import ConfigError, ExperimentConfig
from megatron_rcm.data import build_data_source
from megatron_rcm.parallel.pipeline import ModelChunks, chunk_list, interleaved_config_fields
from megatron_rcm.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_optim_layout,
    check_resume_config,
    optim_sharding_of,
)
from megatron_rcm.training.ckpt_layout import data_position_at, saved_dp_size
from megatron_rcm.training.logger import MetricLogger, peak_memory_gib
from megatron_rcm.training.models import (
    DTYPES,
    build_model,
    build_net,
    build_wan_config,
    check_condition_frames,
    check_timestep_scale,
    is_cosmos_preset,
    load_weights,
    strip_prefix,
)
from megatron_rcm.training.optim import LinearWarmup, build_optimizer
from megatron_rcm.training.phases import PhaseTimers
from megatron_rcm.training.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("megatron_rcm.train")


class Trainer:
    """Build everything from an ``ExperimentConfig`` and run (or resume) the distillation."""

    def __init__(self, cfg: ExperimentConfig, teacher=None):
        from megatron_rcm.parallel.state import initialize_parallel
        from megatron_rcm.rcm import PowerEMA, RCMEngine

        self.cfg = cfg
        preflight(cfg, check_teacher=teacher is None)  # data.path, negative prompt, teacher: before any network
        pcfg = cfg.parallel
        self._check_layout(cfg)
        if cfg.training.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("training.device='cuda' but no CUDA device is available")
        if cfg.training.device == "cpu" and torch.cuda.is_available():
            raise ConfigError("training.device='cpu' on a CUDA machine is not supported (Megatron-Core's CUDA "
                              "paths are active); use training.device=auto")
        initialize_parallel(pcfg.tensor_parallel, pcfg.pipeline_parallel, pcfg.context_parallel,
                            seed=cfg.training.seed,
                            hierarchical_context_parallel_sizes=pcfg.hierarchical_context_parallel_sizes,
                            virtual_pipeline=pcfg.virtual_pipeline)
        from megatron.core import parallel_state as ps

        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_size = ps.get_context_parallel_world_size()
        self.use_megatron_optimizer = torch.cuda.is_available()
        if self.device.type == "cpu":
            # AdamW's second moments of tiny gradients become denormal floats, which x86 CPUs process
            # ~100x slower (steps slowed from 0.1 s to 4 s in the quickstart); flush them to zero.
            torch.set_flush_denormal(True)
        self.engine = RCMEngine(cfg.distill)
        self.timers = PhaseTimers(enabled=False)  # the step benchmark turns them on (tools/bench_step.py)
        self.accum = cfg.optimizer.grad_accumulation_steps

        # -- resume point: found intact and checked against this config before any network is built ---
        ckpt_dir = cfg.checkpoint.dir
        self.ckpt = CheckpointManager(ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save) if ckpt_dir \
            else None
        resume_path = self.ckpt.resolve_resume(cfg.checkpoint.resume) if self.ckpt is not None else None
        self.optim_sharding = "fully_reshardable" if cfg.checkpoint.optim_fully_reshardable else "dp_reshardable"
        if resume_path is not None:
            check_resume_config(resume_path, to_dict(cfg), self.rank)
            if self.use_megatron_optimizer and pcfg.distributed_optimizer:
                check_optim_layout(resume_path, to_dict(cfg))

        # -- networks -------------------------------------------------------------------------------
        self.wan_cfg = build_wan_config(cfg.model, cfg.data, cp_comm_type=pcfg.cp_comm_type,
                                        hierarchical_cp_sizes=pcfg.hierarchical_context_parallel_sizes,
                                        cp_a2a_head_groups=pcfg.cp_a2a_head_groups)
        self.pp_size = pcfg.pipeline_parallel
        if self.pp_size > 1:
            self.wan_cfg.pipeline_dtype = DTYPES[cfg.model.params_dtype]  # what the stages send each other
            self.wan_cfg.has_cond_embedder = True  # finalize_model_grads sums the replicated embedders' grads
            for k, v in interleaved_config_fields(self.pp_size, pcfg.virtual_pipeline).items():  # V > 1 only
                setattr(self.wan_cfg, k, v)
        check_timestep_scale(cfg.model, cfg.distill)
        check_condition_frames(cfg.model, cfg.distill, cfg.data)
        if self.wan_cfg.fp8 and self.pp_size > 1:
            raise NotImplementedError("model.fp8 with parallel.pipeline_parallel > 1: the FP8 autocast around "
                                      "each pipelined network call is not implemented; set model.fp8: null")
        from megatron_rcm.models.te_support import check_fp8_device

        check_fp8_device(self.wan_cfg)  # a GPU that cannot run the recipe: one clear error before building
        self.teacher = teacher if teacher is not None else self._build_teacher()
        self.teacher.requires_grad_(False).eval()
        self.student = self._wrap(self._build_student())
        self.critic = self._wrap(self._copy_of_teacher()) if self.engine.has_critic else None
        self.ema = PowerEMA(self.student.module, std=0.1)

        # -- optimizers -----------------------------------------------------------------------------
        ocfg, dtype = cfg.optimizer, DTYPES[cfg.model.params_dtype]
        self.opt_student = build_optimizer(self.student, ocfg.lr, ocfg, dtype, pcfg.distributed_optimizer, "student")
        self.sched_student = LinearWarmup(ocfg.lr, ocfg.warmup_steps, ocfg.weight_decay)
        self.opt_critic = self.sched_critic = None
        if self.critic is not None:
            self.opt_critic = build_optimizer(self.critic, ocfg.critic_lr, ocfg, dtype, pcfg.distributed_optimizer,
                                              "critic")
            self.sched_critic = LinearWarmup(ocfg.critic_lr, ocfg.warmup_steps, ocfg.weight_decay)

        # -- data, randomness, checkpoints ----------------------------------------------------------
        self.data = build_data_source(cfg.data, cfg.training.seed, self.dp_rank, self.dp_size)
        self.generator = torch.Generator(self.device).manual_seed(cfg.training.seed * 1000 + self.dp_rank)
        self.step = 0
        self.output_dir = Path(cfg.training.output_dir)
        self.resumed_from = None
        self._saved_dp = None  # the data-parallel size of the checkpoint being loaded (load_checkpoint)
        self.saved_step = None  # the step of the newest checkpoint this trainer wrote or resumed from
        if resume_path is not None:
            self.load_checkpoint(resume_path)
            self.resumed_from, self.saved_step = resume_path, self.step
        self.prewarm = self.host_memory_prewarm()
        self._sample_batch = None
        self._pipelined = None

    def host_memory_prewarm(self):
        """``checkpoint.prewarm_host_memory``: a ``PrewarmTrigger`` (training/host_prewarm.py), polled each step
        until the first save; None when off, on CPU, without asynchronous saves, or when the save's data-parallel
        group spreads the writes over several ranks (which tensors a rank writes is decided at save time)."""
        ccfg = self.cfg.checkpoint
        if not (ccfg.prewarm_host_memory and ccfg.async_save and self.ckpt is not None and self.device.type == "cuda"):
            return None
        if self.dp_size * self.cp_size > 1:
            if self.rank == 0:
                logger.warning("checkpoint.prewarm_host_memory: skipped at data x context parallel size %d (each "
                               "rank's share of the fully parallel save is decided at save time)",
                               self.dp_size * self.cp_size)
            return None
        from megatron_rcm.training.host_prewarm import (
            HostMemoryPrewarmer,
            PrewarmTrigger,
            optimizer_state_counts,
        )

        opts = {n: o for n, o in (("student", self.opt_student), ("critic", self.opt_critic)) if o is not None}
        return PrewarmTrigger(HostMemoryPrewarmer(self.device),
                              signature=lambda: {n: optimizer_state_counts(o) for n, o in opts.items()},
                              build=lambda names: self.sharded_state_dict(optimizers=names))

    @staticmethod
    def _check_layout(cfg, world: int | None = None) -> None:
        """world = TP x CP x PP x DP, the CP attention's constraints and the pipeline split (layers divisible by
        PP x V), checked before any network is built; ``world``: the number of ranks (default: the process
        group's, else ``WORLD_SIZE``)."""
        import os

        from megatron_rcm.parallel.context import check_parallel_layout

        pcfg = cfg.parallel
        if world is None:
            world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        from megatron_rcm.parallel.pipeline import check_interleaved_microbatches, check_pipeline_layout

        model_cfg = build_wan_config(cfg.model, cp_a2a_head_groups=pcfg.cp_a2a_head_groups)  # Wan only when > 1
        if pcfg.pipeline_parallel > 1 and is_cosmos_preset(cfg.model.preset):
            raise NotImplementedError(f"model.preset={cfg.model.preset!r}: the Cosmos model has no pipeline "
                                      "stages yet (Wan has); set parallel.pipeline_parallel=1")
        try:
            check_parallel_layout(world, pcfg.tensor_parallel, pcfg.context_parallel, pcfg.pipeline_parallel,
                                  model_cfg.num_attention_heads, pcfg.cp_comm_type,
                                  pcfg.hierarchical_context_parallel_sizes, pcfg.cp_a2a_head_groups)
            check_pipeline_layout(model_cfg.num_layers, pcfg.pipeline_parallel, pcfg.virtual_pipeline)
            # every network call's micro-batches (parallel.pipeline_microbatches) go through the interleaved
            # schedule, which needs a multiple of PP
            check_interleaved_microbatches(pcfg.pipeline_microbatches, pcfg.pipeline_parallel, pcfg.virtual_pipeline)
        except ValueError as err:
            raise ConfigError(f"invalid 'parallel' section: {err}") from err

    # ------------------------------------------------------------------------------------------------
    def _build_teacher(self):
        import dataclasses

        from megatron_rcm.models.config_fields import recompute_fields

        teacher_cfg = dataclasses.replace(self.wan_cfg, **recompute_fields(False))
        model = self._build_net(teacher_cfg)
        if self.cfg.model.teacher_checkpoint:
            load_weights(model, self.cfg.model.teacher_checkpoint, self.cfg.model.preset)
        elif self.rank == 0:
            logger.warning("model.teacher_checkpoint is not set: the teacher has random weights (tests and "
                           "throughput runs only)")
        return model

    def _build_net(self, wan_cfg):
        """One DiT, or for a Wan2.2 A14B preset both experts switched at the boundary (``TwoExpertNet``)."""
        cfg = self.cfg
        return build_net(wan_cfg, cfg.training.seed, cfg.model.preset, cfg.distill.timestep_scale,
                         build=build_model).to(self.device)

    def _build_student(self):
        """A copy of the teacher, or ``model.student_checkpoint``'s weights (the EMA starts from them too)."""
        if not self.cfg.model.student_checkpoint:
            return self._copy_of_teacher()
        model = self._build_net(self.wan_cfg)
        load_weights(model, self.cfg.model.student_checkpoint, self.cfg.model.preset, "model.student_checkpoint")
        return model

    def _copy_of_teacher(self):
        model = self._build_net(self.wan_cfg)
        model.load_state_dict(self.teacher.state_dict())
        return model

    def _wrap(self, module):
        """Megatron's DDP around the network; under the interleaved schedule around each model chunk, as
        Megatron-LM does (bucketing only for the first chunk: ``disable_bucketing`` for the others)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.use_megatron_optimizer and self.cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        if isinstance(module, ModelChunks):
            return ModelChunks([DistributedDataParallel(self.wan_cfg, ddp_cfg, chunk, disable_bucketing=c > 0)
                                for c, chunk in enumerate(module)])
        return DistributedDataParallel(self.wan_cfg, ddp_cfg, module)

    def _engine_nets(self):
        """(student, critic, teacher) as the engine sees them: under PP, each stage model behind a
        ``PipelinedNet`` (Megatron's schedules, whole outputs on every stage)."""
        if self.pp_size == 1:
            if self.wan_cfg.fp8:  # each network call of the step inside TE's FP8 autocast
                from functools import partial

                from megatron_rcm.models.te_support import fp8_autocast
                from megatron_rcm.training.autocast_net import AutocastNet

                ctx = partial(fp8_autocast, self.wan_cfg)
                return tuple(None if n is None else AutocastNet(n, ctx)
                             for n in (self.student, self.critic, self.teacher))
            return self.student, self.critic, self.teacher
        if self._pipelined is None:
            from megatron_rcm.training.pipelined_net import PipelinedNet

            m = self.cfg.parallel.pipeline_microbatches
            self._pipelined = tuple(None if n is None else PipelinedNet(n, m)
                                    for n in (self.student, self.critic, self.teacher))
        return self._pipelined

    def _pp_microbatches(self, batch_size: int) -> int:
        """The micro-batches of a sampling call: ``parallel.pipeline_microbatches`` when they divide the batch,
        else 1 (1F1B); the interleaved schedule needs a multiple of PP, so there it is an error naming both."""
        pcfg = self.cfg.parallel
        m = pcfg.pipeline_microbatches
        if batch_size % m == 0:
            return m
        if pcfg.virtual_pipeline > 1:
            raise ValueError(f"sampling a batch of {batch_size} under the interleaved schedule (virtual_pipeline "
                             f"{pcfg.virtual_pipeline}): parallel.pipeline_microbatches {m} does not divide it, and "
                             f"1 micro-batch is not a multiple of pipeline_parallel {pcfg.pipeline_parallel}; "
                             f"sample a batch divisible by {m}")
        return 1

    # ------------------------------------------------------------------------------------------------
    def _distill_batch(self, batch):
        from megatron_rcm.rcm import Conditioning, DistillBatch

        batch = batch.to(self.device)
        cond = Conditioning(context=batch.context_BLD, clip_fea=batch.clip_fea_BND, y=batch.y_BCFHW,
                            neg_context=batch.neg_context_BLD)
        return DistillBatch(x0=batch.latent_BCFHW, cond=cond), batch

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the student or the critic; returns the step's metrics."""
        from megatron.core.distributed import finalize_model_grads

        t0 = time.perf_counter()
        step = self.step
        is_student = self.engine.is_student_step(step)
        net, opt, sched = ((self.student, self.opt_student, self.sched_student) if is_student
                           else (self.critic, self.opt_critic, self.sched_critic))
        net.zero_grad_buffer()
        opt.zero_grad()
        lr = sched.apply(opt)
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(self.accum):
            with self.timers("data"):
                dbatch, batch = self._distill_batch(self.data.next_batch())
            if self._sample_batch is None:
                self._sample_batch = batch
            tokens += batch.num_tokens(self.wan_cfg.patch_size)
            student, critic, teacher = self._engine_nets()
            if is_student:
                loss, logs = self.engine.student_loss(student, critic, teacher, dbatch, step, self.generator)
            else:
                loss, logs = self.engine.critic_loss(student, critic, dbatch, step, self.generator)
            # x CP: DDP averages over the DP x CP ranks, whose gradients are per-CP-rank shares (module docstring)
            with self.timers("backward"):
                (loss * self.cp_size / self.accum).backward()
                if self.pp_size > 1:  # the recorded calls, replayed through the 1F1B schedule
                    (student if is_student else critic).backward_pending()
            for k, v in logs.items():
                v = float(v)
                if k.endswith("nonfinite"):
                    sums[k] = sums.get(k, 0.0) + v  # counts add up over micro-batches
                else:
                    sums[k] = sums.get(k, 0.0) + v / self.accum
        with self.timers("grad_reduce"):
            finalize_model_grads(chunk_list(net))  # under V > 1: the replicated embedders summed over chunks
        with self.timers("optimizer"):
            ok, grad_norm = opt.step()
        if not ok:
            raise FloatingPointError(f"step {step}: non-finite gradient norm ({grad_norm}) of the "
                                     f"{'student' if is_student else 'critic'}; training stopped")
        sched.step()
        if is_student:
            with self.timers("ema"):
                self.ema.update(self.student.module)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        name = "student" if is_student else "critic"
        metrics = dict(sums)
        metrics.update({
            f"grad_norm/{name}": grad_norm,
            f"lr/{name}": lr,
            "step_time_s": dt,
            "tokens_per_s": tokens * self.dp_size / dt,
            "memory_gib": peak_memory_gib(),
            "is_student_step": float(is_student),
        })
        self.step += 1
        return metrics

    # ------------------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None, on_step=None) -> list[dict[str, float]]:
        """Train until ``max_steps`` (default ``training.max_steps``); returns the metrics of each step run.
        ``on_step(trainer, metrics)`` is called after every step (e.g. to adapt CPU threads)."""
        cfg = self.cfg
        max_steps = cfg.training.max_steps if max_steps is None else max_steps
        log = MetricLogger(self.output_dir, max_steps, self.step, cfg.logging.log_every, cfg.logging.progress_bar,
                           cfg.logging.wandb_mode, cfg.logging.wandb_project, self.output_dir.name, to_dict(cfg),
                           enabled=self.rank == 0)
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} at step {self.step}")
        if not self.use_megatron_optimizer:
            log.info("CPU run: fp32 torch AdamW fallback optimizer (Megatron's optimizers need CUDA), same "
                     "hyperparameters")
        history = []
        try:
            while self.step < max_steps:
                if self.prewarm is not None:  # pinned host memory for the first save, in the background
                    self.prewarm.step()
                metrics = self.train_step()
                history.append(metrics)
                log.log(self.step, metrics)  # 1-based: the console's and the checkpoint's number
                if on_step is not None:
                    on_step(self, metrics)
                every = cfg.logging.sample_every
                if every and self.step % every == 0:  # every rank samples (TP/CP collectives), rank 0 writes
                    path = self.save_samples(self.output_dir / "samples" / f"step_{self.step:08d}.png")
                    log.info(f"samples -> {path}")
                if self.ckpt is not None:
                    self._log_saves(log, self.finalize_checkpoints(blocking=False))  # every rank polls each step
                    if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                        self._save_and_log(log)
            if self.ckpt is not None:
                if self.saved_step != self.step:
                    self._save_and_log(log)
                self._log_saves(log, self.finalize_checkpoints(blocking=True))
        finally:
            log.close()
        return history

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_steps: int, batch=None, use_ema: bool = True, seed: int = 0,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Few-step student samples [B, C, F, H, W] for ``batch`` (default: the first training batch), from
        ``noise`` (default: drawn from ``seed``); intermediate noises come from ``seed``."""
        from megatron_rcm.rcm import Conditioning

        batch = batch if batch is not None else self._sample_batch
        if batch is None:
            batch = self.data.next_batch().to(self.device)  # only before the first step (consumes data)
        g = torch.Generator(self.device).manual_seed(seed)
        if noise is None:
            noise = torch.randn(batch.latent_BCFHW.shape, generator=g, device=self.device)
        cond = Conditioning(context=batch.context_BLD, clip_fea=batch.clip_fea_BND, y=batch.y_BCFHW,
                            neg_context=batch.neg_context_BLD)
        # conditioning frames (distill.condition_frames): the batch's first frames are the given ones
        cond = self.engine.with_condition_frames(cond, batch.latent_BCFHW.to(noise.dtype))
        module = self.student.module
        if self.pp_size > 1:
            from megatron_rcm.training.pipelined_net import PipelinedNet

            stage = module
            module = PipelinedNet(stage, self._pp_microbatches(noise.shape[0]))
            if use_ema:
                with self.ema.swapped_into(stage):
                    return self.engine.sample(module, noise, cond, num_steps, g)
            return self.engine.sample(module, noise, cond, num_steps, g)
        if use_ema:
            with self.ema.swapped_into(module):
                return self.engine.sample(module, noise, cond, num_steps, g)
        return self.engine.sample(module, noise, cond, num_steps, g)

    def save_samples(self, path) -> Path:
        """Collective under TP/CP (every rank runs the student); rank 0 writes the grid."""
        from megatron_rcm.training.samples import save_grid

        n = self.cfg.logging.num_samples
        batch = self._sample_batch
        rows = {"data": batch.latent_BCFHW[:n]}
        for k in self.cfg.logging.sample_steps:
            rows[f"student {k}-step"] = self.sample(k, batch)[:n]
        value_range = (-1.0, 1.0) if self.cfg.data.source in ("digits", "shapes") else None
        if self.rank != 0:
            return Path(path)
        return save_grid(rows, path, value_range=value_range)

    # -- checkpointing ---------------------------------------------------------------------------------
    def sharded_state_dict(self, is_loading: bool = False, optim_sharding: str | None = None,
                           optimizers: tuple[str, ...] = ("student", "critic")) -> dict:
        """``optim_sharding``: how the optimizers' state is (or was) written; default: this run's config.
        ``optimizers``: whose state to include (the host memory warm-up leaves out an optimizer whose moments
        do not exist yet: building its part would materialize them)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        # the TP/CP ranks of one data-parallel replica hold the same generator and data state: one shard per
        # DP rank, the others replicas of it, so a checkpoint resumes at any TP/CP size; a checkpoint of another
        # DP size: every rank reads all its shards (Megatron's load checks that the saved shards are covered) and
        # ``_restore`` uses DP rank 0's
        dp, dp_rank = self.dp_size, self.dp_rank
        replica = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                   ps.get_context_parallel_rank())
        s_sd = self.student.module.sharded_state_dict(prefix="student.")
        sd = {"student": s_sd, "step": self.step, "scheduler_student": self.sched_student.state_dict()}
        sharding = optim_sharding or self.optim_sharding
        if "student" in optimizers:
            sd["optimizer_student"] = self.opt_student.sharded_state_dict(s_sd, "optimizer.student", is_loading,
                                                                          sharding)
        sd["ema"] = {name: make_sharded_optimizer_tensor(s_sd[f"student.{name}"], t, "ema")
                     for name, t in self.ema.shadow.items()}
        sd["ema_meta"] = {"std": self.ema.std, "num_updates": self.ema.num_updates}
        if self.critic is not None:
            c_sd = self.critic.module.sharded_state_dict(prefix="critic.")
            sd["critic"] = c_sd
            if "critic" in optimizers:
                sd["optimizer_critic"] = self.opt_critic.sharded_state_dict(c_sd, "optimizer.critic", is_loading,
                                                                            sharding)
            sd["scheduler_critic"] = self.sched_critic.state_dict()
        # per-replica states
        sd["rng"] = ShardedObject("rng_state", capture_rng_state(self.generator), (dp,), (dp_rank,), replica_id=replica)
        sd["data"] = ShardedObject("data_state", self.data.state_dict(), (dp,), (dp_rank,), replica_id=replica)
        if is_loading and self._saved_dp not in (None, dp):
            for key, name in (("rng", "rng_state"), ("data", "data_state")):
                sd[key] = [ShardedObject(name, None, (self._saved_dp,), (r,), replica_id=replica)
                           for r in range(self._saved_dp)]
        return sd

    def save_checkpoint(self) -> Path:
        """Save (collective); with ``checkpoint.async_save`` the write goes on in the background and
        ``finalize_checkpoints`` publishes it. Returns the checkpoint's path."""
        meta = {"algorithm": self.cfg.distill.algorithm, "world_size": dist.get_world_size(),
                "optim_sharding": self.optim_sharding, "config": to_dict(self.cfg)}
        with self.timers("checkpoint"):
            if self.prewarm is not None:  # a warm-up in flight finishes first (else both would allocate)
                self.prewarm.prewarmer.finish()
            t0 = time.perf_counter()
            sd = self.sharded_state_dict()
            t_sd = time.perf_counter() - t0
            path = self.ckpt.save(self.step, sd, meta)
            self.ckpt.last_save_phases = {"state_dict_s": t_sd, **self.ckpt.last_save_phases}
        self.saved_step = self.step
        return path

    def finalize_checkpoints(self, blocking: bool = False) -> list:
        """Collective: publish the background save if every rank's write is done (``blocking``: wait for it);
        the ``SaveResult`` of each save finalized since the last call."""
        return self.ckpt.finalize(blocking) if self.ckpt is not None else []

    def _save_and_log(self, log) -> None:
        path = self.save_checkpoint()
        if self.ckpt.pending_step is not None:
            log.info(f"checkpoint {path.name}: writing in the background (training stalled "
                     f"{self.ckpt.last_save_seconds:.2f} s)")
        self._log_saves(log, self.finalize_checkpoints(blocking=False))

    @staticmethod
    def _log_saves(log, results) -> None:
        for r in results:
            log.info(f"checkpoint -> {r.path} ({r.nbytes / 1e9:.3f} GB, finalized {r.total_s:.2f} s after the save "
                     f"began, {r.write_gb_per_s:.2f} GB/s; training stalled {r.stall_s:.2f} s)")

    def load_checkpoint(self, path) -> None:
        """Restore everything from ``path``; any failure is a ``CheckpointError`` naming ``path``. A checkpoint
        of another data-parallel size restores the networks, optimizers, schedulers, EMA and step, and the data
        position of the whole data-parallel group (``data_position_at``); the noise generators are per DP rank,
        so they start afresh (a warning says so): such a resume is not an exact continuation."""
        saved_sharding = optim_sharding_of(path)
        self._saved_dp = saved_dp_size(path)
        loaded = self.ckpt.load(self.sharded_state_dict(is_loading=True, optim_sharding=saved_sharding), path)
        try:
            self._restore(loaded, path)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"resuming from checkpoint {path} failed: {type(err).__name__}: {err}") from err

    def _restore(self, loaded: dict, path) -> None:
        self.student.module.load_state_dict(strip_prefix(loaded["student"], "student."), strict=True)
        self.opt_student.load_state_dict(loaded["optimizer_student"])
        self.sched_student.load_state_dict(loaded["scheduler_student"])
        self.ema.load_state_dict({**loaded["ema_meta"], "shadow": loaded["ema"]})
        if self.critic is not None:
            if "critic" not in loaded:
                raise KeyError(f"{path} has no critic but distill.algorithm={self.cfg.distill.algorithm!r} needs one")
            self.critic.module.load_state_dict(strip_prefix(loaded["critic"], "critic."), strict=True)
            self.opt_critic.load_state_dict(loaded["optimizer_critic"])
            self.sched_critic.load_state_dict(loaded["scheduler_critic"])
        if self._saved_dp in (None, self.dp_size):
            restore_rng_state(loaded["rng"], self.generator)
            self.data.load_state_dict(loaded["data"])
        else:
            self.data.load_state_dict(data_position_at(loaded["data"][0], self.dp_size, self.dp_rank))
            if self.rank == 0:
                logger.warning("resuming %s (data-parallel size %d) at data-parallel size %d: the weights, "
                               "optimizers, EMA, step and data position are restored; the random generators "
                               "start afresh, so the run does not continue exactly", path, self._saved_dp,
                               self.dp_size)
        self.step = int(loaded["step"])

    def close(self) -> None:
        """Collective when a checkpoint is in flight: waits for it to be finalized."""
        if self.prewarm is not None:
            self.prewarm.prewarmer.finish()
        if self.ckpt is not None:
            self.ckpt.close()
        self.data.close()
