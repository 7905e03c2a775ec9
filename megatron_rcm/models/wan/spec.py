"""Module specs: which linear implementation the DiT blocks are built from, picked once, here.

``get_wan_block_spec("local")`` returns Megatron's local tensor-parallel linears (a LayerNorm before a linear is
a separate module); ``get_wan_block_spec("transformer_engine")`` returns Transformer Engine's, through
Megatron-Core's wrappers extended with a tangent path (``models.te_linears``), and fuses the norm that feeds a
linear with no modulation in between (Wan's norm3 + cross-attention query) into TE's LayerNorm + linear.
TE is imported only here, only when asked for (``models.te_support.import_te``: one clear error without it).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rcm.models.te_support import TRANSFORMER_IMPLS, import_te


@dataclass
class WanLinearSubmodules:
    column_linear: type | ModuleSpec = ColumnParallelLinear
    """Y = X A + b with A split along its output dim (q, k, v, fc1)."""
    row_linear: type | ModuleSpec = RowParallelLinear
    """Y = X A + b with A split along its input dim (attention out proj, fc2)."""
    norm_column_linear: type | ModuleSpec | None = None
    """Y = LN(X; gamma, beta) A + b, the affine LayerNorm fused into a column linear; None: a separate
    ``LayerNorm`` module, then ``column_linear`` (Wan's norm3 + cross-attention query)."""


def get_wan_block_spec(transformer_impl: str = "local") -> WanLinearSubmodules:
    if transformer_impl == "local":
        return WanLinearSubmodules()
    if transformer_impl == "transformer_engine":
        import_te()
        from megatron_rcm.models.te_linears import (
            TEColumnParallelLinear,
            TELayerNormColumnLinearJVP,
            TERowParallelLinear,
        )

        return WanLinearSubmodules(TEColumnParallelLinear, TERowParallelLinear, TELayerNormColumnLinearJVP)
    raise ValueError(f"transformer_impl={transformer_impl!r}: expected one of {', '.join(TRANSFORMER_IMPLS)}")
