"""One Cosmos-Predict2 transformer block with its tangent path (diffusers ``CosmosTransformerBlock``).

    x = x + pos                                              (learnable absolute embedding, if any)
    for sub in (self_attn, cross_attn, mlp):                 (three AdaLN-LoRA-modulated residuals)
        shift, scale, gate = adaln_sub(emb) + temb           (AdaLN-LoRA: D -> K -> 3 D, plus the shared base)
        x = x + gate * sub(LN(x) * (1 + scale) + shift)
    mlp = fc2(GELU(fc1(.)))                                  (exact erf GELU, no biases)
Activations [s, B, D] (s = this rank's tokens under context and sequence parallelism; ``shard``, a
``TokenShard``, says which under CP); emb [B, D], temb [B, 3 D], or with a timestep per latent frame
emb [F, B, D], temb [F, B, 3 D] and ``frame_of_token`` [s] (the modulation of each token is its frame's;
``AdaLNLoRA``).
"""

from __future__ import annotations

from megatron.core.transformer.module import MegatronModule

from megatron_rcm.models.cosmos.attention import CosmosAttention
from megatron_rcm.models.cosmos.layers import AdaLNLoRA
from megatron_rcm.models.jvp import add_tangents, compute_dtype, gelu_jvp, mul_jvp, over_tokens
from megatron_rcm.models.tp_linears import MLP
from megatron_rcm.models.wan.block import modulate_jvp
from megatron_rcm.models.wan.layers import LayerNorm


class CosmosBlock(MegatronModule):
    def __init__(self, config, spec, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number  # global, 0-based (checkpoint keys use it under any PP split)
        D = config.hidden_size
        self.norm = LayerNorm(config, D, affine=False)  # the three LNs are affine-free and identical
        self.adaln_self_attn = AdaLNLoRA(config, 3)
        self.self_attn = CosmosAttention(config, spec, cross=False)
        self.adaln_cross_attn = AdaLNLoRA(config, 3)
        self.cross_attn = CosmosAttention(config, spec, cross=True)
        self.adaln_mlp = AdaLNLoRA(config, 3)
        self.mlp = MLP(config, spec, gelu_jvp)

    def _residual(self, x, t_x, adaln, cond, sublayer):
        dtype, cdt = x.dtype, compute_dtype(x)
        (shift, scale, gate), (t_shift, t_scale, t_gate) = adaln(*cond)
        h, t_h = self.norm(x, t_x)
        h, t_h = modulate_jvp(h, t_h, shift, t_shift, scale, t_scale)
        y, t_y = sublayer(h.to(dtype), _cast(t_h, dtype))
        y, t_y = mul_jvp(y.to(cdt), _cast(t_y, cdt), over_tokens(gate), over_tokens(t_gate))
        return (x.to(cdt) + y).to(dtype), _cast(add_tangents(t_x, t_y), dtype)

    def forward(
        self, x, t_x, emb, t_emb, temb, t_temb, pos_emb, context, rope_cos, rope_sin, frame_of_token=None,
        shard=None,
    ):
        if pos_emb is not None:
            x = x + pos_emb
        cond = (emb, t_emb, temb, t_temb, frame_of_token)
        x, t_x = self._residual(
            x,
            t_x,
            self.adaln_self_attn,
            cond,
            lambda h, t_h: self.self_attn(h, t_h, None, rope_cos, rope_sin, shard),
        )
        x, t_x = self._residual(
            x, t_x, self.adaln_cross_attn, cond, lambda h, t_h: self.cross_attn(h, t_h, context)
        )
        return self._residual(x, t_x, self.adaln_mlp, cond, self.mlp)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)
