"""The interleaved pipeline schedule (``virtual_pipeline`` V > 1) equals the single-process model: outputs,
tangents and every parameter gradient; its chunks' checkpoint loads at PP=1.

PP=2 x V=2 runs as 2 gloo processes on CPU through Megatron-Core's ``forward_backward_pipelining_with_interleaving``
with 4 micro-batches; each rank holds 2 model chunks of one block each in Megatron's interleaved assignment
(rank 0: blocks 0 and 2, rank 1: blocks 1 and 3). The reference is one forward of the whole batch in the test
process (``tests/test_wan_pp.py``'s). Float32: only the order of sums changes, so the tolerance is round-off
(1e-5 relative). The negatives: the contiguous (non-interleaved) assignment of blocks to chunks, and a
micro-batch count Megatron refuses, named before any work.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.test_wan_pp import NUM_LAYERS, _config, _reference
from tests.wan_helpers import rel_err

PP, VP = 2, 2


def _microbatches(inp, m):
    keys = ("x", "t_x", "timestep", "t_timestep", "context", "clip", "w")
    b = inp["x"].shape[0] // m
    return [{k: None if inp[k] is None else inp[k][i * b : (i + 1) * b] for k in keys} for i in range(m)]


def _worker(rank, world, full_sd, inp, m, contiguous, ckpt_dir):
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel import pipeline
    from megatron_rcm.parallel.pipeline_schedule import run_schedule
    from megatron_rcm.training.models import export_model

    initialize_parallel(pipeline_parallel=PP, virtual_pipeline=VP)
    stages = [pipeline.pipeline_stage(NUM_LAYERS, vp=VP, chunk=c) for c in range(VP)]
    if contiguous:  # the negative: chunk c of rank p holds block p VP + c (the wrong order through the pipeline)
        stages = [pipeline.PipelineStage(rank * VP + c, 1, s.pre_process, s.post_process) for c, s in enumerate(stages)]
    chunks = []
    for stage in stages:
        cfg = _config("t2v")
        for k, v in pipeline.interleaved_config_fields(PP, VP).items():
            setattr(cfg, k, v)
        model = WanModel(cfg, **stage.model_kwargs)
        load_full_state_dict(model, pipeline.stage_state_dict(full_sd, stage))
        chunks.append(model)

    def step(mb, chunk):
        out = chunk.forward_jvp(mb["x"], mb["t_x"], mb["timestep"], mb["t_timestep"], mb["context"], mb["clip"])
        if not chunk.post_process:
            return out[0], None

        def loss_func(vt):
            v, t_v = vt
            return (v * mb["w"]).sum() * (m / inp["x"].shape[0]), {"v": v.detach(), "t_v": t_v}

        return out, loss_func

    _, _, F, H, W = inp["x"].shape
    seq_length = pipeline.boundary_seq_length(F * (H // 2) * (W // 2), chunks[0].config)
    reduced = run_schedule(chunks, step, _microbatches(inp, m), seq_length=seq_length,
                           micro_batch_size=inp["x"].shape[0] // m, with_tangent=True, forward_only=False)
    pipeline.allreduce_replicated_grads(chunks)
    grads = {}
    for chunk, stage in zip(chunks, stages):
        grads.update(pipeline.global_state_dict({n: p.grad for n, p in chunk.named_parameters()}, stage))
    if ckpt_dir is not None:
        export_model(chunks, ckpt_dir)
    outs = [None] * world
    dist.all_gather_object(outs, (grads, reduced))
    destroy_parallel()
    all_grads = {}
    for g, _ in outs:
        all_grads.update(g)
    last = outs[-1][1]
    return torch.cat([r["v"] for r in last]), torch.cat([r["t_v"] for r in last]), all_grads


def _reference4():
    """(full_sd, inputs, (v, t_v, grads)) of test_wan_pp's reference model on 4 samples (the interleaved schedule
    needs a multiple of PP micro-batches), loss sum(v w) / 4."""
    from megatron_rcm.models.wan import WanModel
    from tests.wan_helpers import make_inputs

    full_sd, _, _ = _reference("t2v")
    model = WanModel(_config("t2v"))
    load_full_state_dict(model, full_sd)
    inp = make_inputs("t2v", batch=4, frames=3, size=8, seed=5)
    inp["w"] = torch.randn(4, 4, *inp["x"].shape[2:])
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], inp["clip"])
    ((v * inp["w"]).sum() / 4).backward()
    return full_sd, inp, (v.detach(), t_v, {n: p.grad.clone() for n, p in model.named_parameters()})


def _compare(got, ref):
    v, t_v, g = got
    v1, t_v1, g1 = ref
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    errs["v"], errs["t_v"] = rel_err(v, v1), rel_err(t_v, t_v1)
    return errs


def test_interleaved_matches_single_process_and_checkpoint_loads_at_pp1(tmp_path):
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.training.models import load_weights

    full_sd, inp, ref = _reference4()
    errs = _compare(spawn(_worker, PP, full_sd, inp, 4, False, str(tmp_path / "ckpt")), ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])
    # the PP=2 x V=2 chunks' checkpoint (global layer numbering) loads into the whole model at PP=1
    initialize_parallel(tensor_parallel=1)
    model = WanModel(_config("t2v"))
    load_weights(model, tmp_path / "ckpt")
    got = dict(model.named_parameters())
    destroy_parallel()
    assert got.keys() == full_sd.keys()
    assert max((got[k] - full_sd[k]).abs().max().item() for k in full_sd) == 0.0


def test_contiguous_chunks_fail():
    """Chunks holding blocks in the non-interleaved order run the blocks out of order: the outputs differ."""
    full_sd, inp, ref = _reference4()
    destroy_parallel()  # _reference4 initialized the test process's parallel state
    errs = _compare(spawn(_worker, PP, full_sd, inp, 4, True, None), ref)
    assert errs["v"] > 1e-2


def test_interleaved_microbatch_count_error():
    from megatron_rcm.parallel.pipeline import (
        check_interleaved_microbatches,
        check_pipeline_layout,
        pipeline_stage,
    )

    with pytest.raises(ValueError, match=r"multiple of pipeline_parallel 2, got 3"):
        check_interleaved_microbatches(3, 2, 2)
    with pytest.raises(ValueError, match=r"multiple of pipeline_parallel 4, got 2"):
        check_interleaved_microbatches(2, 4, 2)
    check_interleaved_microbatches(3, 2, 1)  # 1F1B takes any count
    with pytest.raises(ValueError, match=r"30 transformer layers .* 2 x 4 = 8"):
        check_pipeline_layout(30, 2, 4)
    # Megatron's interleaved assignment: 8 layers, PP=2, V=2 -> rank 0: [0, 2) and [4, 6); rank 1: [2, 4), [6, 8)
    got = [[(s.layer_offset, s.num_local_layers, s.pre_process, s.post_process)
            for s in (pipeline_stage(8, 2, r, vp=2, chunk=c) for c in range(2))] for r in range(2)]
    assert got == [[(0, 2, True, False), (4, 2, False, False)], [(2, 2, False, False), (6, 2, False, True)]]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
