"""Drive a pipeline stage model through Megatron-Core's schedules (no home-made pipeline).

    run_schedule(model, step, microbatches, seq_length=S, micro_batch_size=B, with_tangent, forward_only)

``get_forward_backward_func()`` picks Megatron's schedule from the pipeline size: no pipelining at PP=1,
``forward_backward_pipelining_without_interleaving`` (1F1B: warm-up forwards, steady one-forward-one-
backward, cool-down backwards; forward-only: forwards alone) at PP > 1. Its p2p (``P2PCommunicator``)
sends one tensor per boundary, whose shape Megatron computes as [S / CP / TP(SP), B, D] (pass the padded
``seq_length`` of ``parallel/pipeline.py: boundary_seq_length`` under CP); the JVP pass
prepends the 2 of the stacked (primal, tangent) through ``adjust_tensor_shapes_fn``
(``parallel/pipeline.py: pack_boundary``).

``step(microbatch, model) -> (output, loss_func)`` runs the stage model on one micro-batch. On the last stage
``loss_func(output) -> (loss, reduced)``: Megatron backpropagates ``loss / num_microbatches`` and returns the
``reduced`` of every micro-batch (losses, per-sample quantities); other stages return an empty list.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_rcm.parallel.pipeline import pp_world_size


def run_schedule(
    model,
    step,
    microbatches: list,
    *,
    seq_length: int,
    micro_batch_size: int,
    with_tangent: bool,
    forward_only: bool,
) -> list:
    """Run ``step`` over ``microbatches`` with Megatron's schedule; see the module docstring."""
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not microbatches:
        raise ValueError("run_schedule needs at least one micro-batch")
    config = get_model_config(model)
    if pp_world_size() > 1 and config.pipeline_dtype is None:
        raise ValueError("the model config's pipeline_dtype (the dtype sent between stages) is not set")
    if config.variable_seq_lengths:
        raise ValueError("variable_seq_lengths is not supported: every micro-batch has the same latent shape")

    def forward_step(data_iterator, stage_model):
        return step(next(data_iterator), stage_model)

    kwargs = dict(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if pp_world_size() > 1 and with_tangent:
        kwargs["adjust_tensor_shapes_fn"] = _stacked_shapes
    grad = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad:
        return get_forward_backward_func()(**kwargs)


def _stacked_shapes(recv_shapes, send_shapes):
    """[s, B, D] -> [2, s, B, D]: the primal and its tangent travel as one tensor."""
    return [(2, *shape) for shape in recv_shapes], [(2, *shape) for shape in send_shapes]
