"""Module specs: which linear implementation the Wan blocks are built from, picked once, here.

``get_wan_block_spec(use_te=False)`` returns Megatron's local tensor-parallel linears;
``use_te=True`` asks for Transformer Engine's (BF16/FP8) — their tangent path is not written yet, so it
raises instead of silently running a different model.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclass
class WanLinearSubmodules:
    column_linear: type | ModuleSpec = ColumnParallelLinear
    """Y = X A + b with A split along its output dim (q, k, v, fc1)."""
    row_linear: type | ModuleSpec = RowParallelLinear
    """Y = X A + b with A split along its input dim (attention out proj, fc2)."""


def get_wan_block_spec(use_te: bool = False) -> WanLinearSubmodules:
    if use_te:
        raise NotImplementedError(
            "Transformer Engine linears for the Wan DiT need a tangent (JVP) path that is not implemented "
            "yet; build with use_te=False (Megatron local tensor-parallel linears)"
        )
    return WanLinearSubmodules()
