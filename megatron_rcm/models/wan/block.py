"""One Wan2.1 transformer block with its tangent path.

    e = modulation + e0                       (6-way adaLN: shift/scale/gate for attention and FFN)
    x = x + self_attn(LN(x) * (1 + scale_msa) + shift_msa) * gate_msa
    x = x + cross_attn(norm3(x), context)     (affine LayerNorm, no gate; fused into the query linear when
                                               the spec has ``norm_column_linear``: no ``norm3`` module then)
    x = x + ffn(LN(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp,   ffn = fc2(GELU_tanh(fc1(.)))
Activations [s, B, D] (s = this rank's tokens under context and sequence parallelism; ``shard``, a
``TokenShard``, says which under CP); e0 [B, 6, D] in float32, or [s, B, 6, D] with a timestep per token
(Wan2.2 TI2V: this rank's tokens, each with its own modulation). The norm + modulation, gated residual,
RoPE, q/k RMSNorm and GELU chains run through ``ops/elementwise.py`` (``config.fused_elementwise``: the
PyTorch reference or one Triton kernel per chain for primal and tangent), picked here at construction.
The biases of fc1 (into GELU), of the self-attention output and of fc2 (into the gated residuals) reach
those chains un-added (``linear_jvp_split``): with the kernels, no broadcast bias add over the activations.

Selective recompute (``selective``, given by the model for the blocks ``config_fields.selective_block`` picks):
the block runs as three segments, ``pre_attention`` (norm + modulation, q/k/v linears, q/k RMSNorm, RoPE) ->
the self-attention core (the attention op, context-parallel included) -> ``post_attention`` (output linear,
gated residual, cross-attention, FFN, gated residual); the first and last under ``torch.utils.checkpoint``
(non-reentrant), the core outside, so its autograd node keeps q, k, v, o (and the kernel's lse) and the
backward re-runs the two segments but never the attention. Primal and tangent re-run together, as in a
full-block recompute: tangents (computed without grad) pass between the segments as checkpoint outputs and
inputs.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_rcm.models.jvp import add_tangents, compute_dtype, mul_jvp, over_tokens
from megatron_rcm.models.te_support import recompute_context_fn
from megatron_rcm.models.tp_linears import MLP
from megatron_rcm.models.wan.attention import WanCrossAttention, WanSelfAttention
from megatron_rcm.models.wan.layers import LayerNorm, mark_sequence_parallel
from megatron_rcm.ops.elementwise import elementwise_ops


def modulate_jvp(x, t_x, shift, t_shift, scale, t_scale):
    """y = x (1 + scale) + shift with shift/scale [B, D] broadcast over tokens of x [s, B, D], or [s, B, D]
    per token (``over_tokens``)."""
    y, t_y = mul_jvp(x, t_x, 1 + over_tokens(scale), over_tokens(t_scale))
    return y + over_tokens(shift), add_tangents(t_y, over_tokens(t_shift))


class WanBlock(MegatronModule):
    def __init__(self, config, spec, layer_number: int, selective: bool = False):
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
        self.ew = elementwise_ops(config.fused_elementwise)
        self.ffn = MLP(config, spec, self.ew.gelu_tanh, act_takes_bias=True)
        self.selective = selective
        """Selective recompute of this block (the model's choice, ``config_fields.selective_block``)."""

    def _modulation(self, e0, t_e0, cdt):
        """6 x [B, D] (per token: 6 x [s, B, D]) and their tangents: shift/scale/gate for attention, then FFN."""
        e = (self.modulation.to(cdt) + e0.to(cdt)).unbind(-2)
        return e, (t_e0.unbind(-2) if t_e0 is not None else (None,) * 6)

    def forward(self, x, t_x, e0, t_e0, context, context_img, rope_cos, rope_sin, shard=None):
        if self.selective and torch.is_grad_enabled():  # re-run pre and post in the backward, not the core
            segment = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                        context_fn=recompute_context_fn(self.config))
        else:
            segment = _call
        q, k, v, t_q, t_k, t_v = segment(self.pre_attention, x, t_x, e0, t_e0, rope_cos, rope_sin)
        o, t_o = self.self_attn.core(q, k, v, t_q, t_k, t_v, shard)
        return segment(self.post_attention, x, t_x, o, t_o, e0, t_e0, context, context_img)

    def pre_attention(self, x, t_x, e0, t_e0, rope_cos, rope_sin):
        """x [s, B, D] -> q, k, v [S, B, N_tp, d] and their tangents: LN + modulation, linears, RMSNorm, RoPE."""
        e, t_e = self._modulation(e0, t_e0, compute_dtype(x))
        (shift_msa, scale_msa), (t_shift_msa, t_scale_msa) = e[:2], t_e[:2]
        h, t_h = self.ew.modulated_layer_norm(x, t_x, self.norm1.eps, shift_msa, t_shift_msa, scale_msa, t_scale_msa)
        return self.self_attn.qkv(h, t_h, rope_cos, rope_sin)

    def post_attention(self, x, t_x, o, t_o, e0, t_e0, context, context_img):
        """The block input x [s, B, D] and the attention core's o [S, B, N_tp, d] -> the block output [s, B, D]."""
        e, t_e = self._modulation(e0, t_e0, compute_dtype(x))
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = e
        _, _, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp = t_e
        ew = self.ew

        # self-attention output projection and gated residual
        y, t_y, b = self.self_attn.project_out(o, t_o)
        x, t_x = ew.gated_residual(x, t_x, y, t_y, gate_msa, t_gate_msa, bias=b)

        # cross-attention (no gate)
        if self.norm3 is None:  # transformer_engine: norm3 is fused into the query linear (TE LayerNormLinear)
            h, t_h = x, t_x
        else:
            h, t_h = ew.affine_layer_norm(x, t_x, self.norm3.eps, self.norm3.weight, self.norm3.bias)
        y, t_y = self.cross_attn(h, t_h, context, context_img)
        x, t_x = x + y, add_tangents(t_x, t_y)

        # feed-forward
        h, t_h = ew.modulated_layer_norm(x, t_x, self.norm2.eps, shift_mlp, t_shift_mlp, scale_mlp, t_scale_mlp)
        y, t_y, b = self.ffn.forward_split(h, t_h)
        return ew.gated_residual(x, t_x, y, t_y, gate_mlp, t_gate_mlp, bias=b)


def _call(fn, *args):
    """A segment run as it is (no recompute)."""
    return fn(*args)
