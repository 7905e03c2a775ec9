"""Optimizers for the student and the critic, and the linear learning-rate warm-up.

CUDA: Megatron-Core's optimizer (``get_megatron_optimizer``) over the DDP-wrapped model (all its chunks under
the interleaved pipeline schedule): bf16 params,
fp32 master weights, gradient clipping, and with ``parallel.distributed_optimizer`` the ZeRO-1
``DistributedOptimizer``.

CPU: Megatron's optimizers and ``clip_grads`` assert CUDA tensor types, so ``CpuAdamW`` stands in with the
same hyperparameters (torch AdamW, betas, eps, decoupled weight decay 0 for biases and 1-D params as
Megatron's default overrides do, global-norm clipping) over fp32 master copies of the parameters,
reading the fp32 ``main_grad`` buffers of Megatron's DDP. Both expose the same small interface:
``step() -> (ok, grad_norm)``, ``zero_grad()``, ``param_groups``, ``sharded_state_dict(model_sd)`` and
``load_state_dict(state)``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from megatron_rcm.parallel.mcore_compat import dealias_steps, load_states_around_step, materialize_adamw_state

logger = logging.getLogger(__name__)


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Megatron's default: no weight decay for biases and 1-D parameters (norm scales)."""
    return p.ndim == 1 or name.endswith(".bias")


class LinearWarmup:
    """lr(k) = peak * min(1, (k + 1) / warmup_steps) for the k-th optimizer step of one network (0-based);
    weight decay = wd * wd_mult of each param group. ``apply`` before the step, ``step`` after it."""

    def __init__(self, peak_lr: float, warmup_steps: int, weight_decay: float):
        self.peak_lr, self.warmup_steps, self.weight_decay = peak_lr, warmup_steps, weight_decay
        self.num_steps = 0

    def lr(self) -> float:
        if self.warmup_steps <= 0:
            return self.peak_lr
        return self.peak_lr * min(1.0, (self.num_steps + 1) / self.warmup_steps)

    def apply(self, optimizer) -> float:
        lr = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        return lr

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])


