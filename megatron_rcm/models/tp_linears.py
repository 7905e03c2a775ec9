"""The tensor-parallel linears of the DiT blocks (Wan, Cosmos), built from the spec's implementations.

    column_linear: Y = X A + b, A split along its output dimension (heads / FFN columns); output not gathered
    row_linear:    Y = X A + b, A split along its input dimension; the input is this rank's split
Both return the bias separately (``skip_bias_add``; ``models.jvp.linear_jvp`` adds it to the primal only);
``config.add_bias_linear`` says whether there is one (Wan: yes, Cosmos-Predict2: no).
"""

from __future__ import annotations


def column_linear(spec, config, in_dim: int, out_dim: int):
    return spec.column_linear(
        in_dim,
        out_dim,
        config=config,
        init_method=config.init_method,
        bias=config.add_bias_linear,
        gather_output=False,
        skip_bias_add=True,
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
    )
