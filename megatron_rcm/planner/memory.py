"""Memory per GPU of a layout: weights and optimizer state of the four networks, activations, a fixed allowance.

Per GPU, with P_loc = P_blocks / (TP PP) + P_other (the embeddings, time projection and head are replicated
over TP and all counted on the worst pipeline stage):
    teacher   2 P_loc                                      bf16 weights, frozen
    student   2 P_loc + 4 P_loc + 12 P_loc / (DP CP)        bf16 weights, fp32 main grads, fp32 master + 2 AdamW
    critic    the same                                      moments sharded by the distributed optimizer over DP x CP
    (student and critic: less the 8 P_loc / (DP CP) AdamW moments until that network's first optimizer step,
    since AdamW allocates them lazily: the critic's do not exist during the tangent warm-up)
    EMA       4 P_loc                                       fp32, sharded like the weights (TP, PP) only
    activations  alpha_kind * b * S / (CP TP) * D * (layers / PP) * min(m, PP)     bytes
with alpha_kind (bytes per token, per hidden unit, per layer, per sample) solved from a measured peak
(recompute on) after subtracting the static part; each block that is not recomputed (recompute off: all;
block recompute of N per stage: layers / PP - N) adds the stored tensors that recompute re-creates,
2 (19 D + 2 F_h) bytes per token per layer (an estimate, not calibrated), and each block under selective
recompute its kept q, k, v, o (``SELECTIVE_KEPT``: 8 bytes per token x hidden unit per graph). The reported
memory adds ``CONTEXT_ALLOWANCE_GIB`` for what ``max_memory_allocated`` does not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CONTEXT_ALLOWANCE_GIB", "KINDS", "MemoryModel", "SELECTIVE_KEPT", "stepped_in_run", "param_counts"]

GIB = 2**30
KINDS = ("warmup", "student", "critic")
CONTEXT_ALLOWANCE_GIB = 3.0
"""CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers and allocator fragmentation: not in
``torch.cuda.max_memory_allocated`` (what bench_step measures), but on the device. An assumption."""
BYTES_WEIGHT_BF16, BYTES_MAIN_GRAD, BYTES_ADAM, BYTES_EMA = 2, 4, 12, 4
"""bf16 weights; fp32 main grads (DDP ``grad_reduce_in_fp32``); fp32 master + exp_avg + exp_avg_sq; fp32 EMA."""
BYTES_ADAM_MOMENTS = 8
"""exp_avg + exp_avg_sq (fp32), allocated at an optimizer's first step."""


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


def static_bytes(cfg, layout, stepped=("student", "critic")) -> float:
    """Weights, grads, optimizer state and EMA on one GPU (the formula in the module docstring); ``stepped``:
    the trained networks whose optimizer has stepped (the others' AdamW moments are not allocated yet)."""
    P = _local_params(cfg, layout)
    trained = BYTES_WEIGHT_BF16 * P + BYTES_MAIN_GRAD * P + BYTES_ADAM * P / (layout.dp * layout.cp)
    missing = sum(1 for net in ("student", "critic") if net not in stepped)
    moments = missing * BYTES_ADAM_MOMENTS * P / (layout.dp * layout.cp)
    return BYTES_WEIGHT_BF16 * P + 2 * trained - moments + BYTES_EMA * P


NETWORK_OF_KIND = {"warmup": "student", "student": "student", "critic": "critic"}
"""The network whose optimizer a step of each kind updates."""


def stepped_in_training(kind: str) -> tuple[str, ...]:
    """Networks with AdamW moments during a step of ``kind`` in a training run: only the student in the tangent
    warm-up (the critic has not stepped yet), both afterwards."""
    return ("student",) if kind == "warmup" else ("student", "critic")


def stepped_in_run(kinds_in_order) -> dict:
    """The same for a benchmark run that measured ``kinds_in_order`` one after the other, each after untimed
    steps of its own kind (bench_step): a network has moments from the first kind that updates it on."""
    out, seen = {}, []
    for kind in kinds_in_order:
        net = NETWORK_OF_KIND[kind]
        if net not in seen:
            seen.append(net)
        out[kind] = tuple(seen)
    return out