class CpuAdamW:
    """fp32 torch AdamW over master copies of a (possibly bf16) model, with global-norm clipping.

    Gradients are read from ``param.main_grad`` (Megatron DDP's fp32 buffers, already reduced over data
    parallel ranks) or ``param.grad``. The global norm sums squares of TP-split params on every TP rank
    and of replicated params on TP rank 0 only (the pipeline stages' copies of the embedders, marked
    ``shared``, on the first stage only), then all-reduces over the model-parallel group.
    """

    def __init__(self, named_params, lr: float, betas, eps: float, weight_decay: float, clip_grad: float):
        self.names, self.params = [], []
        for n, p in named_params:
            if p.requires_grad:
                self.names.append(n)
                self.params.append(p)
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        decay = [m for n, p, m in zip(self.names, self.params, self.master) if not _no_weight_decay(n, p)]
        no_decay = [m for n, p, m in zip(self.names, self.params, self.master) if _no_weight_decay(n, p)]
        groups = [{"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
                  {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                           foreach=False)
        self.clip_grad = clip_grad
        for m in self.master:  # eager state: a fixed checkpoint structure from step 0 on
            self.optimizer.state[m] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(m),
                                       "exp_avg_sq": torch.zeros_like(m)}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.zero_()
        for m in self.master:
            m.grad = None

    def _grads(self) -> list[torch.Tensor | None]:
        out = []
        for p in self.params:
            g = getattr(p, "main_grad", None)
            out.append(p.grad if g is None else g)
        return out

    def grad_norm(self, grads) -> float:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        sq = torch.zeros((), dtype=torch.float64)
        for p, g in zip(self.params, grads):
            if getattr(p, "shared", False):
                continue  # another stage's copy (Megatron's mark, as param_is_not_shared): counted there
            if g is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
                sq += g.double().square().sum()
        if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
            dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
        return float(sq.sqrt())

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        grads = self._grads()
        norm = self.grad_norm(grads)
        if not math.isfinite(norm):
            return False, norm
        coef = min(1.0, self.clip_grad / (norm + 1e-6)) if self.clip_grad > 0 else 1.0  # Megatron's clip rule
        for m, g in zip(self.master, grads):
            m.grad = None if g is None else (g.float() * coef if coef < 1.0 else g.float())
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            if p is not m:
                p.copy_(m)
        return True, norm

    # -- checkpointing: per-parameter tensors sharded like the model's own tensors --------------------
    def sharded_state_dict(self, model_sharded_state_dict: dict, prefix: str, is_loading: bool = False,
                           sharding: str | None = None) -> dict:
        """Per-parameter tensors at any ``sharding`` (the DistributedOptimizer's choice does not apply here)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
        )

        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params)
        missing = [self.names[i] for i in range(len(self.params)) if i not in id_map]
        if missing:
            raise KeyError(f"{prefix}: parameters without a sharded model tensor: {missing[:5]}")
        out = {"step": int(self.optimizer.state[self.master[0]]["step"]) if self.master else 0,
               "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}
        for i, m in enumerate(self.master):
            st = self.optimizer.state[m]
            out[f"p{i}"] = {
                "exp_avg": make_sharded_optimizer_tensor(id_map[i], st["exp_avg"], f"{prefix}.exp_avg"),
                "exp_avg_sq": make_sharded_optimizer_tensor(id_map[i], st["exp_avg_sq"], f"{prefix}.exp_avg_sq"),
                "fp32_param": make_sharded_optimizer_tensor(id_map[i], m, f"{prefix}.fp32_param"),
            }
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, (p, m) in enumerate(zip(self.params, self.master)):
            st = self.optimizer.state[m]
            st["step"] = torch.tensor(float(state["step"]))
            st["exp_avg"].copy_(state[f"p{i}"]["exp_avg"])
            st["exp_avg_sq"].copy_(state[f"p{i}"]["exp_avg_sq"])
            m.copy_(state[f"p{i}"]["fp32_param"])
            if p is not m:
                p.copy_(m)
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update({k: v for k, v in saved.items() if k in ("lr", "weight_decay", "betas", "eps")})


OPTIM_SHARDINGS = ("dp_reshardable", "fully_reshardable")


class MegatronOptimizer:
    """Adapter giving Megatron-Core's optimizer the interface of ``CpuAdamW`` (CUDA only)."""

    def __init__(self, ddp_model, lr: float, betas, eps: float, weight_decay: float, clip_grad: float,
                 params_dtype: torch.dtype, distributed: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=betas[0],
            adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad, bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16, params_dtype=params_dtype,
            use_distributed_optimizer=distributed, decoupled_weight_decay=True,
        )
        from megatron_rcm.parallel.pipeline import chunk_list

        self.optimizer = get_megatron_optimizer(cfg, chunk_list(ddp_model))  # all model chunks' parameters
        for opt in self._megatron_optimizers():
            if hasattr(opt, "_set_main_param_and_optimizer_states"):
                load_states_around_step(opt)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _megatron_optimizers(self) -> list:
        """The (Distributed)Optimizers inside a ChainedOptimizer, or the one optimizer."""
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def _inner_torch_optimizers(self) -> list:
        return [opt.optimizer for opt in self._megatron_optimizers()]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        ok, norm, _ = self.optimizer.step()
        return bool(ok), float("nan") if norm is None else float(norm)

    def sharded_state_dict(self, model_sharded_state_dict: dict, prefix: str, is_loading: bool = False,
                           sharding: str = "dp_reshardable") -> dict:
        # ``sharding`` (Megatron's distrib_optim_sharding_type): "dp_reshardable" writes each rank's buffer
        # shards as they are (no gather, no copy: Megatron-LM's default) and resumes at another DP x CP size
        # only; "fully_reshardable" gathers every buffer on DP rank 0 into per-parameter tensors (keys derive
        # from the model's "student." / "critic." keys) and resumes at any layout, at the cost of that gather.
        # (megatron-core 0.16 refuses the flattened-range tensors of "fully_sharded_model_space".)
        if sharding not in OPTIM_SHARDINGS:
            raise ValueError(f"optimizer checkpoint sharding {sharding!r}: expected one of {OPTIM_SHARDINGS}")
        # Loading too: Megatron builds the load template from state_dict(), which asserts one common step and
        # so fails on a fresh optimizer; step-0 zero state is what the checkpoint then overwrites.
        for inner in self._inner_torch_optimizers():  # megatron-core workaround (1), parallel/mcore_compat.py
            materialize_adamw_state(inner)
        metadata = {"distrib_optim_sharding_type": sharding, "chained_optim_avoid_prefix": True}
        inner_sd = self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                     metadata=metadata)
        if sharding == "dp_reshardable":
            # its keys name the optimizer's DP group ("optimizer.distributed.dp_group_idx_0...") and not the
            # model, so the student's and the critic's optimizers would share them: prefix them with ours
            from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

            add_prefix_for_sharding(inner_sd, f"{prefix}.")
        out = {prefix: inner_sd}
        for inner in self._inner_torch_optimizers():
            dealias_steps(inner)
        return out

    def load_state_dict(self, state: dict) -> None:
        (inner,) = state.values()
        self.optimizer.load_state_dict(inner)
        for opt in self._inner_torch_optimizers():
            dealias_steps(opt)


def build_optimizer(ddp_model, lr: float, ocfg, params_dtype: torch.dtype, distributed: bool, name: str):
    """Megatron's optimizer on CUDA, ``CpuAdamW`` on CPU (logged)."""
    betas = (ocfg.beta1, ocfg.beta2)
    if torch.cuda.is_available():
        return MegatronOptimizer(ddp_model, lr, betas, ocfg.eps, ocfg.weight_decay, ocfg.clip_grad, params_dtype,
                                 distributed)
    logger.warning("%s optimizer: CPU run, Megatron's (Distributed)Optimizer needs CUDA; using the fp32 torch "
                   "AdamW fallback with the same hyperparameters (betas %s, wd %s, clip %s)", name, betas,
                   ocfg.weight_decay, ocfg.clip_grad)
    module = getattr(ddp_model, "module", ddp_model)
    return CpuAdamW(module.named_parameters(), lr, betas, ocfg.eps, ocfg.weight_decay, ocfg.clip_grad)
