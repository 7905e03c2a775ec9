"""Tensor (+sequence) parallel Cosmos equals the single-process model: outputs, tangents and gradients.

TP=2 runs as a gloo process group on CPU; the reference is TP=1 in the test process. Float32: the
sharded run sums the same products in a different order, so the tolerance is round-off (1e-5 rel).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rcm.convert.cosmos_keys import to_ours
from megatron_rcm.parallel.state import destroy_parallel, initialize_parallel
from tests.cosmos_helpers import make_diffusers, make_inputs, rel_err
from tests.dist_helpers import spawn
from tests.test_wan_tp import _grads


def _run(kind: str, full_sd: dict, inp: dict, mark_sp: bool = True):
    """Forward + JVP + backward of sum(v * w); returns (v, t_v, full grads)."""
    from megatron_rcm.models.cosmos import CosmosModel, cosmos_config
    from megatron_rcm.parallel.sharding import load_full_state_dict

    model = CosmosModel(cosmos_config(f"cosmos-tiny-{kind}"))
    load_full_state_dict(model, full_sd)
    v, t_v = model.forward_jvp(inp["x"], inp["t_x"], inp["timestep"], inp["t_timestep"], inp["context"])
    (v * inp["w"]).sum().backward()
    if dist.is_initialized() and dist.get_world_size() > 1 and mark_sp:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=group)  # what finalize_model_grads does for marked params
    return v.detach(), t_v, _grads(model)


def _worker(rank, world, kind, full_sd, inp, mark_sp=True):
    initialize_parallel(tensor_parallel=world)
    out = _run(kind, full_sd, inp, mark_sp)
    destroy_parallel()
    return out


def _reference(kind):
    full_sd = to_ours(make_diffusers(kind).state_dict(), "diffusers")
    inp = make_inputs(kind, frames=2, size=8)  # 2*4*4 = 32 tokens, divisible by 2
    inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:])
    return full_sd, inp


@pytest.mark.parametrize("kind,per_frame", [("t2i", False), ("v2w", False), ("v2w", True)])
def test_tp2_matches_single_process(kind, per_frame):
    """per_frame: timestep [B, F] (frame 0 clean). With 2 frames of 16 tokens each rank's slice would be one
    whole frame, which could hide a wrong token -> frame index; 3 frames give 48 tokens and rank 1's slice
    starts mid-frame."""
    full_sd, inp = _reference(kind)
    if per_frame:
        inp = make_inputs(kind, frames=3, size=8)
        inp["w"] = torch.randn(inp["x"].shape[0], 4, *inp["x"].shape[2:])
        inp["timestep"] = torch.rand(inp["x"].shape[0], 3)
        inp["timestep"][:, 0] = 0
        inp["t_timestep"] = torch.randn(inp["x"].shape[0], 3)
    initialize_parallel(tensor_parallel=1)
    v1, t_v1, g1 = _run(kind, full_sd, inp)
    v, t_v, g = spawn(_worker, 2, kind, full_sd, inp)
    assert rel_err(v, v1) <= 1e-5
    assert rel_err(t_v, t_v1) <= 1e-5
    assert g.keys() == g1.keys()
    errs = {k: rel_err(g[k], g1[k]) for k in g1}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, (worst, errs[worst])


def test_tp2_without_the_tp_grad_reduction_is_wrong():
    """The negative: skipping the all-reduce of the marked (per-head norm, modulation, head) grads breaks
    gradient parity, so the marks are what makes the TP gradients right."""
    full_sd, inp = _reference("t2i")
    initialize_parallel(tensor_parallel=1)
    _, _, g1 = _run("t2i", full_sd, inp)
    _, _, g = spawn(_worker, 2, "t2i", full_sd, inp, False)
    assert rel_err(g["blocks.0.self_attn.q_norm.weight"], g1["blocks.0.self_attn.q_norm.weight"]) > 1e-2
    assert rel_err(g["head.linear.weight"], g1["head.linear.weight"]) > 1e-2
