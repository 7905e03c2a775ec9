"""One Wan2.1 transformer block with its tangent path.

    e = modulation + e0                       (6-way adaLN: shift/scale/gate for attention and FFN)
    x = x + self_attn(LN(x) * (1 + scale_msa) + shift_msa) * gate_msa
    x = x + cross_attn(norm3(x), context)     (affine LayerNorm, no gate; fused into the query linear when
                                               the spec has ``norm_column_linear``: no ``norm3`` module then)
    x = x + ffn(LN(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp,   ffn = fc2(GELU_tanh(fc1(.)))
Activations [s, B, D] (s = this rank's tokens under context and sequence parallelism; ``shard``, a
``TokenShard``, says which under CP); e0 [B, 6, D] in float32.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_rcm.models.jvp import add_tangents, compute_dtype, gelu_tanh_jvp, mul_jvp
from megatron_rcm.models.tp_linears import MLP
from megatron_rcm.models.wan.attention import WanCrossAttention, WanSelfAttention
from megatron_rcm.models.wan.layers import LayerNorm, mark_sequence_parallel


def modulate_jvp(x, t_x, shift, t_shift, scale, t_scale):
    """y = x (1 + scale) + shift with shift/scale [B, D] broadcast over tokens of x [s, B, D]."""
    y, t_y = mul_jvp(x, t_x, 1 + scale[None], None if t_scale is None else t_scale[None])
    return y + shift[None], add_tangents(t_y, None if t_shift is None else t_shift[None])


class WanBlock(MegatronModule):
    def __init__(self, config, spec, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number  # global, 0-based (checkpoint keys use it under any PP split)
        D = config.hidden_size
        sp = config.sequence_parallel
        self.modulation = nn.Parameter(torch.randn(1, 6, D, dtype=config.params_dtype) / D**0.5)
        if sp:
            mark_sequence_parallel(self)
        self.norm1 = LayerNorm(config, D, affine=False)
        self.self_attn = WanSelfAttention(config, spec)
        # norm3 feeds only the cross-attention query: a spec that fuses norms puts it inside linear_q
        fused = spec.norm_column_linear is not None
        self.norm3 = None if fused else LayerNorm(config, D, affine=True, sequence_parallel=sp)
        self.cross_attn = WanCrossAttention(config, spec, with_image=config.model_type == "i2v")
        self.norm2 = LayerNorm(config, D, affine=False)
        self.ffn = MLP(config, spec, gelu_tanh_jvp)

    def forward(self, x, t_x, e0, t_e0, context, context_img, rope_cos, rope_sin, shard=None):
        dtype, cdt = x.dtype, compute_dtype(x)
        e = (self.modulation.to(cdt) + e0.to(cdt)).unbind(1)  # 6 x [B, D]
        t_e = t_e0.unbind(1) if t_e0 is not None else (None,) * 6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e
        t_shift_msa, t_scale_msa, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp = t_e

        # self-attention
        h, t_h = self.norm1(x, t_x)
        h, t_h = modulate_jvp(h, t_h, shift_msa, t_shift_msa, scale_msa, t_scale_msa)
        y, t_y = self.self_attn(h.to(dtype), _cast(t_h, dtype), rope_cos, rope_sin, shard)
        y, t_y = mul_jvp(y.to(cdt), _cast(t_y, cdt), gate_msa[None], _bcast(t_gate_msa))
        x, t_x = (x.to(cdt) + y).to(dtype), _cast(add_tangents(t_x, t_y), dtype)

        # cross-attention (no gate)
        h, t_h = (x, t_x) if self.norm3 is None else self.norm3(x, t_x)
        y, t_y = self.cross_attn(h.to(dtype), _cast(t_h, dtype), context, context_img)
        x, t_x = x + y, add_tangents(t_x, t_y)

        # feed-forward
        h, t_h = self.norm2(x, t_x)
        h, t_h = modulate_jvp(h, t_h, shift_mlp, t_shift_mlp, scale_mlp, t_scale_mlp)
        y, t_y = self.ffn(h.to(dtype), _cast(t_h, dtype))
        y, t_y = mul_jvp(y.to(cdt), _cast(t_y, cdt), gate_mlp[None], _bcast(t_gate_mlp))
        x, t_x = (x.to(cdt) + y).to(dtype), _cast(add_tangents(t_x, t_y), dtype)
        return x, t_x


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _bcast(t_BD):
    return None if t_BD is None else t_BD[None]
