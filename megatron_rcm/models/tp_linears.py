"""The tensor-parallel linears and MLP of the DiT blocks (Wan, Cosmos), built from the spec's implementations.

    column_linear: Y = X A + b, A split along its output dimension (heads / FFN columns); output not gathered
    row_linear:    Y = X A + b, A split along its input dimension; the input is this rank's split
    norm_column_linear: Y = LN(X) A + b, the LayerNorm fused into the column linear (Transformer Engine only)
All return the bias separately (``skip_bias_add``; ``models.jvp.linear_jvp`` adds it to the primal only,
``linear_jvp_split`` hands it to a fused consumer); ``config.add_bias_linear`` says whether there is one (Wan:
yes, Cosmos-Predict2: no).
"""

from __future__ import annotations

from megatron.core.transformer.module import MegatronModule

from megatron_rcm.models.jvp import linear_jvp_split


def column_linear(spec, config, in_dim: int, out_dim: int):
    return spec.column_linear(
        in_dim,
        out_dim,
        config=config,
        init_method=config.init_method,
        bias=config.add_bias_linear,
        gather_output=False,
        skip_bias_add=True,
        is_expert=False,
    )


def norm_column_linear(spec, config, in_dim: int, out_dim: int):
    """The spec's fused LayerNorm + column linear (``layer_norm_weight``/``layer_norm_bias`` beside ``weight``,
    ``bias``; epsilon ``config.layernorm_epsilon``)."""
    return spec.norm_column_linear(
        in_dim,
        out_dim,
        config=config,
        init_method=config.init_method,
        bias=config.add_bias_linear,
        gather_output=False,
        skip_bias_add=True,
        is_expert=False,
    )


def row_linear(spec, config, in_dim: int, out_dim: int):
    return spec.row_linear(
        in_dim,
        out_dim,
        config=config,
        init_method=config.output_layer_init_method,
        bias=config.add_bias_linear,
        input_is_parallel=True,
        skip_bias_add=True,
        is_expert=False,
    )


class MLP(MegatronModule):
    """y = fc2(act(fc1(x))) with its tangent: fc1 column-, fc2 row-parallel (``act_jvp``: the activation and
    its tangent rule from ``models.jvp``, e.g. GELU-tanh for Wan, exact GELU for Cosmos).
    ``act_takes_bias``: ``act_jvp(h, t_h, bias=b)`` adds fc1's bias itself (``ops/elementwise.py``
    ``gelu_tanh``: bias-GELU in one kernel); otherwise h + b goes in."""

    def __init__(self, config, spec, act_jvp, act_takes_bias: bool = False):
        super().__init__(config)
        self.linear_fc1 = column_linear(spec, config, config.hidden_size, config.ffn_hidden_size)
        self.linear_fc2 = row_linear(spec, config, config.ffn_hidden_size, config.hidden_size)
        self.act_jvp = act_jvp
        self.act_takes_bias = act_takes_bias

    def forward(self, x, t_x):
        y, t_y, b = self.forward_split(x, t_x)
        return (y if b is None else y + b), t_y

    def forward_split(self, x, t_x):
        """(y, t_y, b): fc2's bias ``b`` not added (for the block's fused gated residual)."""
        h, t_h, b = linear_jvp_split(self.linear_fc1, x, t_x)
        if self.act_takes_bias:
            h, t_h = self.act_jvp(h, t_h, bias=b)
        else:
            h, t_h = self.act_jvp(h if b is None else h + b, t_h)
        return linear_jvp_split(self.linear_fc2, h, t_h)
