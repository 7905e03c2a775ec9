"""Transformer Engine linears with a tangent path (imported only when ``transformer_impl='transformer_engine'``).

TE has no forward-mode AD: its layers are autograd functions with a hand-written backward. A linear's tangent
needs none — it is the same GEMM without the bias,

    y = x W^T + b          t_y = t_x W^T          (W: this rank's shard; TP collectives are linear)

Megatron's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` are used as they are: ``models.jvp.linear_jvp``
runs their tangent through their own TE GEMM path under ``no_grad`` (nothing is added to the weight's
gradient), as its own call inside an FP8 autocast region (current scaling measures the tangent's own amax; the
weight is cast by the same recipe).

``TELayerNormColumnLinearJVP`` fuses a LayerNorm into the column linear (Wan's norm3 + cross-attention query).
Its tangent is not the fused LN run on t_x (LN is not linear): ``models.jvp.norm_linear_jvp`` applies the LN
tangent rule with the module's ``layer_norm_weight``, then the GEMM through a plain TE column linear that shares
the fused module's weight parameter.
"""

from __future__ import annotations

import dataclasses

from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TELayerNormColumnParallelLinear,
    TERowParallelLinear,
)

from megatron_rcm.models.jvp import norm_linear_jvp

__all__ = ["TEColumnParallelLinear", "TELayerNormColumnLinearJVP", "TERowParallelLinear"]


class TELayerNormColumnLinearJVP(TELayerNormColumnParallelLinear):
    """Y = LN(X; gamma, beta) A + b (TE's fused LayerNorm + column linear, A split along its output dim) with
    ``forward_jvp``. The tangent GEMM is a ``TEColumnParallelLinear`` sharing ``weight``: kept off the module
    tree (no parameters of its own in the state dict; ``.to()`` / DDP move the shared parameter in place)."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert=False, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         gather_output=gather_output, bias=bias, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, **kwargs)
        gemm = TEColumnParallelLinear(
            input_size, output_size, config=dataclasses.replace(config, perform_initialization=False),
            init_method=init_method, gather_output=False, bias=False, skip_bias_add=True, is_expert=False,
        )
        gemm.weight = self.weight  # one parameter, two GEMM paths (the fused primal, the plain tangent)
        object.__setattr__(self, "_tangent_gemm", gemm)

    def forward_jvp(self, x_SBD, t_x):
        return norm_linear_jvp(self, self._tangent_gemm, x_SBD, t_x)
