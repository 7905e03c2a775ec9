"""Drive a pipeline stage model through Megatron-Core's schedules (no home-made pipeline).

    run_schedule(model, step, microbatches, seq_length=S, micro_batch_size=B, with_tangent, forward_only)

``get_forward_backward_func()`` picks Megatron's schedule from the pipeline size: no pipelining at PP=1,
``forward_backward_pipelining_without_interleaving`` (1F1B: warm-up forwards, steady one-forward-one-
backward, cool-down backwards; forward-only: forwards alone) at PP > 1. Its p2p (``P2PCommunicator``)
sends one tensor per boundary, whose shape Megatron computes as [S / CP / TP(SP), B, D] (pass the padded
``seq_length`` of ``parallel/pipeline.py: boundary_seq_length`` under CP); the JVP pass
prepends the 2 of the stacked (primal, tangent) through ``adjust_tensor_shapes_fn``
(``parallel/pipeline.py: pack_boundary``).

With ``virtual_pipeline`` V > 1 (the parallel state initialized with it) the model is the list of this rank's V
chunks and Megatron's ``forward_backward_pipelining_with_interleaving`` runs them, each chunk reading the
micro-batches from its own iterator. That schedule takes no ``adjust_tensor_shapes_fn``: in the JVP pass the
stacked boundary [2, s, B, D] travels as its view [2 s, B, D] (the schedule is told 2 S), which
``unpack_boundary`` takes apart. It needs the number of micro-batches to be a multiple of PP
(``check_interleaved_microbatches``, checked before any work).

``step(microbatch, model) -> (output, loss_func)`` runs the stage model on one micro-batch. On the last stage
``loss_func(output) -> (loss, reduced)``: Megatron backpropagates ``loss / num_microbatches`` and returns the
``reduced`` of every micro-batch (losses, per-sample quantities); other stages return an empty list.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_rcm.parallel.pipeline import (
    check_interleaved_microbatches,
    chunk_list,
    interleaved_config_fields,
    pp_world_size,
)


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
    """Run ``step`` over ``microbatches`` with Megatron's schedule; see the module docstring. ``model`` is the
    stage model, or this rank's model chunks (a list or ``ModelChunks``: the interleaved schedule)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not microbatches:
        raise ValueError("run_schedule needs at least one micro-batch")
    chunks = chunk_list(model)
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    if len(chunks) != vp:
        raise ValueError(f"{len(chunks)} model chunks on this rank, but the parallel state has virtual_pipeline {vp}")
    check_interleaved_microbatches(len(microbatches), pp_world_size(), vp)
    config = get_model_config(chunks[0])
    if vp > 1:
        want = interleaved_config_fields(pp_world_size(), vp)
        wrong = {k: getattr(config, k, None) for k, v in want.items() if getattr(config, k, None) != v}
        if wrong:
            raise ValueError(f"the interleaved schedule needs the model config fields {want} "
                             f"(parallel/pipeline.py: interleaved_config_fields); the config has {wrong}")
    if pp_world_size() > 1 and config.pipeline_dtype is None:
        raise ValueError("the model config's pipeline_dtype (the dtype sent between stages) is not set")
    if config.variable_seq_lengths:
        raise ValueError("variable_seq_lengths is not supported: every micro-batch has the same latent shape")

    def forward_step(data_iterator, stage_model):
        out, loss_func = step(next(data_iterator), stage_model)
        if vp > 1 and loss_func is None and out.ndim == 4:  # [2, s, B, D] -> the [2 s, B, D] view (see above)
            out = out.flatten(0, 1)
        return out, loss_func

    kwargs = dict(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in chunks] if vp > 1 else iter(microbatches),
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if pp_world_size() > 1 and with_tangent and vp > 1:
        kwargs["seq_length"] = 2 * seq_length
    elif pp_world_size() > 1 and with_tangent:
        kwargs["adjust_tensor_shapes_fn"] = _stacked_shapes
    grad = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad:
        return get_forward_backward_func()(**kwargs)


def _stacked_shapes(recv_shapes, send_shapes):
    """[s, B, D] -> [2, s, B, D]: the primal and its tangent travel as one tensor."""
    return [(2, *shape) for shape in recv_shapes], [(2, *shape) for shape in send_shapes]
