"""Memory per GPU of a layout: weights and optimizer state of the four networks, activations, a fixed allowance.

Per GPU, with P_loc = P_blocks / (TP PP) + P_other (the embeddings, time projection and head are replicated
over TP and all counted on the worst pipeline stage):
    teacher   2 P_loc                                      bf16 weights, frozen
    student   2 P_loc + 4 P_loc + 12 P_loc / (DP CP)        bf16 weights, fp32 main grads, fp32 master + 2 AdamW
    critic    the same                                      moments sharded by the distributed optimizer over DP x CP
    EMA       4 P_loc                                       fp32, sharded like the weights (TP, PP) only
    activations  alpha_kind * b * S / (CP TP) * D * (layers / PP) * min(m, PP)     bytes
with alpha_kind (bytes per token, per hidden unit, per layer, per sample) solved from a measured peak
(recompute on) after subtracting the static part; each block that is not recomputed (recompute off: all;
block recompute of N per stage: layers / PP - N) adds the stored tensors that recompute re-creates,
2 (19 D + 2 F_h) bytes per token per layer (an estimate, not calibrated). The reported
memory adds ``CONTEXT_ALLOWANCE_GIB`` for what ``max_memory_allocated`` does not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CONTEXT_ALLOWANCE_GIB", "KINDS", "MemoryModel", "param_counts"]

GIB = 2**30
KINDS = ("warmup", "student", "critic")
CONTEXT_ALLOWANCE_GIB = 3.0
"""CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers and allocator fragmentation: not in
``torch.cuda.max_memory_allocated`` (what bench_step measures), but on the device. An assumption."""
BYTES_WEIGHT_BF16, BYTES_MAIN_GRAD, BYTES_ADAM, BYTES_EMA = 2, 4, 12, 4
"""bf16 weights; fp32 main grads (DDP ``grad_reduce_in_fp32``); fp32 master + exp_avg + exp_avg_sq; fp32 EMA."""


def param_counts(cfg) -> tuple[int, int]:
    """(parameters in the transformer blocks, parameters outside them) of one Wan network of ``cfg``."""
    D, Fh, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    p = math.prod(cfg.patch_size)
    lin = lambda i, o: i * o + o  # noqa: E731  a linear with bias
    self_attn = 4 * lin(D, D) + 2 * D  # q, k, v, o; q/k RMSNorm
    cross_attn = 4 * lin(D, D) + 2 * D + (2 * lin(D, D) + D if cfg.model_type == "i2v" else 0)
    block = 6 * D + self_attn + 2 * D + cross_attn + lin(D, Fh) + lin(Fh, D)  # modulation, norm3 affine
    other = (lin(cfg.in_channels * p, D) + lin(cfg.text_dim, D) + lin(D, D) + lin(cfg.freq_dim, D) + lin(D, D)
             + lin(D, 6 * D) + lin(D, cfg.out_channels * p) + 2 * D)
    if cfg.model_type == "i2v":
        Di = cfg.image_dim
        other += 2 * Di + lin(Di, Di) + lin(Di, D) + 2 * D
    return n * block, other


def _local_params(cfg, layout) -> float:
    blocks, other = param_counts(cfg)
    return blocks / (layout.tp * layout.pp) + other


def static_bytes(cfg, layout) -> float:
    """Weights, grads, optimizer state and EMA on one GPU (the formula in the module docstring)."""
    P = _local_params(cfg, layout)
    trained = BYTES_WEIGHT_BF16 * P + BYTES_MAIN_GRAD * P + BYTES_ADAM * P / (layout.dp * layout.cp)
    return BYTES_WEIGHT_BF16 * P + 2 * trained + BYTES_EMA * P


def _token_layer_units(problem, layout) -> float:
    """b * S / (CP TP) * D * layers / PP * micro-batches in flight: what activations scale with."""
    cfg = problem.wan_cfg
    in_flight = min(layout.num_micro_batches, layout.pp)
    tokens = layout.micro_batch * problem.tokens / (layout.cp * layout.tp)
    return tokens * cfg.hidden_size * cfg.num_layers / layout.pp * in_flight


def _kept_per_unit(cfg, layout) -> float:
    """Bytes per token x hidden unit x layer that the blocks not recomputed keep beyond a recomputed block:
    2 (19 D + 2 F_h) / D per block, times the share of the stage's blocks not recomputed."""
    extra = 2 * (19 * cfg.hidden_size + 2 * cfg.ffn_hidden_size) / cfg.hidden_size
    return extra * (1.0 - layout.recompute_fraction(cfg.num_layers))


@dataclass(frozen=True)
class MemoryModel:
    """Memory per GPU from ``alpha`` (bytes per token x hidden unit x layer x sample, recompute on, per step kind)."""

    alpha: dict

    @classmethod
    def calibrate(cls, problem, layout, peak_gib: dict) -> MemoryModel:
        """Solve alpha_kind from measured peaks (GiB, ``max_memory_allocated``) of a recompute-on run."""
        if not layout.recompute:
            raise ValueError("memory calibration needs a run with model.recompute=true")
        static = static_bytes(problem.wan_cfg, layout)
        units = _token_layer_units(problem, layout)
        kept = _kept_per_unit(problem.wan_cfg, layout)  # 0 when every block is recomputed
        alpha = {}
        for kind, gib in peak_gib.items():
            act = gib * GIB - static
            if act <= 0:
                raise ValueError(f"measured peak of the {kind} step ({gib:.1f} GiB) is below the static memory "
                                 f"({static / GIB:.1f} GiB): the calibration run does not match the model")
            alpha[kind] = act / units - kept
        return cls(alpha)

    def activation_bytes(self, problem, layout, kind: str) -> float:
        return (self.alpha[kind] + _kept_per_unit(problem.wan_cfg, layout)) * _token_layer_units(problem, layout)

    def peak_gib(self, problem, layout, kind: str) -> float:
        """Predicted ``max_memory_allocated`` of a step of ``kind`` (GiB), without the allowance."""
        return (static_bytes(problem.wan_cfg, layout) + self.activation_bytes(problem, layout, kind)) / GIB

    def per_gpu_gib(self, problem, layout) -> float:
        """Device memory the layout needs: the largest step kind's peak plus the allowance."""
        return max(self.peak_gib(problem, layout, k) for k in self.alpha) + CONTEXT_ALLOWANCE_GIB
