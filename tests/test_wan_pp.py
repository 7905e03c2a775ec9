"""Pipeline-parallel Wan equals the single-process model: outputs, tangents and gradients.

PP=2, PP=4 and PP=2 x CP=2 run as gloo process groups on CPU through Megatron-Core's 1F1B schedule with several
micro-batches (``parallel/pipeline_schedule.py``); the reference is one forward of the whole batch in the test
process. Float32: the blocks compute the same products; only the sums over micro-batches (loss, gradient
accumulation) and over stages (the replicated conditioning embeddings' gradients) change order, so the
tolerance is round-off (1e-5 rel). A stage boundary that drops the tangent must fail the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.dist_helpers import spawn
from tests.wan_helpers import make_inputs, randomize_, rel_err

NUM_LAYERS = 4
MICRO = 3  # micro-batches of one sample


def _config(kind):
    from megatron_rcm.models.wan import wan_config

    cfg = wan_config(f"wan-tiny-{kind}", num_layers=NUM_LAYERS)
    cfg.pipeline_dtype = torch.float32
    return cfg


def _reference(kind, size=8):
    from megatron_rcm.models.wan import WanModel

    initialize_parallel(tensor_parallel=1)
    model = WanModel(_config(kind))
    randomize_(model, seed=0)
    full_sd = {k: v.detach().clone() for k, v in model.named_parameters()}
    inp = make_inputs(kind, batch=MICRO, frames=3, size=size)
    inp["w"] = torch.randn(MICRO, 4, *inp["x"].shape[2:])
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"], inp["clip"])
    ((v * inp["w"]).sum() / MICRO).backward()  # Megatron divides each micro-batch's loss by their number
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return full_sd, inp, (v.detach(), t_v, grads)


def _microbatches(inp):
    keys = ("x", "t_x", "timestep", "t_timestep", "context", "clip", "w")
    return [{k: None if inp[k] is None else inp[k][i : i + 1] for k in keys} for i in range(MICRO)]


def _worker(rank, world, kind, full_sd, inp, drop_tangent, cp=1):
    from megatron.core import parallel_state as ps

    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel import pipeline
    from megatron_rcm.parallel.pipeline_schedule import run_schedule

    initialize_parallel(pipeline_parallel=world // cp, context_parallel=cp)
    if drop_tangent:  # the negative: the next stage receives a zero tangent
        pack = pipeline.pack_boundary
        pipeline.pack_boundary = lambda x, t_x: pack(x, None if t_x is None else torch.zeros_like(t_x))
    stage = pipeline.pipeline_stage(NUM_LAYERS)
    model = WanModel(_config(kind), **stage.model_kwargs)
    load_full_state_dict(model, pipeline.stage_state_dict(full_sd, stage))

    def step(mb, stage_model):
        out = stage_model.forward_jvp(mb["x"], mb["t_x"], mb["timestep"], mb["t_timestep"], mb["context"], mb["clip"])
        if not stage.post_process:
            return out[0], None

        def loss_func(vt):
            v, t_v = vt
            return (v * mb["w"]).sum(), {"v": v.detach(), "t_v": t_v}

        return out, loss_func

    _, _, F, H, W = inp["x"].shape
    seq_length = pipeline.boundary_seq_length(F * (H // 2) * (W // 2), model.config)  # patch (1, 2, 2)
    reduced = run_schedule(
        model, step, _microbatches(inp), seq_length=seq_length, micro_batch_size=1, with_tangent=True,
        forward_only=False,
    )
    pipeline.allreduce_replicated_grads(model)
    if cp > 1:  # each CP rank holds CP x its tokens' share (Megatron's loss x CP): DDP averages over DP x CP
        for p in model.parameters():
            dist.all_reduce(p.grad, group=ps.get_context_parallel_group())
            p.grad /= cp
    grads = pipeline.global_state_dict({n: p.grad for n, p in model.named_parameters()}, stage)
    outs = [None] * world
    dist.all_gather_object(outs, (grads, reduced))
    destroy_parallel()
    all_grads = {}
    for g, _ in outs:
        all_grads.update(g)
    last = outs[-1][1]
    v = torch.cat([r["v"] for r in last])
    t_v = torch.cat([r["t_v"] for r in last])
    return v, t_v, all_grads


@pytest.mark.parametrize("kind,pp", [("t2v", 2), ("t2v", 4), ("i2v", 2)])
def test_pp_matches_single_process(kind, pp):
    full_sd, inp, (v1, t_v1, g1) = _reference(kind)
    v, t_v, g = spawn(_worker, pp, kind, full_sd, inp, False)
    assert rel_err(v, v1) <= 1e-5
    assert rel_err(t_v, t_v1) <= 1e-5
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])


def test_pp_cp_matches_single_process():
    """PP=2 x CP=2: the stage boundaries carry each CP rank's token shard; 27 tokens are padded to 28 (shards
    of 14), so Megatron must be told the padded length (``boundary_seq_length``)."""
    full_sd, inp, (v1, t_v1, g1) = _reference("t2v", size=6)
    v, t_v, g = spawn(_worker, 4, "t2v", full_sd, inp, False, 2)
    assert rel_err(v, v1) <= 1e-5
    assert rel_err(t_v, t_v1) <= 1e-5
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])


def test_pp_dropped_tangent_fails():
    """Sending a zero tangent across the stage boundary changes t_v (the primal and gradients do not)."""
    full_sd, inp, (v1, t_v1, _) = _reference("t2v")
    v, t_v, _ = spawn(_worker, 2, "t2v", full_sd, inp, True)
    assert rel_err(v, v1) <= 1e-5
    assert rel_err(t_v, t_v1) > 1e-2


def test_stage_layout_errors():
    from megatron_rcm.parallel.pipeline import check_pipeline_layout, pipeline_stage

    with pytest.raises(ValueError, match=r"30 transformer layers .* 4 x 1 = 4"):
        check_pipeline_layout(30, 4)
    with pytest.raises(ValueError, match=r"30 transformer layers .* 2 x 4 = 8"):
        check_pipeline_layout(30, 2, 4)
    with pytest.raises(ValueError, match="virtual_pipeline 2 needs pipeline_parallel > 1"):
        check_pipeline_layout(30, 1, 2)
    stages = [pipeline_stage(30, 3, r) for r in range(3)]
    assert [(s.layer_offset, s.num_local_layers) for s in stages] == [(0, 10), (10, 10), (20, 10)]
    assert [(s.pre_process, s.post_process) for s in stages] == [(True, False), (False, False), (False, True)]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def _load_worker(rank, world, ckpt_dir, file_path, full_sd):
    from megatron_rcm.models.wan import WanModel
    from megatron_rcm.parallel import pipeline
    from megatron_rcm.training.models import load_weights

    initialize_parallel(pipeline_parallel=world)
    stage = pipeline.pipeline_stage(NUM_LAYERS)
    want = pipeline.stage_state_dict(full_sd, stage)
    errs = {}
    for name, path in (("dist_checkpointing", ckpt_dir), ("state-dict file", file_path)):
        model = WanModel(_config("t2v"), **stage.model_kwargs)
        load_weights(model, path)
        got = dict(model.named_parameters())
        assert got.keys() == want.keys()
        errs[name] = max((got[k] - want[k]).abs().max().item() for k in want)
    outs = [None] * world
    dist.all_gather_object(outs, errs)
    destroy_parallel()
    return outs


def test_exported_weights_load_at_any_pp(tmp_path):
    """The converter's output format (a dist_checkpointing directory, global layer numbers) and a full state-dict
    file load into every stage of PP=2 and PP=4 as that stage's part of the whole model."""
    from megatron_rcm.training.models import export_model

    full_sd, _, _ = _reference("t2v")
    from megatron_rcm.models.wan import WanModel

    model = WanModel(_config("t2v"))
    load_full_state_dict(model, full_sd)
    ckpt = export_model(model, tmp_path / "export")
    torch.save(full_sd, tmp_path / "full.pt")
    destroy_parallel()
    for pp in (2, 4):
        for errs in spawn(_load_worker, pp, str(ckpt), str(tmp_path / "full.pt"), full_sd):
            assert errs == {"dist_checkpointing": 0.0, "state-dict file": 0.0}, (pp, errs)
