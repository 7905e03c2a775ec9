"""Wan building blocks that are not plain linears: norms, the sinusoidal time embedding, the embedders.

Legend: S = tokens (full sequence), s = tokens on this rank (S / tp under sequence parallelism),
B = batch, D = hidden size, D_tp = D / tp (this rank's heads), L = context tokens.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_rcm.models.jvp import (
    gelu_jvp,
    gelu_tanh_jvp,
    layer_norm_jvp,
    linear_jvp,
    silu_jvp,
)
from megatron_rcm.ops.elementwise import elementwise_ops
from megatron_rcm.parallel.collectives import tp_world_size


def mark_sequence_parallel(module: nn.Module) -> None:
    """Parameters applied to sequence-parallel shards get partial grads per rank; Megatron's
    ``finalize_model_grads`` all-reduces the ones carrying this attribute across the TP group."""
    for p in module.parameters(recurse=False):
        p.sequence_parallel = True


class LayerNorm(MegatronModule):
    """Wan's LayerNorm, computed in float32 (eps 1e-6); affine only for the cross-attention norm."""

    def __init__(self, config, hidden_size: int, affine: bool, sequence_parallel: bool = False, eps=None):
        super().__init__(config)
        self.eps = config.layernorm_epsilon if eps is None else eps
        if affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if sequence_parallel:
                mark_sequence_parallel(self)
        else:
            self.weight = self.bias = None

    def forward(self, x, t_x=None):
        return layer_norm_jvp(x, t_x, self.eps, self.weight, self.bias)


class TPRMSNorm(MegatronModule):
    """RMSNorm over the *whole* hidden size across heads (Wan's q/k norm), with heads sharded over TP.

    y = x * rsqrt(sum_tp(sum x^2) / D + eps) * w. This rank holds x[..., D_tp] and w[D_tp]; the sum of
    squares (and for the tangent, sum x t_x) is all-reduced over the TP group
    (``ops/elementwise.py`` ``rms_norm``: the PyTorch reference or the fused kernel).
    """

    def __init__(self, config, hidden_size: int):
        super().__init__(config)
        tp = tp_world_size()
        self.hidden_size = hidden_size
        self.eps = config.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(hidden_size // tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.ew = elementwise_ops(config.fused_elementwise)  # the reference or the fused kernel, picked here

    def forward(self, x, t_x=None, bias=None):
        """``bias``: the q/k linear's un-added bias (``linear_jvp_split``), normalized as x + bias."""
        return self.ew.rms_norm(x, t_x, self.weight, self.eps, self.hidden_size, bias)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(sd, prefix, {"weight": 0}, sharded_offsets)


def sinusoidal_embedding_jvp(timestep_B, t_timestep_B, dim: int, dtype: torch.dtype):
    """Wan's timestep embedding [cos(t f), sin(t f)], f_i = 10000^(-i / (dim/2)), computed in float32
    (float64 for float64 models); tangent [-f sin(t f), f cos(t f)] * dt. Any leading shape: [B] -> [B, dim],
    per token [s, B] -> [s, B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=timestep_B.device) / half)
    arg = timestep_B.to(dtype)[..., None] * freqs
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if t_timestep_B is None:
        return emb, None
    t_arg = t_timestep_B.to(dtype)[..., None] * freqs
    t_emb = torch.cat([-torch.sin(arg) * t_arg, torch.cos(arg) * t_arg], dim=-1)
    return emb, t_emb


class MLPEmbedder(MegatronModule):
    """linear_1 -> activation -> linear_2 (replicated on every TP rank; small next to the blocks)."""

    _ACTS = {"silu": silu_jvp, "gelu_tanh": gelu_tanh_jvp, "gelu": gelu_jvp}

    def __init__(self, config, in_dim: int, hidden_dim: int, out_dim: int, activation: str):
        super().__init__(config)
        self.linear_1 = nn.Linear(in_dim, hidden_dim, dtype=config.params_dtype)
        self.linear_2 = nn.Linear(hidden_dim, out_dim, dtype=config.params_dtype)
        self.act = self._ACTS[activation]

    def forward(self, x, t_x=None):
        h, t_h = linear_jvp(self.linear_1, x, t_x)
        h, t_h = self.act(h, t_h)
        return linear_jvp(self.linear_2, h, t_h)


class ImageEmbedder(MegatronModule):
    """I2V CLIP-feature projection: LayerNorm -> Linear -> GELU(erf) -> Linear -> LayerNorm (affine, fp32).
    Its norms are torch's default LayerNorm (eps 1e-5) in the Wan release, unlike the blocks' 1e-6."""

    def __init__(self, config):
        super().__init__(config)
        self.norm1 = LayerNorm(config, config.image_dim, affine=True, eps=1e-5)
        self.mlp = MLPEmbedder(config, config.image_dim, config.image_dim, config.hidden_size, "gelu")
        self.norm2 = LayerNorm(config, config.hidden_size, affine=True, eps=1e-5)

    def forward(self, clip_BND):
        h, _ = self.norm1(clip_BND)
        h, _ = self.mlp(h.to(clip_BND.dtype))
        h, _ = self.norm2(h)
        return h.to(clip_BND.dtype)