def _token_layer_units(problem, layout) -> float:
    """b * S / (CP TP) * D * layers / PP * micro-batches in flight: what activations scale with."""
    cfg = problem.wan_cfg
    in_flight = min(layout.num_micro_batches, layout.pp)
    tokens = layout.micro_batch * problem.tokens / (layout.cp * layout.tp)
    return tokens * cfg.hidden_size * cfg.num_layers / layout.pp * in_flight


SELECTIVE_KEPT = {"warmup": 10.0, "student": 18.0, "critic": 8.0}
"""Bytes per token x hidden unit x layer that a block under selective recompute keeps beyond full recompute, per
step kind: q, k, v, o (bf16, [S/CP, b, D/TP] each: 8) per graph with grad, + t_o (2) in the JVP pass. The
warm-up step holds the JVP pass's graph (10), the student step that and the DMD generator's (10 + 8), the critic
step one (8) (docs/throughput.md)."""


def _kept_per_unit(cfg, layout, kind: str) -> float:
    """Bytes per token x hidden unit x layer that the blocks keep beyond fully recomputed ones: 2 (19 D + 2 F_h)
    / D per block not recomputed, times the share of the stage's blocks not recomputed; under selective
    recompute also ``SELECTIVE_KEPT[kind]`` times the share recomputed."""
    extra = 2 * (19 * cfg.hidden_size + 2 * cfg.ffn_hidden_size) / cfg.hidden_size
    frac = layout.recompute_fraction(cfg.num_layers)
    selective = SELECTIVE_KEPT[kind] * frac if layout.recompute_granularity == "selective" else 0.0  # frac 0: off
    return extra * (1.0 - frac) + selective


@dataclass(frozen=True)
class MemoryModel:
    """Memory per GPU from ``alpha`` (bytes per token x hidden unit x layer x sample, recompute on, per step kind)."""

    alpha: dict

    @classmethod
    def calibrate(cls, problem, layout, peak_gib: dict, stepped: dict | None = None) -> MemoryModel:
        """Solve alpha_kind from measured peaks (GiB, ``max_memory_allocated``) of a recompute-on run.
        ``stepped``: kind -> the networks with AdamW moments when that peak was measured (``stepped_in_run``
        for a bench_step file; default: as in training)."""
        if not layout.recompute:
            raise ValueError("memory calibration needs a run with model.recompute=true")
        units = _token_layer_units(problem, layout)
        alpha = {}
        for kind, gib in peak_gib.items():
            nets = stepped_in_training(kind) if stepped is None else stepped[kind]
            static = static_bytes(problem.wan_cfg, layout, nets)
            act = gib * GIB - static
            if act <= 0:
                raise ValueError(f"measured peak of the {kind} step ({gib:.1f} GiB) is below the static memory "
                                 f"({static / GIB:.1f} GiB): the calibration run does not match the model")
            alpha[kind] = act / units - _kept_per_unit(problem.wan_cfg, layout, kind)  # 0: full, every block
        return cls(alpha)

    def activation_bytes(self, problem, layout, kind: str) -> float:
        return (self.alpha[kind] + _kept_per_unit(problem.wan_cfg, layout, kind)) * _token_layer_units(problem, layout)

    def peak_gib(self, problem, layout, kind: str, stepped: tuple | None = None) -> float:
        """Predicted ``max_memory_allocated`` of a step of ``kind`` (GiB), without the allowance; the optimizer
        moments as in training, or those of ``stepped`` networks (a benchmark run's conditions)."""
        nets = stepped_in_training(kind) if stepped is None else stepped
        static = static_bytes(problem.wan_cfg, layout, nets)
        return (static + self.activation_bytes(problem, layout, kind)) / GIB

    def per_gpu_gib(self, problem, layout) -> float:
        """Device memory the layout needs: the largest step kind's peak plus the allowance."""
        return max(self.peak_gib(problem, layout, k) for k in self.alpha) + CONTEXT_ALLOWANCE_GIB
